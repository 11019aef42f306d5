"""What every benchmark result records: the machine, the command, and where it is written."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path


def machine_description() -> str:
    """CPU model and core count (and the GPU when there is one), for the report."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    import torch

    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def command_line() -> str:
    """The command that reproduces this run."""
    return shlex.join([Path(sys.executable).name, "-m", sys.modules["__main__"].__spec__.name, *sys.argv[1:]])


def write_result(result: dict, out: Path | None) -> None:
    """Add machine and command, print one summary line, save the JSON when asked."""
    result = {**result, "machine": machine_description(), "command": command_line()}
    print(result["summary"])
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


def tensorboard_scalars(run: Path, tag: str) -> dict[int, float]:
    """step -> value of one scalar over every event file of a run's ``tensorboard/`` (a resumed run has several)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events_file in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        events = EventAccumulator(str(events_file), size_guidance={"scalars": 0}).Reload()
        if tag in events.Tags()["scalars"]:
            values.update({e.step: e.value for e in events.Scalars(tag)})
    return values
