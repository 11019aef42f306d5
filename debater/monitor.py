"""TensorBoard and console logging, on rank 0 only."""
from __future__ import annotations

import logging
import resource
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def peak_memory_mb(device: torch.device) -> float:
    """This rank's peak so far: allocated GPU memory on CUDA, the process's resident set elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Monitor:
    def __init__(self, output_dir: Path, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        log.info("step %d: %s", step, "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in values.items()))

    def histogram(self, step: int, name: str, values: torch.Tensor, bins: int) -> None:
        if self.writer is not None and values.numel():
            self.writer.add_histogram(name, values.float(), step, bins=torch.arange(bins + 1).float().numpy() - 0.5)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
