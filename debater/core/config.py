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
import os
import signal
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from debater.core.errors import UserError
from debater.core.prompts import DEFAULT_PROMPT, STEP_TOKEN_INITS, EncodingSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossVariant:
    """What a ``loss_variant`` means for the documents and for the loss (the paper's ablation)."""

    doc_mode: str            # how documents end, so which views they have (prompts.DOC_MODES)
    self_distillation: bool  # the SD term is added to the contrastive (CoD) one


# peft's init_lora_weights for each lora_init: only those that keep the base weights (an adapter then applies as
# saved, and a resumed run rebuilds the same start)
LORA_INITS = {"default": True, "gaussian": "gaussian", "orthogonal": "orthogonal"}
# the one definition of the variant names; the order is the ablation's (tests seed by it)
LOSS_VARIANTS = {"vanilla": LossVariant("last_token", False), "sd_only": LossVariant("last_k_tokens", True),
                 "cod_only": LossVariant("step_tokens", False), "full": LossVariant("step_tokens", True)}
POOLING_MODES = ("last_step", "multi_view", "last_token")
# Seed keys that belong to the HF Trainer and have no effect here.
IGNORED_SEED_KEYS = {"remove_unused_columns", "do_train", "save_only_model",
                     "per_device_eval_batch_size", "disable_tqdm", "num_train_epochs", "dataset_name"}


class ConfigError(UserError, ValueError):
    """A training configuration that cannot be run as written."""

    same_on_every_rank = True


# a stop signal must reach a Python handler: not SIGKILL/SIGSTOP (uncatchable), nor signals that report faults
CATCHABLE_SIGNALS = {s.name for s in signal.Signals} - {"SIGKILL", "SIGSTOP", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL",
                                                        "SIGABRT", "SIGCHLD"}


def parse_end_time(text: str) -> float:
    """An ISO 8601 time as seconds since the epoch; without an offset it is UTC (cluster clocks usually are)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"end_time must be an ISO 8601 time such as 2026-12-01T23:30:00Z, got {text!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def end_time_epoch(config: "TrainConfig", environ=os.environ) -> tuple[float | None, str]:
    """(end of the job in seconds since the epoch or None, where it came from): the config's end_time, else
    SLURM's SLURM_JOB_END_TIME (seconds since the epoch) when set."""
    if config.end_time is not None:
        return parse_end_time(config.end_time), "end_time"
    slurm = environ.get("SLURM_JOB_END_TIME")
    if not slurm:
        return None, ""
    try:
        return float(slurm), "SLURM_JOB_END_TIME"
    except ValueError:
        raise ConfigError(f"SLURM_JOB_END_TIME should be seconds since the epoch, got {slurm!r}: unset it or set "
                          "end_time") from None


