"""What a training ``output_dir`` already holds, and whether a new run may write there.

Training again into a folder that holds a run would mix two runs without a word: a new adapter beside the old
checkpoints, ``latest`` moved back while later checkpoints stay, both runs' curves in one TensorBoard folder.
So a run starts only in a folder without one, resumes it (``resume_from_checkpoint``), or first removes it
(``overwrite_output_dir``). Every rank makes these checks from the files alone, before anything is loaded
or written, so they all decide the same and a refusal costs no model load; only rank 0 removes files.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from debater.core.config import TrainConfig
from debater.core.errors import UserError

log = logging.getLogger(__name__)
TAG_PREFIX = "step-"  # checkpoint folders: step-N
LATEST = "latest"  # the file naming the newest finished checkpoint
BATCH_PLAN = "batch_plan.json"
WEIGHTS_BY_RANK = "weights_by_rank.json"
# what a training run writes into its output_dir; ``preprocessed/`` is a cache keyed by its inputs and stays
RUN_FILES = ("checkpoints", "tensorboard", "adapter", "train_config.json", "ds_config.json", BATCH_PLAN,
             WEIGHTS_BY_RANK)


class RunFolderError(UserError, ValueError):
    """A run that cannot start in its output_dir as configured; every rank finds it the same way."""

    same_on_every_rank = True


def previous_run(output_dir: Path) -> list[str]:
    """The files of an earlier run in ``output_dir`` (empty folders do not count)."""
    return [name for name in RUN_FILES
            if (output_dir / name).is_file() or ((output_dir / name).is_dir() and any((output_dir / name).iterdir()))]


def latest_step(output_dir: Path) -> int | None:
    """The step of the run's published checkpoint, or None."""
    pointer = output_dir / "checkpoints" / LATEST
    tag = pointer.read_text().strip() if pointer.is_file() else ""
    return int(tag[len(TAG_PREFIX):]) if tag.startswith(TAG_PREFIX) and tag[len(TAG_PREFIX):].isdigit() else None


def planned_steps(output_dir: Path, config: TrainConfig, world: int) -> int | None:
    """The steps this config trains on the earlier run's batch plan, when that plan is for the same global batch
    (another one cannot resume, and the resume says so)."""
    plan_file = output_dir / BATCH_PLAN
    if not plan_file.is_file():
        return None
    plan = json.loads(plan_file.read_text())
    if plan.get("global_batch") != config.per_device_train_batch_size * world:
        return None
    return min(plan["batches"], config.stop_after_n_steps or plan["batches"])


def check_inputs(config: TrainConfig) -> None:
    """A missing dataset or local model is named now, by its key, before anything is loaded or written."""
    data = Path(config.dataset_file_path)
    if not data.exists():
        raise RunFolderError(f"dataset_file_path: {data} does not exist (relative paths are read from {Path.cwd()}): "
                             "point it at an echo-data folder of .jsonl files or at a folder written by "
                             "`make preprocess`")
    model = config.model_name_or_path
    looks_local = model.startswith(("/", ".", "~")) or model.count("/") > 1  # a hub name is "org/name"
    if looks_local and not Path(model).expanduser().exists():
        raise RunFolderError(f"model_name_or_path: {model} does not exist (relative paths are read from "
                             f"{Path.cwd()}): point it at a Hugging Face model folder or a hub name")


def prepare_output_dir(config: TrainConfig, rank: int, world: int) -> bool:
    """Decide what the run does with its output_dir: False when the run there is already finished (nothing to
    do), True to train. Refuses, with the choices, to start over an earlier run unless told to replace it."""
    output_dir = Path(config.output_dir)
    found = previous_run(output_dir)
    if not found:
        return True
    step = latest_step(output_dir)
    if config.resume_from_checkpoint:
        if config.overwrite_output_dir:
            log.info("resume_from_checkpoint is set: resuming, overwrite_output_dir ignored")
        planned = planned_steps(output_dir, config, world)
        if (config.resume_from_checkpoint == LATEST and step is not None and planned is not None
                and step >= planned and (output_dir / "adapter").is_dir()):
            log.info("%s holds a finished run (step %d of %d, adapter in %s): nothing to train. To train further "
                     "raise stop_after_n_steps; to train again set overwrite_output_dir=true or use a new "
                     "output_dir", output_dir, step, planned, output_dir / "adapter")
            return False
        return True
    if config.overwrite_output_dir:
        if rank == 0:
            log.info("overwrite_output_dir: removing the earlier run in %s (%s)", output_dir, ", ".join(found))
            for name in found:
                path = output_dir / name
                shutil.rmtree(path) if path.is_dir() else os.unlink(path)
        return True
    held = f"checkpoints up to step {step}" if step is not None else ", ".join(found)
    raise RunFolderError(f"output_dir {output_dir} already holds a run ({held}): resume it with --set "
                         "resume_from_checkpoint=latest, train into a new output_dir, or replace it with --set "
                         "overwrite_output_dir=true (through make: TRAIN_ARGS=\"--set KEY=VALUE\")")
