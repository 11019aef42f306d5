"""What every benchmark shares: its command line (``--model``, ``--out``), and what its result records (the
machine, the model, the command) and where it is written.

Output: ``--out`` names the result, by default ``runs/bench/NAME``; the result JSON is ``OUT.json`` and a
benchmark that keeps runs of its own puts them in the folder ``OUT/``."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from debater.core.cli_support import EMBEDDED_MODEL

BENCH_DIR = Path("runs/bench")


def benchmark_parser(name: str, doc: str, model: bool = True) -> argparse.ArgumentParser:
    """The parser every benchmark starts from: ``python -m benchmarks NAME``, its docstring as description,
    ``--out`` (default ``runs/bench/NAME``) and, when it loads a model, ``--model`` (default the embedded one)."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if model:
        parser.add_argument("--model", default=EMBEDDED_MODEL, help="model folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / name,
                        help="the result is OUT.json; runs of its own, if any, go under OUT/ (default: %(default)s)")
    return parser


def free_port() -> int:
    """A port the system has free now: each launched run's rendezvous gets its own, so benchmarks (or two
    of one) can train side by side."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    """The command that reproduces this run (``python -m benchmarks NAME ...``)."""
    return shlex.join([Path(sys.executable).name, "-m", sys.modules["__main__"].__spec__.parent, *sys.argv[1:]])


def write_result(result: dict, out: Path, model: str | None = None) -> Path:
    """Add the machine, the model (when the benchmark has one) and the command, print the one-line summary,
    save the JSON as ``OUT.json``; returns that path."""
    result = {**result, **({"model": model} if model is not None else {}), "machine": machine_description(),
              "command": command_line()}
    print(result["summary"])
    path = out.parent / f"{out.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def tensorboard_scalars(run: Path, tag: str) -> dict[int, float]:
    """step -> value of one scalar over every event file of a run's ``tensorboard/`` (a resumed run has several)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events_file in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        events = EventAccumulator(str(events_file), size_guidance={"scalars": 0}).Reload()
        if tag in events.Tags()["scalars"]:
            values.update({e.step: e.value for e in events.Scalars(tag)})
    return values


def peak_of_process(pid: int) -> int:
    """A live process's own resident-set high-water mark in bytes (VmHWM; 0 when unreadable). It starts afresh
    at exec, unlike getrusage's ru_maxrss, which keeps the forking parent's size."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def measured_run(command: list[str]) -> tuple[float, float, str]:
    """Run ``command``: (its peak memory in MiB; its wall seconds; its stdout). The peak is the summed RSS of it
    and all its children, sampled every 50 ms, or, when higher, the high-water mark of its largest single
    process, which holds a spike shorter than the sampling. Its stderr is dropped unless it fails."""
    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        parent, peak = psutil.Process(process.pid), 0
        while process.poll() is None:
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()),
                           *(peak_of_process(p.pid) for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if process.returncode:
            raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}: {err.read()[-2000:]}")
        return peak / 2**20, seconds, out.read()
