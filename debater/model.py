"""The DEBATER encoder: a decoder LM (+ LoRA + step-token rows) that embeds
queries by their last token and documents by the hidden states of their last
K positions (the step tokens), all from one forward pass per text group.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from debater.core.config import LORA_INITS
from debater.core.prompts import STEP_TOKEN_INITS, EncodingSettings, resolve_step_tokens, step_tokens_unusable
from debater.keyed_dropout import TextKeys, install_keyed_dropout
from debater.model_folder import (ENCODER_FILE, ModelPathError, base_model_record, check_model_path,
                                  resolve_base_model)

log = logging.getLogger(__name__)
STEP_ROWS_FILE = "step_rows.safetensors"  # the step-token embedding rows used in training
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def flash_attention_unusable() -> str | None:
    """Why flash-attention 2 cannot run here (None: it can). transformers' own check reads only the package's
    metadata, so a flash-attn built for another torch or CUDA passes it and then fails inside
    ``from_pretrained``; importing it here tells the two apart, whatever the broken build raises."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "flash-attn is not installed (or older than 2.3.3)"
    try:
        importlib.import_module("flash_attn")
    except Exception as error:  # noqa: BLE001  an ImportError, an OSError or worse from a foreign build
        first_line = (str(error).splitlines() or [""])[0][:200]
        return (f"flash-attn is installed but does not import ({type(error).__name__}: {first_line}): reinstall it "
                "for this torch and CUDA, or uninstall it")
    return None


def choose_attention(requested: str) -> str:
    """flash_attention_2 needs a flash-attn that imports and a GPU; otherwise fall back to sdpa, saying why."""
    if requested == "flash_attention_2":
        reason = flash_attention_unusable()
        if reason is not None:
            log.warning("attn_implementation=flash_attention_2 is not usable here (%s); using sdpa", reason)
            return "sdpa"
    return requested


def avoid_cudnn_attention_backward() -> None:
    """Training on CUDA: keep SDPA off its cuDNN backend, whose backward returns NaN for masked inputs in some
    torch releases (pytorch/pytorch#196678: with an attention mask, sequence lengths of 64 mod 128 and rows
    whose log-sum-exp is very negative, as left padding gives). Measured on an H100 with torch 2.11: bf16 + sdpa
    gave an infinite gradient norm at every step, bf16 + eager and fp32 + sdpa did not. That this switch cures it
    follows the upstream report; it has not yet run on a GPU here. Flash and memory-efficient kernels take over."""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
        log.info("cuDNN attention backend disabled for training (NaN gradients in its backward, see model.py)")


