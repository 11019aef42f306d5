"""Export any training checkpoint as an encoder, without the run that wrote it.

The output has the layout of the end-of-training ``adapter/`` folder (PEFT
adapter, tokenizer with step tokens, ``debater.json``), so ``python -m debater
eval --model OUT`` loads it. With ``merged`` it also holds ``merged/``: the
LoRA and step-token rows folded into a plain Hugging Face model + tokenizer,
for tools that know nothing of PEFT; its own ``debater.json`` (marked
``merged``) lets ``eval``/``encode`` use it with the trained settings too.
With ``sentence_transformers`` it holds ``sentence-transformers/`` as well
(see st_export.py). An export replaces everything ``out`` held before, so no
part of it can be left from another checkpoint; ``debater.json`` records the
run and step it came from.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from debater import checkpoint
from debater.core.config import TrainConfig
from debater.core.errors import UserError
from debater.model import build_training_encoder, load_encoder, save_encoder, write_encoder_meta
from debater.model_card import write_model_cards
from debater.model_folder import ENCODER_FILE, RUN_INSTRUCTIONS, resolve_base_model

log = logging.getLogger(__name__)
MERGED = "merged"


class ExportError(UserError, ValueError):
    """An export that would destroy something other than an earlier export."""


def run_config(tag_dir: Path) -> TrainConfig:
    """The effective settings the run saved next to its ``checkpoints/`` folder."""
    path = tag_dir.parent.parent / "train_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a checkpoint is exported with the train_config.json of its run")
    try:
        return TrainConfig(**json.loads(path.read_text()))
    except TypeError as err:
        raise ValueError(f"{path} does not match this version's training config ({err})") from None


def run_instructions(run_dir: Path) -> dict[str, list[str]]:
    """The query instruction(s) of each training file, as the run recorded them (none for older runs)."""
    path = run_dir / RUN_INSTRUCTIONS
    return json.loads(path.read_text()) if path.exists() else {}


def export_checkpoint(source: Path, out: Path, merged: bool = False, sentence_transformers: bool = False) -> Path:
    """Write the encoder held by ``source`` (a tag folder, or a run's output_dir meaning its latest) to ``out``,
    replacing whatever ``out`` held."""
    from transformers import AutoTokenizer

    if not source.exists():
        raise FileNotFoundError(f"checkpoint folder {source} does not exist: pass a run's output_dir or one of its "
                                "checkpoints/step-N folders")
    tag_dir = checkpoint.find(source)
    check_replaceable(out, tag_dir)
    config = run_config(tag_dir)
    tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    encoder = build_training_encoder(config, tokenizer)
    weights = checkpoint.trainable_weights(tag_dir)
    missing = sorted(n for n, p in encoder.named_parameters() if p.requires_grad and n not in weights)
    if missing:
        raise ValueError(f"{tag_dir} lacks {len(missing)} trainable weights of this config, e.g. {missing[0]}")
    encoder.load_state_dict(weights, strict=False)
    run_dir = tag_dir.parent.parent
    trained = {"run": str(run_dir.resolve()), "checkpoint": str(tag_dir.resolve()),
               "checkpoint_step": checkpoint.step_of(tag_dir)}
    out.parent.mkdir(parents=True, exist_ok=True)
    # written beside ``out`` (so relative paths recorded in it hold once renamed), then swapped in
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        save_encoder(encoder, tokenizer, staging, config.model_name_or_path, config.pooling_mode,
                     config.trust_remote_code, run_instructions(run_dir), trained)
        if merged or sentence_transformers:
            write_merged(staging, config.torch_dtype)
        st_folder = None
        if sentence_transformers:
            from debater.st_export import write_sentence_transformers

            st_folder = write_sentence_transformers(staging)
        write_model_cards(staging, config.to_dict(), run_dir, st_folder)
        if out.exists():
            log.info("replacing the earlier export in %s", out)
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("step %d of %s exported to %s", trained["checkpoint_step"], run_dir, out)
    return out


def check_replaceable(out: Path, tag_dir: Path) -> None:
    """``out`` may be new, empty or an earlier export (replaced whole); anything else would be deleted by
    mistake (a run folder, the checkout), so it is refused before any work."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir() or not (out / ENCODER_FILE).exists():
        raise ExportError(f"{out} exists and is not an earlier export (no {ENCODER_FILE}), so it is not replaced: "
                              "pass a new or empty folder as the export's OUT")
    if tag_dir.resolve().is_relative_to(out.resolve()) or Path.cwd().resolve().is_relative_to(out.resolve()):
        raise ExportError(f"{out} holds the checkpoint or the working directory: export to another folder")


def write_merged(adapter_dir: Path, dtype: str) -> Path:
    """``adapter_dir/merged``: the adapter (LoRA and step rows) folded into a plain Hugging Face model."""
    meta = json.loads((adapter_dir / ENCODER_FILE).read_text())
    folded, folded_tokenizer, pooling = load_encoder(str(adapter_dir), dtype=dtype)
    folded.backbone.save_pretrained(adapter_dir / MERGED)
    folded_tokenizer.save_pretrained(adapter_dir / MERGED)
    write_encoder_meta(adapter_dir / MERGED, folded.settings, resolve_base_model(adapter_dir, meta), pooling,
                       meta.get("trust_remote_code", False), merged=True, instructions=meta["instructions"],
                       trained=meta["trained"])
    log.debug("merged model written to %s", adapter_dir / MERGED)
    return adapter_dir / MERGED
