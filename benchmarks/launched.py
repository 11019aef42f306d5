"""Shared by the benchmarks that measure training runs launched as ``make train`` launches them: the demo config in the
paper's document format, trained from scratch, read back from its TensorBoard log."""
from __future__ import annotations

import shutil
import socket
import statistics
from pathlib import Path

from benchmarks.ablation import TRAIN_DATA, demo_config, start_training
from benchmarks.common import tensorboard_scalars


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def paper_format_config(run: Path, batch: int, length: int, steps: int, extra: dict) -> dict:
    """The demo config in the paper's document format (full loss), ``batch`` queries per device."""
    return demo_config({"output_dir": str(run), "dataset_file_path": TRAIN_DATA, "loss_variant": "full",
                        "per_device_train_batch_size": batch, "max_seq_length": length, "query_max_length": length,
                        "stop_after_n_steps": steps, "logging_steps": 1, "save_steps": steps, **extra})


def measure(run: Path, config: dict, nproc: int) -> dict:
    """Train from scratch; rank 0's peak memory (MB) and the seconds per step after the first (the global
    batch over the trainer's logged samples/s). A run that fails (out of memory, say) is recorded as such."""
    shutil.rmtree(run, ignore_errors=True)
    code = start_training(config, nproc, free_port()).wait()
    if code != 0:
        return {"error": f"training exited {code} (-9: killed, e.g. out of memory); see {run.parent / run.name}.log"}
    samples_per_s = tensorboard_scalars(run, "speed/samples_per_s")
    timed = [v for step, v in samples_per_s.items() if step > 1] or list(samples_per_s.values())
    global_batch = config["per_device_train_batch_size"] * nproc
    return {"peak_mb": round(max(tensorboard_scalars(run, "memory/peak_mb").values())),
            "s_per_step": round(global_batch / statistics.median(timed), 2)}