def key(default=dataclasses.MISSING, help: str = "", factory=None):
    """A config field with the help text that ``--help-config`` and the key table of docs/configuration.md show."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    model_name_or_path: str = key(help="base decoder LM: a Hugging Face folder or hub name")
    dataset_file_path: str = key(help="echo-data folder (jsonl, preprocessed by rank 0 into output_dir) or a "
                                      "folder written by `make preprocess`")
    output_dir: str = key(help="where the run writes checkpoints, TensorBoard, the adapter and its records")
    peft_model_name_or_path: str | None = key(None, "adapter to start from (warm start): its LoRA weights and "
                                                    "step rows")
    pooling_mode: str = key("last_step", "what inference embeds a document with: last_step (the K-th view), "
                                         "multi_view (all K, max-sim) or last_token (vanilla)")
    learning_rate: float = key(2e-4, "peak AdamW learning rate")
    warmup_steps: int = key(300, "linear warm-up steps")
    lr_scheduler_type: str = key("cosine", "decay after warm-up over the planned epoch: cosine, linear or constant")
    lr_start_boost: float = key(1.0, "the learning rate starts at this times its scheduled value and comes down to "
                                     "it (cosine) over lr_start_boost_steps; 1: off (not the paper's setting)")
    lr_start_boost_steps: int = key(0, "steps over which lr_start_boost comes down to 1")
    weight_decay: float = key(0.0, "AdamW weight decay")
    max_grad_norm: float = key(1.0, "gradient clipping norm")
    per_device_train_batch_size: int = key(64, "queries per rank per step; the global batch is this x ranks")
    negatives_per_query: int = key(1, "hard negatives per query (k); rows with fewer are left out of the plan")
    gradient_accumulation_steps: int = key(1, "must be 1: the contrastive loss needs the whole batch in one step "
                                              "(use grad_cache_chunk_size for memory)")
    grad_cache_chunk_size: int = key(0, "gradient caching: texts per forward pass; 0 turns it off")
    max_seq_length: int = key(512, "max tokens per document (suffix included) and, by default, per query")
    query_max_length: int | None = key(None, "max tokens per query (default: max_seq_length)")
    stop_after_n_steps: int | None = key(1000, "steps to train (null: one pass over the planned batches); the "
                                               "schedule still spans the whole plan")
    logging_steps: int = key(50, "steps between TensorBoard/console logs")
    save_steps: int = key(200, "steps between checkpoints")
    save_total_limit: int = key(2, "checkpoints kept (the newest; 'latest' is never removed)")
    seed: int = key(42, "seed of the batch plan, the LoRA initialisation and the dropout masks")
    lora_r: int = key(16, "LoRA rank")
    lora_alpha: int = key(32, "LoRA alpha")
    lora_dropout: float = key(0.05, "LoRA dropout (masks keyed by text: the same on any number of ranks)")
    lora_init: str = key("default", "how LoRA starts: default (Kaiming A, zero B), gaussian (Gaussian A, zero "
                                    "B) or orthogonal (both non-zero, B A = 0); every one leaves the base "
                                    "weights as they are")
    lora_b_lr_ratio: float = key(1.0, "LoRA+: the B matrices learn at this times learning_rate (1: plain LoRA; "
                                      "the LoRA+ paper suggests 4-16)")
    lora_target_modules: list[str] | None = key(None, "module names to adapt (default: every linear layer of the "
                                                      "transformer blocks)")
    gradient_checkpointing: bool = key(False, "recompute activations in backward to save memory")
    torch_dtype: str = key("bfloat16", "weights dtype: bfloat16, float16 or float32 (an fp32 DeepSpeed config "
                                       "loads float32, with a log line)")
    attn_implementation: str = key("sdpa", "attention kernel: sdpa, eager or flash_attention_2 (falls back to "
                                           "sdpa when unavailable)")
    trust_remote_code: bool = key(False, "allow the model's own code (MiniCPM)")
    cod_steps: int = key(8, "K, the number of deliberation steps (step tokens, document views)")
    deliberation_prompt: str = key(DEFAULT_PROMPT, "text between a document and its step tokens ({k} is "
                                                   "replaced by K); empty puts the steps right after the text")
    step_tokens: list[str] | None = key(None, "the K step tokens (default: reserved tokens the tokenizer has, "
                                              "else added <step_1>..)")
    step_token_init: str = key("sampled", "rows of added step tokens: sampled (vocabulary mean and covariance) "
                                          "or eos (copies of the EOS row)")
    train_step_rows: bool = key(False, "train the step-token rows too (the released code keeps them frozen)")
    doc_body_max_length: int | None = key(None, "document body tokens kept whatever the suffix costs (default: "
                                                "what max_seq_length leaves)")
    loss_variant: str = key("full", "full (CoD + SD), cod_only, sd_only or vanilla (last token, one view)")
    scale: float = key(30.0, "scale of the cosine scores (1 / temperature)")
    cod_loss_weight: float = key(0.5, "weight of the contrastive (CoD) loss")
    sd_loss_weight: float = key(0.5, "weight of the self-distillation (SD) loss")
    resume_from_checkpoint: str | None = key(None, "latest, or a checkpoint folder; on another number of ranks "
                                                   "at the same global batch too")
    overwrite_output_dir: bool = key(False, "when output_dir holds an earlier run and resume_from_checkpoint is "
                                            "not set: remove that run's checkpoints, events and adapter first "
                                            "(else the run refuses to start)")
    deepspeed: str | None = key(None, "DeepSpeed JSON (the --deepspeed argument wins)")
    stop_signal: str = key("SIGUSR1", "signal that, like SIGTERM, stops every rank after the current step with a "
                                      "checkpoint (exit code 75: resumable); sent to any one rank")
    end_time: str | None = key(None, "when the job ends (ISO 8601, e.g. 2026-12-01T23:30:00Z; UTC without an "
                                     "offset): the run checkpoints and stops before it; null: SLURM_JOB_END_TIME "
                                     "when set")
    stop_safety_s: float = key(60.0, "seconds kept free before end_time besides the measured step and "
                                     "checkpoint time")
    ignored_keys: list[str] = key(help="(set by the loader) keys of the seed format that have no effect here",
                                  factory=list)

    def __post_init__(self) -> None:
        if self.loss_variant not in LOSS_VARIANTS:
            raise ConfigError(f"loss_variant must be one of {sorted(LOSS_VARIANTS)}, got {self.loss_variant!r}")
        if self.pooling_mode == "last_token" and self.loss_variant != "vanilla":
            log.info("pooling_mode 'last_token' (the seed config's value) with loss_variant %r: the last token of "
                     "a document is its last step token, so inference embeds with 'last_step'", self.loss_variant)
            self.pooling_mode = "last_step"
        if self.pooling_mode not in POOLING_MODES:
            raise ConfigError(f"pooling_mode must be one of {POOLING_MODES}, got {self.pooling_mode!r}")
        if self.torch_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"torch_dtype must be float32, bfloat16 or float16, got {self.torch_dtype!r}")
        if self.step_token_init not in STEP_TOKEN_INITS:
            raise ConfigError(f"step_token_init must be one of {STEP_TOKEN_INITS}, got {self.step_token_init!r}")
        if self.lora_init not in LORA_INITS:
            raise ConfigError(f"lora_init must be one of {sorted(LORA_INITS)}, got {self.lora_init!r} (peft's "
                              "pissa, olora, loftq, eva and corda change the base weights or need data, so an "
                              "exported adapter would not apply to the base model: not supported)")
        if self.lora_init == "orthogonal" and self.lora_r % 2:
            raise ConfigError(f"lora_init 'orthogonal' needs an even lora_r, got {self.lora_r}")
        if not self.lora_b_lr_ratio > 0:
            raise ConfigError(f"lora_b_lr_ratio must be > 0 (1 is plain LoRA), got {self.lora_b_lr_ratio}")
        if not self.lr_start_boost > 0 or self.lr_start_boost_steps < 0:
            raise ConfigError(f"lr_start_boost must be > 0 and lr_start_boost_steps >= 0, got {self.lr_start_boost} "
                              f"and {self.lr_start_boost_steps}")
        if self.lr_start_boost != 1 and self.lr_start_boost_steps == 0:
            raise ConfigError(f"lr_start_boost {self.lr_start_boost} needs lr_start_boost_steps >= 1: the steps over "
                              "which the boost comes down to 1")
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
        if self.stop_signal not in CATCHABLE_SIGNALS:
            raise ConfigError(f"stop_signal must be a signal name a process can catch, such as SIGUSR1 or SIGUSR2, "
                              f"got {self.stop_signal!r}")
        if self.end_time is not None:
            parse_end_time(self.end_time)
        if self.stop_safety_s < 0:
            raise ConfigError(f"stop_safety_s must be >= 0, got {self.stop_safety_s}")
        if self.gradient_accumulation_steps != 1:
            raise ConfigError("gradient_accumulation_steps must be 1: the contrastive loss needs the whole "
                              "global batch in one step; raise per_device_train_batch_size or add ranks instead "
                              "(grad_cache_chunk_size makes a large per-device batch fit in memory)")

    def encoding_settings(self) -> EncodingSettings:
        return EncodingSettings(
            doc_mode=LOSS_VARIANTS[self.loss_variant].doc_mode,
            cod_steps=self.cod_steps,
            deliberation_prompt=self.deliberation_prompt,
            step_tokens=list(self.step_tokens or []),
            query_max_length=self.query_max_length or self.max_seq_length,
            doc_max_length=self.max_seq_length,
            doc_body_max_length=self.doc_body_max_length,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# the config key each encoding setting comes from, so that errors about settings speak the config's words
SETTING_KEYS = {"doc_mode": "loss_variant", "cod_steps": "cod_steps", "deliberation_prompt": "deliberation_prompt",
                "step_tokens": "step_tokens", "query_max_length": "query_max_length",
                "doc_max_length": "max_seq_length", "doc_body_max_length": "doc_body_max_length"}


def settings_differences(there: dict, here: dict) -> str:
    """The encoding settings that differ, named by config key: ``max_seq_length 64 there, 128 here``."""
    names = list(SETTING_KEYS) + sorted((set(there) | set(here)) - set(SETTING_KEYS))
    return "; ".join(f"{SETTING_KEYS.get(name, name)} {there.get(name)!r} there, {here.get(name)!r} here"
                     for name in names if there.get(name) != here.get(name))


def _valid_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name != "ignored_keys"]


def _checked(key: str, value, hint, source: str):
    """Check a JSON value against the field's type (``str``, ``int``, ``float``, ``bool``, ``list[str]``,
    optionally ``| None``); ints are accepted as floats."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    base = next(t for t in allowed if t is not type(None))
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        ok = isinstance(value, list) and all(isinstance(v, item) for v in value)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, base) and (base is bool or not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{source}: key '{key}' should be {_type_name(hint)}, got {value!r}")
    return float(value) if base is float else value


def _type_name(hint) -> str:
    """``str or null``, ``list of str``: readable, and free of the ``|`` a Markdown table cannot hold."""
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return hint.__name__


KEY_TABLE_START = "<!-- config keys: generated by `python -m debater train --help-config --markdown` -->"
KEY_TABLE_END = "<!-- end of config keys -->"


def config_reference() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) of every key a config may set, in declaration order."""
    hints = typing.get_type_hints(TrainConfig)
    rows = []
    for f in dataclasses.fields(TrainConfig):
        if f.name == "ignored_keys":
            continue
        default = "required" if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING \
            else json.dumps(f.default)
        rows.append((f.name, _type_name(hints[f.name]), default, f.metadata["help"]))
    return rows


def config_reference_markdown() -> str:
    """The key table of docs/configuration.md (tests/test_config.py keeps that page equal to it)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{name}` | {kind} | {default if default == 'required' else f'`{default}`'} | {text} |"
              for name, kind, default, text in config_reference()]
    ignored = ", ".join(f"`{k}`" for k in sorted(IGNORED_SEED_KEYS))
    lines.append(f"\nAccepted for compatibility with the seed configs and named as having no effect: {ignored}.")
    return "\n".join(lines) + "\n"


def config_from_dict(raw: dict, source: str = "config", overrides: dict | None = None,
                     overrides_source: str = "--set") -> TrainConfig:
    """``raw`` (read from ``source``) with ``overrides`` on top; an error about a key names where it was given."""
    overrides = overrides or {}
    merged = {**raw, **overrides}

    def given_in(key: str) -> str:
        return overrides_source if key in overrides else source

    valid = _valid_keys()
    kwargs, ignored = {}, []
    for key, value in merged.items():
        if key in IGNORED_SEED_KEYS:
            ignored.append(key)
        elif key in valid:
            kwargs[key] = value
        else:
            close = difflib.get_close_matches(key, valid + sorted(IGNORED_SEED_KEYS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{given_in(key)}: unknown key '{key}'{hint}")
    missing = [k for k in ("model_name_or_path", "dataset_file_path", "output_dir") if k not in kwargs]
    if missing:
        raise ConfigError(f"{source}: missing required key(s): {', '.join(missing)}")
    hints = typing.get_type_hints(TrainConfig)
    for key, value in kwargs.items():
        kwargs[key] = _checked(key, value, hints[key], given_in(key))
    if ignored:
        log.info("%s: keys with no effect in this trainer (accepted for compatibility): %s", source, ", ".join(ignored))
    try:
        return TrainConfig(**kwargs, ignored_keys=ignored)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config(path: str | Path, overrides: dict | None = None, overrides_source: str = "--set") -> TrainConfig:
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
    return config_from_dict(raw, str(path), overrides, overrides_source)
