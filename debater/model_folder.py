"""What a ``--model`` path is, and where an adapter's base model lives, wherever the folder is used from.

An adapter folder (``debater.json`` beside a PEFT adapter) names its base model three ways: relative to the
folder itself (so a copied checkout or a moved pair of folders still works), absolute (so the adapter folder
alone can move), and by its hub name when it was given as one. A path that is a training checkpoint or does
not exist is refused here with one line saying what to do, before transformers turns it into a hub lookup.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from debater.beir import DEFAULT_INSTRUCTION
from debater.checkpoint import LATEST, MODEL_STATES
from debater.core.errors import UserError

ENCODER_FILE = "debater.json"
RUN_INSTRUCTIONS = "instructions.json"  # in a training output_dir: the query instruction(s) of each training file
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelPathError(UserError, FileNotFoundError):
    """A model path that cannot be loaded as given; the message says why and what to pass instead."""


def is_hub_id(name: str) -> bool:
    """``name`` has the shape of a Hugging Face hub id (``repo`` or ``namespace/repo``)."""
    return bool(HUB_ID.match(name)) and not name.startswith(".")


def base_model_record(base_model: str, out_dir: Path) -> dict:
    """The ``debater.json`` entries naming ``base_model`` for a folder written at ``out_dir``."""
    folder = Path(base_model)
    if not folder.is_dir():
        return {"base_model": base_model, "base_model_hub": base_model if is_hub_id(base_model) else None}
    absolute = folder.resolve()
    return {"base_model": os.path.relpath(absolute, out_dir.resolve()), "base_model_absolute": str(absolute),
            "base_model_hub": None}


def resolve_base_model(folder: Path, meta: dict, override: str | None = None) -> str:
    """The base model of the adapter in ``folder``: ``override`` when given, else the first recorded place
    that exists (relative to the folder, absolute, relative to the working directory as older exports wrote
    it), else its hub name; otherwise a one-line error naming what was tried."""
    if override:
        if not Path(override).is_dir() and not is_hub_id(override):
            raise ModelPathError(f"--base-model {override}: no such folder")
        return override
    recorded = meta["base_model"]
    candidates = [folder / recorded, meta.get("base_model_absolute"), recorded]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return str(candidate)
    if meta.get("base_model_hub"):
        return meta["base_model_hub"]
    tried = ", ".join(dict.fromkeys(str(c) for c in candidates if c))
    raise ModelPathError(f"the base model of {folder} was not found (tried {tried}): pass --base-model PATH, or "
                         f"set 'base_model' in {folder / ENCODER_FILE} to its folder")


def default_instruction(instructions: dict[str, list[str]]) -> str:
    """The query instruction of a model whose training files agree on one (its debater.json's
    ``instructions``), else the generic one."""
    distinct = {text for options in instructions.values() for text in options}
    return distinct.pop() if len(distinct) == 1 else DEFAULT_INSTRUCTION


def check_model_path(path: str) -> None:
    """Refuse a training checkpoint (it must be exported first) and a local path that does not exist."""
    folder = Path(path)
    export_hint = f"export it first: `make export CKPT={path} OUT=DIR` (python -m debater export --checkpoint " \
                  f"{path} --out DIR), then use DIR"
    if folder.is_dir():
        if any(folder.glob(MODEL_STATES)) or (folder / LATEST).is_file():
            raise ModelPathError(f"{path} is a training checkpoint, not a model: {export_hint}")
        if (folder / "checkpoints").is_dir() and not (folder / "adapter" / ENCODER_FILE).exists():
            raise ModelPathError(f"{path} is a training run without an adapter/ (it did not finish): {export_hint}")
        return
    if folder.exists():
        raise ModelPathError(f"model {path} is a file: pass a model folder, a training output_dir or an adapter "
                             "folder")
    if not is_hub_id(path) or Path(path.split("/")[0]).is_dir():
        raise ModelPathError(f"model folder {path} does not exist (relative paths start at {Path.cwd()}): pass "
                             "a model folder, a training output_dir or an adapter folder")
