"""Shared by the benchmarks that measure training runs launched as ``make train`` launches them: the demo config in the
paper's document format, trained from scratch, read back from its TensorBoard log."""
from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from benchmarks.ablation import TRAIN_DATA, demo_config, start_training
from benchmarks.common import free_port, tensorboard_scalars


def paper_format_config(run: Path, batch: int, length: int, steps: int, extra: dict) -> dict:
    """The demo config in the paper's document format (full loss), ``batch`` queries per device."""
    return demo_config({"output_dir": str(run), "dataset_file_path": TRAIN_DATA, "loss_variant": "full",
                        "per_device_train_batch_size": batch, "max_seq_length": length, "query_max_length": length,
                        "stop_after_n_steps": steps, "logging_steps": 1, "save_steps": steps, **extra})


def after_first_step(values: dict[int, float]) -> float:
    """The median of a per-step scalar over the steps after the first (which warms up), or over all if one."""
    return statistics.median([v for step, v in values.items() if step > 1] or list(values.values()))


def measure(run: Path, config: dict, nproc: int, env: dict | None = None) -> dict:
    """Train from scratch (``env`` added to the launch's environment); rank 0's peak memory (MB), the seconds per
    step after the first (the global batch over the trainer's logged samples/s) and the real (non-pad) tokens/s
    of all ranks. A run that fails (out of memory, say) is recorded as such."""
    shutil.rmtree(run, ignore_errors=True)
    code = start_training(config, nproc, free_port(), env).wait()
    if code != 0:
        return {"error": f"training exited {code} (-9: killed, e.g. out of memory); see {run.parent / run.name}.log"}
    global_batch = config["per_device_train_batch_size"] * nproc
    return {"peak_mb": round(max(tensorboard_scalars(run, "memory/peak_mb").values())),
            "s_per_step": round(global_batch / after_first_step(tensorboard_scalars(run, "speed/samples_per_s")), 2),
            "tokens_per_s": round(after_first_step(tensorboard_scalars(run, "speed/tokens_per_s")), 1)}
