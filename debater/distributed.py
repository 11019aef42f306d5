"""The one module that talks to ``torch.distributed``.

``gather_with_grad`` concatenates a tensor from every rank in rank order. Its
backward sums the incoming gradients over ranks before taking this rank's
slice: each rank's loss covers only its own queries, so the gradient reaching
rank r's embeddings is the sum over every rank's loss. After DeepSpeed
averages parameter gradients over W ranks, the result equals the gradient of
the mean loss over the whole global batch, as one process would compute it.
"""
from __future__ import annotations

import contextlib
import io
import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.local_size = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # never reduce in place: autograd may share this tensor
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.local_size
        return grad[start:start + ctx.local_size]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' ``tensor`` concatenated along dim 0 (equal sizes), differentiable."""
    if world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Average of a detached value over ranks, for logging."""
    value = value.detach().clone().float()
    if world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world_size()
    return value


def max_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of a small integer tensor over ranks: any rank's flag, seen by every rank."""
    values = values.detach().clone()
    if world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def gather_values(value: torch.Tensor) -> torch.Tensor:
    """Concatenate a detached tensor from every rank (equal sizes), for logging."""
    if world_size() == 1:
        return value.detach()
    parts = [torch.empty_like(value) for _ in range(world_size())]
    dist.all_gather(parts, value.detach().contiguous())
    return torch.cat(parts)


def init_deepspeed() -> None:
    """``deepspeed.init_distributed()`` without DeepSpeed's shared-memory all-reduce op, and with the line each
    rank prints about its communication op sent to the debug log.

    On the CPU accelerator DeepSpeed compiles that op (~70 s of g++ on a 2-core machine, the first run on a
    fresh machine) and maps 64 MiB of /dev/shm per rank that it never unlinks, for ``inference_all_reduce``
    alone, which training never calls: gradients go through torch.distributed's all-reduce either way.
    Marking the op incompatible (DeepSpeed reads its ``__compatible_ops__`` before building any op) skips
    both; on GPUs DeepSpeed has no such op to skip."""
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        deepspeed.init_distributed()
    for line in printed.getvalue().splitlines():
        log.debug("deepspeed: %s", line)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Tear the process group down before the interpreter does: left to exit-time destructors, a rank
    sometimes aborted ("terminate called without an active exception", exit -6) after a finished run."""
    if is_distributed():
        dist.destroy_process_group()
