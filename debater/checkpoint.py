"""Training checkpoints: trainable weights only, optimizer, scheduler, RNG and data position.

DeepSpeed writes the tag folder first and the ``latest`` pointer last, so an
interrupted save never becomes ``latest``. Each rank's RNG state is saved in
the tag folder before that, because LoRA dropout must replay exactly.
"""
from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from debater import distributed

log = logging.getLogger(__name__)
TAG_PREFIX = "step-"


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(engine, ckpt_dir: Path, step: int, next_batch: int, keep: int) -> Path:
    tag = f"{TAG_PREFIX}{step}"
    tag_dir = ckpt_dir / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), tag_dir / f"rng_rank{distributed.rank()}.pt")
    distributed.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "next_batch": next_batch},
                           exclude_frozen_parameters=True)
    if distributed.rank() == 0:
        _prune(ckpt_dir, keep)
    distributed.barrier()
    return tag_dir


def _prune(ckpt_dir: Path, keep: int) -> None:
    tags = sorted((p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir()),
                  key=lambda p: int(p.name[len(TAG_PREFIX):]))
    for old in tags[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def resolve(ckpt_dir: Path, which: str) -> tuple[Path, str]:
    """``which`` is "latest" or a path to a tag folder; returns (checkpoint folder, tag)."""
    if which == "latest":
        pointer = ckpt_dir / "latest"
        if not pointer.exists():
            raise FileNotFoundError(f"resume_from_checkpoint=latest but {ckpt_dir} holds no finished checkpoint")
        return ckpt_dir, pointer.read_text().strip()
    path = Path(which)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a checkpoint folder")
    return path.parent, path.name


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
