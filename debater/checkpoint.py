"""Training checkpoints: trainable weights only, optimizer, scheduler, RNG and data position.

A checkpoint becomes ``latest`` only once every rank has finished writing it:
DeepSpeed's own pointer is written by rank 0 without waiting for the other
ranks, so here every rank writes its files, all ranks meet at a barrier, and
only then rank 0 replaces the ``latest`` file atomically. A crash anywhere
before that leaves the previous checkpoint as ``latest``. Each rank's RNG
state is saved in the tag folder too.

DeepSpeed's ZeRO-2 files shard the optimizer by rank, and its loader refuses them
on another number of ranks. Every checkpoint therefore also holds
``trainable_state.pt``: each trainable parameter whole, in fp32, with its Adam
moments, the optimizer step count and the scheduler (small: LoRA and step rows).
A resume on another world size restores from it instead, at the same global
batch (the batch plan does not depend on the world size, and LoRA dropout masks
are keyed by text, so the continued run is the uninterrupted one).
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
from debater.core.errors import UserError
from debater.run_folder import LATEST, TAG_PREFIX

log = logging.getLogger(__name__)
MODEL_STATES = "mp_rank_*_model_states.pt"
PORTABLE_STATE = "trainable_state.pt"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be resumed as asked; the message says why and what to do."""

    same_on_every_rank = True


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def step_of(tag_dir: Path) -> int:
    return int(tag_dir.name[len(TAG_PREFIX):])


def save(engine, ckpt_dir: Path, step: int, next_batch: int, keep: int, global_batch: int) -> Path:
    tag = f"{TAG_PREFIX}{step}"
    tag_dir = ckpt_dir / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), tag_dir / f"rng_rank{distributed.rank()}.pt")
    client = {"step": step, "next_batch": next_batch, "global_batch": global_batch}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False,
                           exclude_frozen_parameters=True)
    portable = {**_portable_state(engine), "client": client}  # a collective: every rank gathers
    if distributed.rank() == 0:
        torch.save(portable, tag_dir / PORTABLE_STATE)
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
    newest = step_of(ckpt_dir / (ckpt_dir / LATEST).read_text().strip())
    tags = sorted((p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir() and step_of(p) <= newest), key=step_of)
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


def load(engine, ckpt_dir: Path, which: str, global_batch: int) -> tuple[int, int]:
    """Restore everything; returns (steps done, next batch index). On the world size it was saved with,
    through DeepSpeed's own files; on another one, from the portable state (same global batch only)."""
    folder, tag = resolve(ckpt_dir, which)
    portable_file = folder / tag / PORTABLE_STATE
    portable = torch.load(portable_file, map_location="cpu", weights_only=False) if portable_file.exists() else None
    saved_batch = portable["client"]["global_batch"] if portable else None
    if saved_batch is not None and saved_batch != global_batch:
        raise CheckpointError(f"{folder / tag} was trained with a global batch of {saved_batch} and this run has "
                              f"{global_batch}: the batch plan (which rows form each step) depends on it, so the "
                              "run cannot continue where it stopped. Set per_device_train_batch_size so that "
                              f"per-device batch x ranks = {saved_batch}, or start a new run")
    if portable is not None and portable["world_size"] != distributed.world_size():
        _restore_portable(engine, portable)
        client = portable["client"]
        log.info("resumed from %s (saved on %d ranks) on %d ranks at step %d", folder / tag, portable["world_size"],
                 distributed.world_size(), client["step"])
    else:
        path, client = engine.load_checkpoint(str(folder), tag=tag, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"could not load checkpoint {folder / tag}")
        log.info("resumed from %s at step %d", folder / tag, client["step"])
    rng_file = folder / tag / f"rng_rank{distributed.rank()}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:  # LoRA dropout is keyed by text, so only other random ops (none in the models supported) would differ
        log.info("%s has no RNG state for rank %d (saved on fewer ranks); keeping this rank's seed", tag,
                 distributed.rank(), extra={"own": True})
    return client["step"], client["next_batch"]


def _portable_state(engine) -> dict:
    """The trainable state whole, whatever the number of ranks: each trainable parameter in fp32 with its Adam
    moments (gathered from the ZeRO partitions, a collective), the optimizer step count and the scheduler."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            params[name] = {"fp32": safe_get_full_fp32_param(param).cpu(),
                            **{key: safe_get_full_optimizer_state(param, key).cpu() for key in ADAM_MOMENTS}}
    steps = [state["step"] for state in engine.optimizer.optimizer.state.values() if "step" in state]
    return {"world_size": distributed.world_size(), "params": params,
            "optimizer_step": steps[0].clone() if steps else None, "scheduler": engine.lr_scheduler.state_dict(),
            "global_steps": engine.global_steps}


def create_adam_state(engine) -> None:
    """Before its first step the optimizer holds no Adam state (torch creates it lazily) and ZeRO has not yet
    linked each parameter to its fragment of it: create both, as the first step would. Done before a fresh
    run's first step too: after that step ZeRO links every group once, when torch has created the state of
    the first group only (DeepSpeed 0.19), so with two groups (LoRA+) the second would never be linked and
    could not be checkpointed. (A run resumed through DeepSpeed's own files has every group's state loaded
    before its first step links them.)"""
    inner = engine.optimizer.optimizer
    for group in inner.param_groups:
        for flat in group["params"]:
            state = inner.state[flat]
            if not state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat),
                             exp_avg_sq=torch.zeros_like(flat))
    engine.optimizer._lazy_init_hp_params_optimizer_state()


def _restore_portable(engine, portable: dict) -> None:
    """Write a portable state into this engine's partitions: fp32 masters, Adam moments, the step count, the
    module's own (possibly bf16) copy of each weight, the scheduler and the learning rate it had set."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    trainable = {name: p for name, p in engine.module.named_parameters() if p.requires_grad}
    if trainable.keys() != portable["params"].keys():
        missing = sorted(trainable.keys() ^ portable["params"].keys())[:3]
        raise CheckpointError(f"the checkpoint's trainable parameters differ from this model's (e.g. {missing}): "
                              "resume with the config it was trained with")
    create_adam_state(engine)
    with torch.no_grad():
        for name, param in trainable.items():
            saved = portable["params"][name]
            param.copy_(saved["fp32"].to(param.device, param.dtype))
            safe_set_full_fp32_param(param, saved["fp32"].to(param.device))
            for key in ADAM_MOMENTS:
                safe_set_full_optimizer_state(param, saved[key].to(param.device), key)
    if portable["optimizer_step"] is not None:
        for state in engine.optimizer.optimizer.state.values():
            if "step" in state:
                state["step"] = portable["optimizer_step"].clone().to(state["step"].device)
    engine.lr_scheduler.load_state_dict(portable["scheduler"])
    for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = portable["global_steps"]
