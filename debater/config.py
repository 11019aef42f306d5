"""The training configuration: one flat JSON in the original project's format.

Every key of the seed README keeps working; keys that only made sense for the
Hugging Face Trainer are accepted and ignored with a log line. An unknown key
is an error naming the key and the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from debater.prompts import DEFAULT_PROMPT, STEP_TOKEN_INITS, EncodingSettings

log = logging.getLogger(__name__)

LOSS_VARIANTS = {"vanilla": "last_token", "sd_only": "last_k_tokens", "cod_only": "step_tokens",
                 "full": "step_tokens"}
POOLING_MODES = ("last_step", "multi_view", "last_token")
# Seed keys that belong to the HF Trainer and have no effect here.
IGNORED_SEED_KEYS = {"remove_unused_columns", "do_train", "overwrite_output_dir", "save_only_model",
                     "per_device_eval_batch_size", "disable_tqdm", "num_train_epochs"}


class ConfigError(ValueError):
    """A training configuration that cannot be run as written."""


@dataclass
class TrainConfig:
    model_name_or_path: str
    dataset_file_path: str
    output_dir: str
    peft_model_name_or_path: str | None = None
    dataset_name: str = "E5"
    pooling_mode: str = "last_step"
    learning_rate: float = 2e-4
    warmup_steps: int = 300
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 64
    negatives_per_query: int = 1  # hard negatives per query; rows with fewer are left out of the plan
    gradient_accumulation_steps: int = 1
    grad_cache_chunk_size: int = 0  # >0: gradient caching, encoding this many texts per forward (0: off)
    max_seq_length: int = 512
    query_max_length: int | None = None
    stop_after_n_steps: int | None = 1000
    logging_steps: int = 50
    save_steps: int = 200
    save_total_limit: int = 2
    seed: int = 42
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    gradient_checkpointing: bool = False
    torch_dtype: str = "bfloat16"
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    cod_steps: int = 8
    deliberation_prompt: str = DEFAULT_PROMPT
    step_tokens: list[str] | None = None
    step_token_init: str = "sampled"  # rows of added step tokens: "sampled" (vocabulary mean and covariance) or "eos"
    train_step_rows: bool = False  # the released code keeps the step-token rows frozen and trains LoRA only
    doc_body_max_length: int | None = None  # body tokens kept whatever the suffix costs (fair format comparisons)
    loss_variant: str = "full"
    scale: float = 30.0
    cod_loss_weight: float = 0.5
    sd_loss_weight: float = 0.5
    resume_from_checkpoint: str | None = None
    deepspeed: str | None = None
    ignored_keys: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.loss_variant not in LOSS_VARIANTS:
            raise ConfigError(f"loss_variant must be one of {sorted(LOSS_VARIANTS)}, got {self.loss_variant!r}")
        if self.pooling_mode == "last_token" and self.loss_variant != "vanilla":
            self.pooling_mode = "last_step"  # the seed's value; the step view is the last token
        if self.pooling_mode not in POOLING_MODES:
            raise ConfigError(f"pooling_mode must be one of {POOLING_MODES}, got {self.pooling_mode!r}")
        if self.torch_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"torch_dtype must be float32, bfloat16 or float16, got {self.torch_dtype!r}")
        if self.step_token_init not in STEP_TOKEN_INITS:
            raise ConfigError(f"step_token_init must be one of {STEP_TOKEN_INITS}, got {self.step_token_init!r}")
        if self.lr_scheduler_type not in ("cosine", "linear", "constant"):
            raise ConfigError(f"lr_scheduler_type must be cosine, linear or constant, got {self.lr_scheduler_type!r}")
        for name in ("per_device_train_batch_size", "negatives_per_query", "max_seq_length", "logging_steps",
                     "save_steps", "lora_r"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.grad_cache_chunk_size < 0:
            raise ConfigError(f"grad_cache_chunk_size must be >= 0 (0 turns gradient caching off), "
                              f"got {self.grad_cache_chunk_size}")
        if self.doc_body_max_length is not None and self.doc_body_max_length < 1:
            raise ConfigError(f"doc_body_max_length must be >= 1 or null, got {self.doc_body_max_length}")
        if self.gradient_accumulation_steps != 1:
            raise ConfigError("gradient_accumulation_steps must be 1: the contrastive loss needs the whole "
                              "global batch in one step; raise per_device_train_batch_size or add ranks instead "
                              "(grad_cache_chunk_size makes a large per-device batch fit in memory)")

    def encoding_settings(self) -> EncodingSettings:
        return EncodingSettings(
            doc_mode=LOSS_VARIANTS[self.loss_variant],
            cod_steps=self.cod_steps,
            deliberation_prompt=self.deliberation_prompt,
            step_tokens=list(self.step_tokens or []),
            query_max_length=self.query_max_length or self.max_seq_length,
            doc_max_length=self.max_seq_length,
            doc_body_max_length=self.doc_body_max_length,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _valid_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name != "ignored_keys"]


_PY_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "list[str]": (list,)}


def _checked(key: str, value, annotation: str, source: str):
    """Check a JSON value against the field's annotation; ints are accepted as floats."""
    parts = [p.strip() for p in annotation.split("|")]
    if value is None and "None" in parts:
        return None
    base = next(p for p in parts if p != "None")
    allowed = _PY_TYPES[base]
    wrong_items = base == "list[str]" and isinstance(value, list) and not all(isinstance(v, str) for v in value)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed) or wrong_items:
        raise ConfigError(f"{source}: key '{key}' should be {annotation}, got {value!r}")
    return float(value) if base == "float" else value


def config_from_dict(raw: dict, source: str = "config") -> TrainConfig:
    valid = _valid_keys()
    kwargs, ignored = {}, []
    for key, value in raw.items():
        if key in IGNORED_SEED_KEYS:
            ignored.append(key)
        elif key in valid:
            kwargs[key] = value
        else:
            close = difflib.get_close_matches(key, valid + sorted(IGNORED_SEED_KEYS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown key '{key}'{hint}")
    missing = [k for k in ("model_name_or_path", "dataset_file_path", "output_dir") if k not in kwargs]
    if missing:
        raise ConfigError(f"{source}: missing required key(s): {', '.join(missing)}")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for key, value in kwargs.items():
        kwargs[key] = _checked(key, value, types[key], source)
    if ignored:
        log.info("%s: keys with no effect in this trainer (accepted for compatibility): %s", source, ", ".join(ignored))
    try:
        return TrainConfig(**kwargs, ignored_keys=ignored)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    raw.update(overrides or {})
    return config_from_dict(raw, source=str(path))