def lora_targets(model: nn.Module) -> list[str]:
    """Names of every linear layer inside the transformer blocks (attention and MLP alike).

    Covers q/k/v/o + gate/up/down for Llama/Qwen2/Mistral/MiniCPM and the MLA
    projections (q_a_proj, kv_a_proj_with_mqa, ...) of MiniCPM3.
    """
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{full_name}":
            names.add(full_name.rsplit(".", 1)[-1])
    if not names:
        raise ValueError("found no linear layers under '.layers.': pass lora_target_modules explicitly")
    return sorted(names)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token, so left padding changes nothing."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class DebaterEncoder(nn.Module):
    def __init__(self, backbone: nn.Module, settings: EncodingSettings, text_keys: TextKeys | None = None,
                 instructions: dict[str, list[str]] | None = None):
        super().__init__()
        self.backbone = backbone
        self.settings = settings
        self.text_keys = text_keys  # set when LoRA dropout is keyed (training); None at inference
        self.instructions = instructions or {}  # training file stem -> its query instruction(s)

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        with self.text_keys.use(keys) if self.text_keys is not None else contextlib.nullcontext():
            out = self.backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                use_cache=False)
        return out.last_hidden_state

    def encode_queries(self, ids: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """[N, D]: hidden state of the last (EOS) token; inputs are left-padded."""
        return self.hidden_states(ids, mask, keys)[:, -1]

    def encode_documents(self, ids: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """[N, V, D]: hidden states of the last V positions (the step tokens)."""
        return self.hidden_states(ids, mask, keys)[:, -self.settings.num_views:]

    def forward(self, query_ids=None, query_mask=None, doc_ids=None, doc_mask=None, query_keys=None, doc_keys=None):
        """(queries [Nq, D], views [Nd, V, D]); a side whose ids are not given comes back as None."""
        queries = None if query_ids is None else self.encode_queries(query_ids, query_mask, query_keys)
        views = None if doc_ids is None else self.encode_documents(doc_ids, doc_mask, doc_keys)
        return queries, views


def vocabulary_draws(rows: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` rows drawn from a normal with the mean and covariance of ``rows`` (the real ones, unlike
    transformers' ``mean_resizing``, which scales the covariance by 1e-9 and so gives near-identical rows).
    Seeded, computed in float64 in chunks, so the same rows come back on every machine and load."""
    mean = torch.zeros(rows.shape[1], dtype=torch.float64)
    for chunk in rows.split(8192):
        mean += chunk.double().sum(0)
    mean /= rows.shape[0]
    cov = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
    for chunk in rows.split(8192):
        centred = chunk.double() - mean
        cov += centred.T @ centred
    cov /= max(1, rows.shape[0] - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    root = eigenvectors * eigenvalues.clamp(min=0).sqrt()  # root @ root.T == cov
    noise = torch.randn(count, rows.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return (mean + noise @ root.T).to(rows.dtype)


def grow_embeddings(model, tokenizer, added: list[str], init: str = "sampled") -> None:
    """Add embedding rows for the added step tokens. ``sampled``: distinct draws at the vocabulary's mean and
    covariance (new tokens the model has no use for yet); ``eos``: copies of the EOS row, the token whose
    final hidden state vanilla training turns into an embedding (see docs/benchmarks.md, "The ablation")."""
    if init not in STEP_TOKEN_INITS:
        raise ValueError(f"step_token_init must be one of {STEP_TOKEN_INITS}, got {init!r}")
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:  # padded vocabularies may have room already
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = model.get_input_embeddings().weight
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(added))
    with torch.no_grad():
        if init == "eos":
            weight[ids] = weight[tokenizer.eos_token_id].clone()
        else:  # the statistics of the real vocabulary: the rows before the first added token
            weight[ids] = vocabulary_draws(weight[:int(ids.min())].detach().cpu(), len(added)).to(weight.device)


def step_rows(backbone: nn.Module, settings: EncodingSettings, tokenizer) -> dict[str, torch.Tensor]:
    """The embedding rows the step tokens have right now (trained values included), with their ids."""
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(settings.step_tokens), dtype=torch.long)
    embed = backbone.get_input_embeddings()
    with torch.no_grad():
        rows = embed(ids.to(embed.weight.device)).detach().cpu().contiguous()
    return {"ids": ids, "rows": rows}


def restore_step_rows(backbone: nn.Module, folder: Path) -> None:
    """Write the rows saved with an adapter into the base model's embedding, bit for bit (the model must
    already have room for them)."""
    from safetensors.torch import load_file

    path = folder / STEP_ROWS_FILE
    if not path.exists():
        return
    saved = load_file(str(path))
    weight = backbone.get_input_embeddings().weight
    if int(saved["ids"].max()) >= weight.shape[0]:
        raise ValueError(f"{path} holds step-token rows up to id {int(saved['ids'].max())} but this model has "
                         f"{weight.shape[0]} rows: the adapter was trained with other step tokens than this config's")
    with torch.no_grad():
        weight[saved["ids"].to(weight.device)] = saved["rows"].to(weight.device, weight.dtype)


def load_backbone(path: str, dtype: str, attn_implementation: str, trust_remote_code: bool = False):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation=choose_attention(attn_implementation),
                                     trust_remote_code=trust_remote_code)


def load_backbone_with_steps(path: str, tokenizer, settings: EncodingSettings, dtype: str, attn_implementation: str,
                             trust_remote_code: bool = False, step_token_init: str = "sampled") -> nn.Module:
    """The base model with the settings' step tokens resolved, and embedding rows grown for any that had to be
    added to the tokenizer."""
    added = resolve_step_tokens(tokenizer, settings)
    backbone = load_backbone(path, dtype, attn_implementation, trust_remote_code)
    rows = backbone.get_input_embeddings().weight.shape[0]
    # a tokenizer that already went through resolve_step_tokens (a second model from it) added nothing now,
    # but this model still lacks the rows
    beyond = [t for t in settings.step_tokens if tokenizer.convert_tokens_to_ids(t) >= rows and t not in added]
    if added or beyond:
        grow_embeddings(backbone, tokenizer, added + beyond, step_token_init)
    return backbone


def enable_checkpointing(backbone: nn.Module, kwargs: dict) -> None:
    """Gradient checkpointing with torch checkpoint ``kwargs``: transformers 5.24 names the method
    activation_checkpointing_enable, earlier 5.x releases (5.17 on the GPU image) gradient_checkpointing_enable."""
    enable = getattr(backbone, "activation_checkpointing_enable", None) or backbone.gradient_checkpointing_enable
    enable(kwargs)


def build_training_encoder(config, tokenizer) -> DebaterEncoder:
    """Backbone + LoRA (+ trainable step-token rows when ``train_step_rows``), as the config says."""
    from peft import LoraConfig, PeftModel, get_peft_model

    settings = config.encoding_settings()
    backbone = load_backbone_with_steps(config.model_name_or_path, tokenizer, settings, config.torch_dtype,
                                        config.attn_implementation, config.trust_remote_code, config.step_token_init)
    text_keys = TextKeys()
    if config.gradient_checkpointing:
        enable_checkpointing(backbone, {"use_reentrant": False, "context_fn": text_keys.checkpoint_contexts})
    if config.peft_model_name_or_path:
        restore_step_rows(backbone, Path(config.peft_model_name_or_path))
        model = PeftModel.from_pretrained(backbone, config.peft_model_name_or_path, is_trainable=True)
        if settings.step_tokens and config.train_step_rows and not model.peft_config["default"].trainable_token_indices:
            log.warning("%s trains no step-token rows (an adapter of another document format?): the %d step "
                        "tokens keep their initial embeddings", config.peft_model_name_or_path,
                        len(settings.step_tokens))
    else:
        train_rows = settings.step_tokens and config.train_step_rows
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          init_lora_weights=LORA_INITS[config.lora_init],
                          target_modules=config.lora_target_modules or lora_targets(backbone),
                          trainable_token_indices=tokenizer.convert_tokens_to_ids(settings.step_tokens)
                          if train_rows else None)
        model = get_peft_model(backbone, lora)
    install_keyed_dropout(model, config.seed, text_keys)
    return DebaterEncoder(model, settings, text_keys)


def save_encoder(encoder: DebaterEncoder, tokenizer, out_dir: Path, base_model: str, pooling: str,
                 trust_remote_code: bool = False, instructions: dict[str, list[str]] | None = None,
                 trained: dict | None = None) -> None:
    """Write the PEFT adapter, the step-token rows, the tokenizer (with step tokens) and the encoding settings
    (see ``write_encoder_meta`` for ``instructions`` and ``trained``)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    # the step rows are saved by themselves (trained or not), so the resized embedding need not be saved whole
    encoder.backbone.save_pretrained(out_dir, save_embedding_layers=False)
    if encoder.settings.step_tokens:
        save_file(step_rows(encoder.backbone, encoder.settings, tokenizer), str(out_dir / STEP_ROWS_FILE))
    tokenizer.save_pretrained(out_dir)
    write_encoder_meta(out_dir, encoder.settings, base_model, pooling, trust_remote_code,
                       instructions=instructions if instructions is not None else encoder.instructions,
                       trained=trained)


def write_encoder_meta(out_dir: Path, settings: EncodingSettings, base_model: str, pooling: str,
                       trust_remote_code: bool, merged: bool = False, instructions: dict[str, list[str]] | None = None,
                       trained: dict | None = None) -> None:
    """``debater.json``: what inference needs to encode as training did. ``merged``: the folder holds the
    whole model (LoRA folded in), not an adapter over ``base_model`` (recorded so that it is found from
    anywhere, see model_folder.py). ``instructions``: each training file's query instruction(s), the default
    of search and of the Python API. ``trained``: where the weights came from (run, checkpoint step)."""
    meta = {**base_model_record(base_model, out_dir), "pooling": pooling, "trust_remote_code": trust_remote_code,
            "merged": merged, "settings": settings.to_dict(), "instructions": instructions or {},
            "trained": trained or {}}
    (out_dir / ENCODER_FILE).write_text(json.dumps(meta, indent=2))


def recorded_settings(folder: Path, meta: dict, tokenizer) -> EncodingSettings:
    """The encoding settings a model folder's ``debater.json`` records, refused in one line when they do not
    fit this version or the tokenizer beside them (files of different models mixed in one folder)."""
    from debater.core.config import POOLING_MODES

    where = folder / ENCODER_FILE
    try:
        settings = EncodingSettings(**meta["settings"])
    except (KeyError, TypeError, ValueError) as err:
        raise ModelPathError(f"{where}: its settings are not this version's ({str(err).splitlines()[0]}): export "
                             "the model again with this version") from None
    problem = step_tokens_unusable(tokenizer, settings)
    if meta.get("pooling") not in POOLING_MODES:
        problem = f"pooling {meta.get('pooling')!r} is not one of {POOLING_MODES}"
    if problem:
        raise ModelPathError(f"{where} does not match the model beside it: {problem}; the folder mixes files of "
                             "different exports: export the run again into an empty folder")
    return settings


def load_encoder(path: str, dtype: str = "float32", attn_implementation: str = "sdpa",
                 max_length: int | None = None, trust_remote_code: bool = False,
                 base_model: str | None = None) -> tuple[DebaterEncoder, object, str]:
    """Load an exported adapter (or a training output_dir holding ``adapter/``), a merged export, or a
    plain base model (``trust_remote_code`` is for base models only; exports record their own).
    ``base_model`` replaces the base model an adapter's ``debater.json`` names.

    Returns (encoder in eval mode, tokenizer, pooling). A base model gets the
    default DEBATER formatting with fresh step tokens, i.e. the untrained baseline.
    """
    from transformers import AutoTokenizer

    check_model_path(path)
    folder = Path(path)
    instructions = {}
    if (folder / "adapter" / ENCODER_FILE).exists():
        folder = folder / "adapter"
    if (folder / ENCODER_FILE).exists():
        from peft import PeftModel

        meta = json.loads((folder / ENCODER_FILE).read_text())
        remote = meta.get("trust_remote_code", False)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
        settings = recorded_settings(folder, meta, tokenizer)
        if meta.get("merged"):
            model = load_backbone(str(folder), dtype, attn_implementation, remote)
        else:
            base = resolve_base_model(folder, meta, base_model)
            try:
                backbone = load_backbone(base, dtype, attn_implementation, remote)
            except OSError as err:  # a hub name that is not available (offline, or no such model)
                raise ModelPathError(f"the base model {base} of {folder} could not be loaded "
                                     f"({str(err).splitlines()[0] if str(err) else type(err).__name__}): pass "
                                     f"--base-model PATH, or set 'base_model' in {folder / ENCODER_FILE}") from None
            if len(tokenizer) > backbone.get_input_embeddings().weight.shape[0]:
                backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            restore_step_rows(backbone, folder)
            model = PeftModel.from_pretrained(backbone, folder).merge_and_unload()
        pooling = meta["pooling"]
        instructions = meta.get("instructions", {})
    else:
        settings = EncodingSettings()
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = load_backbone_with_steps(path, tokenizer, settings, dtype, attn_implementation, trust_remote_code)
        pooling = "last_step"
    if max_length:
        settings.query_max_length = settings.doc_max_length = max_length
    encoder = DebaterEncoder(model, settings, instructions=instructions).eval()
    return encoder, tokenizer, pooling
