"""TensorBoard and console logging, on rank 0 only."""
from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

import torch

from debater import distributed

log = logging.getLogger(__name__)


def peak_memory_mb(device: torch.device) -> float:
    """This rank's peak so far: allocated GPU memory on CUDA, the process's resident set elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


LOGGED_MEANS = ("loss/total", "loss/contrastive", "loss/distillation", "train/in_batch_top1")


class MetricsWindow:
    """What the trainer logs, averaged over the steps since the last log: loss parts and in-batch top-1
    (means over ranks), throughput in real tokens (padding excluded) and the views that won."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.best_views: list[torch.Tensor] = []
        self.tokens = self.slots = 0.0
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, batch: dict[str, torch.Tensor], parts) -> float:
        """Record one step (one all-reduce for every value); returns the loss averaged over ranks."""
        real = (batch["query_mask"].sum() + batch["doc_mask"].sum()).float()
        slots = real.new_tensor(batch["query_mask"].numel() + batch["doc_mask"].numel())
        stats = distributed.mean_over_ranks(torch.stack(
            [parts.total.detach(), parts.contrastive.detach(), parts.distillation.detach(), parts.accuracy,
             real, slots])).tolist()
        for name, value in zip(LOGGED_MEANS, stats):
            self.sums[name] = self.sums.get(name, 0.0) + value
        world = distributed.world_size()
        self.best_views.append(distributed.gather_values(parts.best_view))
        self.tokens += stats[4] * world
        self.slots += stats[5] * world
        self.samples += batch["query_mask"].shape[0] * world
        return stats[0]

    def values(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        values = {name: total / len(self.best_views) for name, total in self.sums.items()}
        values.update({"speed/tokens_per_s": self.tokens / elapsed, "speed/samples_per_s": self.samples / elapsed,
                       "data/padding_fraction": 1.0 - self.tokens / self.slots})
        return values


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
