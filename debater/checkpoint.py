"""Training checkpoints: trainable weights only, optimizer, scheduler, RNG and data position.

A checkpoint becomes ``latest`` only once every rank has finished writing it:
DeepSpeed's own pointer is written by rank 0 without waiting for the other
ranks, so here every rank writes its files, all ranks meet at a barrier, and
only then rank 0 replaces the ``latest`` file atomically. A crash anywhere
before that leaves the previous checkpoint as ``latest``. Each rank's RNG
state is saved in the tag folder too, because LoRA dropout must replay exactly.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from debater import distributed

log = logging.getLogger(__name__)
TAG_PREFIX = "step-"
LATEST = "latest"
MODEL_STATES = "mp_rank_*_model_states.pt"


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _step_of(tag_dir: Path) -> int:
    return int(tag_dir.name[len(TAG_PREFIX):])


def save(engine, ckpt_dir: Path, step: int, next_batch: int, keep: int) -> Path:
    tag = f"{TAG_PREFIX}{step}"
    tag_dir = ckpt_dir / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), tag_dir / f"rng_rank{distributed.rank()}.pt")
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "next_batch": next_batch},
                           save_latest=False, exclude_frozen_parameters=True)
    distributed.barrier()  # every rank's files are complete before 'latest' may name them
    if distributed.rank() == 0:
        _publish(ckpt_dir, tag)
        _prune(ckpt_dir, keep)
    distributed.barrier()
    return tag_dir


def _publish(ckpt_dir: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` in one atomic rename: readers see the old tag or the new one, never half."""
    pending = ckpt_dir / f".{LATEST}.tmp"
    with open(pending, "w") as handle:
        handle.write(tag)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(pending, ckpt_dir / LATEST)


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints up to ``latest``; ``latest`` itself is never removed, and
    folders past it (an interrupted save, to be overwritten when the run gets there again) are left alone."""
    newest = _step_of(ckpt_dir / (ckpt_dir / LATEST).read_text().strip())
    tags = sorted((p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir() and _step_of(p) <= newest), key=_step_of)
    for old in tags[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def resolve(ckpt_dir: Path, which: str) -> tuple[Path, str]:
    """``which`` is "latest" or a path to a tag folder; returns (checkpoint folder, tag)."""
    if which == LATEST:
        pointer = ckpt_dir / LATEST
        tag = pointer.read_text().strip() if pointer.exists() else ""
        if not tag or not (ckpt_dir / tag).is_dir():
            raise FileNotFoundError(f"'latest' requested but {ckpt_dir} holds no finished checkpoint")
        return ckpt_dir, tag
    path = Path(which)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a checkpoint folder")
    return path.parent, path.name


def find(path: Path) -> Path:
    """The tag folder meant by ``path``: a tag folder itself, or a run's ``checkpoints/`` folder or
    ``output_dir`` (both meaning their ``latest``)."""
    if any(path.glob(MODEL_STATES)):
        return path
    if path.name.startswith(TAG_PREFIX):
        raise FileNotFoundError(f"{path} holds no {MODEL_STATES}: not a saved checkpoint (pruned by save_total_limit?)")
    folder = path if (path / LATEST).exists() else path / "checkpoints"
    ckpt_dir, tag = resolve(folder, LATEST)
    return ckpt_dir / tag


def trainable_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The module weights a checkpoint holds (the trainable ones: frozen weights are not saved)."""
    files = sorted(tag_dir.glob(MODEL_STATES))
    if len(files) != 1:
        raise FileNotFoundError(f"{tag_dir} should hold one {MODEL_STATES} file, found {len(files)}")
    return torch.load(files[0], map_location="cpu", weights_only=False)["module"]


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names and raw bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load(engine, ckpt_dir: Path, which: str) -> tuple[int, int]:
    """Restore everything; returns (steps done, next batch index)."""
    folder, tag = resolve(ckpt_dir, which)
    path, client = engine.load_checkpoint(str(folder), tag=tag, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"could not load checkpoint {folder / tag}")
    rng_file = folder / tag / f"rng_rank{distributed.rank()}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("%s has no RNG state for rank %d (saved with another world size?)", tag, distributed.rank())
    log.info("resumed from %s at step %d", folder / tag, client["step"])
    return client["step"], client["next_batch"]
