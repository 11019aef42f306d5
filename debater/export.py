"""Export any training checkpoint as an encoder, without the run that wrote it.

The output has the layout of the end-of-training ``adapter/`` folder (PEFT
adapter, tokenizer with step tokens, ``debater.json``), so ``python -m debater
eval --model OUT`` loads it. With ``merged`` it also holds ``merged/``: the
LoRA and step-token rows folded into a plain Hugging Face model + tokenizer,
for tools that know nothing of PEFT; its own ``debater.json`` (marked
``merged``) lets ``eval``/``encode`` use it with the trained settings too.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from debater import checkpoint
from debater.core.config import TrainConfig
from debater.model import ENCODER_FILE, build_training_encoder, load_encoder, save_encoder, write_encoder_meta

log = logging.getLogger(__name__)
MERGED = "merged"


def run_config(tag_dir: Path) -> TrainConfig:
    """The effective settings the run saved next to its ``checkpoints/`` folder."""
    path = tag_dir.parent.parent / "train_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a checkpoint is exported with the train_config.json of its run")
    try:
        return TrainConfig(**json.loads(path.read_text()))
    except TypeError as err:
        raise ValueError(f"{path} does not match this version's training config ({err})") from None


def export_checkpoint(source: Path, out: Path, merged: bool = False) -> Path:
    """Write the encoder held by ``source`` (a tag folder, or a run's output_dir meaning its latest) to ``out``."""
    from transformers import AutoTokenizer

    tag_dir = checkpoint.find(source)
    config = run_config(tag_dir)
    tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    encoder = build_training_encoder(config, tokenizer)
    weights = checkpoint.trainable_weights(tag_dir)
    missing = sorted(n for n, p in encoder.named_parameters() if p.requires_grad and n not in weights)
    if missing:
        raise ValueError(f"{tag_dir} lacks {len(missing)} trainable weights of this config, e.g. {missing[0]}")
    encoder.load_state_dict(weights, strict=False)
    save_encoder(encoder, tokenizer, out, config.model_name_or_path, config.pooling_mode, config.trust_remote_code)
    log.info("adapter of %s exported to %s", tag_dir, out)
    if merged:
        write_merged(out, config.torch_dtype)
    return out


def write_merged(adapter_dir: Path, dtype: str) -> Path:
    """``adapter_dir/merged``: the adapter (LoRA and step rows) folded into a plain Hugging Face model."""
    meta = json.loads((adapter_dir / ENCODER_FILE).read_text())
    folded, folded_tokenizer, pooling = load_encoder(str(adapter_dir), dtype=dtype)
    folded.backbone.save_pretrained(adapter_dir / MERGED)
    folded_tokenizer.save_pretrained(adapter_dir / MERGED)
    write_encoder_meta(adapter_dir / MERGED, folded.settings, meta["base_model"], pooling,
                       meta.get("trust_remote_code", False), merged=True)
    log.info("merged model written to %s", adapter_dir / MERGED)
    return adapter_dir / MERGED
