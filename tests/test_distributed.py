"""Invariant 3: W ranks with gathered candidates give the loss and gradients of one process on the global batch.

Each rank encodes its slice of a global batch with a small shared "encoder", gathers positives and
negatives with ``gather_with_grad`` (all positives then all negatives, rank order), computes
``TrainingStep.loss`` (``debater_loss``) on its own queries (label of local query i on rank r = r * B_local + i) and runs
backward. Parameter gradients averaged over ranks (all_reduce SUM / W, as DeepSpeed does) must equal
the gradient of the single-process loss; the mean of the local losses must equal the global loss.
A gather whose backward does not sum over ranks (a plain all_gather) must give a different gradient.
"""
from __future__ import annotations

import datetime
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from debater import distributed
from debater.diagnostics import batch_diagnostics
from debater.losses import VARIANTS, debater_loss
from debater.training_step import TrainingStep

B_LOCAL, NEGS, FEAT, DIM = 3, 2, 6, 5
VIEWS = {"vanilla": 1, "sd_only": 3, "cod_only": 3, "full": 3}
SCALE, W_C, W_T = 20.0, 0.4, 0.8


class TinyEncoder(torch.nn.Module):
    """Queries and document views share parameters, like the real encoder (one backbone)."""

    def __init__(self, num_views: int):
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.proj = torch.nn.Parameter(torch.randn(FEAT, DIM, generator=gen, dtype=torch.float64))
        self.steps = torch.nn.Parameter(torch.randn(num_views, FEAT, generator=gen, dtype=torch.float64))
        self.query_bias = torch.nn.Parameter(torch.randn(DIM, generator=gen, dtype=torch.float64))

    def queries(self, x: torch.Tensor) -> torch.Tensor:  # [n, F] -> [n, D]
        return torch.tanh(x @ self.proj) + self.query_bias

    def views(self, x: torch.Tensor) -> torch.Tensor:  # [n, F] -> [n, V, D]
        return torch.tanh((x[:, None, :] + self.steps[None]) @ self.proj)


def global_batch(world: int, variant: str):
    """Features of queries [G, F], positives [G, F] and negatives [G * NEGS, F] (query-major)."""
    gen = torch.Generator().manual_seed(100 + VARIANTS.index(variant))
    g = world * B_LOCAL
    queries = torch.randn(g, FEAT, generator=gen, dtype=torch.float64)
    positives = queries + 0.7 * torch.randn(g, FEAT, generator=gen, dtype=torch.float64)
    negatives = torch.randn(g * NEGS, FEAT, generator=gen, dtype=torch.float64)
    return queries, positives, negatives


def single_process(world: int, variant: str):
    """Reference: one process, whole global batch. Returns (loss parts, {param name: grad}, diagnostics)."""
    model = TinyEncoder(VIEWS[variant])
    queries, positives, negatives = global_batch(world, variant)
    candidates = torch.cat([model.views(positives), model.views(negatives)])
    labels = torch.arange(queries.shape[0])
    encoded = model.queries(queries)
    parts = debater_loss(encoded, candidates, labels, variant, SCALE, W_C, W_T)
    parts.total.backward()
    diagnostics = batch_diagnostics(encoded, candidates, labels, SCALE)
    return parts, {name: p.grad.clone() for name, p in model.named_parameters()}, diagnostics


class _GatherNoReduce(torch.autograd.Function):
    """The trap: all_gather whose backward keeps only this rank's slice of the local gradient."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.local = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        start = dist.get_rank() * ctx.local
        return grad[start:start + ctx.local]


def rank_step(variant: str, gather) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = TinyEncoder(VIEWS[variant])
    queries, positives, negatives = global_batch(world, variant)
    mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    mine_neg = slice(rank * B_LOCAL * NEGS, (rank + 1) * B_LOCAL * NEGS)
    # one forward over this rank's documents (positives then negatives), as train.py does
    views = model.views(torch.cat([positives[mine], negatives[mine_neg]]))
    local_pos, local_neg = views[:B_LOCAL], views[B_LOCAL:]
    candidates = torch.cat([gather(local_pos), gather(local_neg)])
    # the trainer's own loss call (labels from the rank), which also keeps what its diagnostics gather
    step = TrainingStep(None, SimpleNamespace(loss_variant=variant, scale=SCALE, cod_loss_weight=W_C,
                                              sd_loss_weight=W_T, grad_cache_chunk_size=0))
    parts = step.loss(model.queries(queries[mine]), candidates)
    parts.total.backward()
    grads = {}
    for name, p in model.named_parameters():  # what DeepSpeed does: average parameter gradients
        g = p.grad.clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        grads[name] = g / world
    return {
        "local_total": parts.total.detach().clone(),
        "mean_total": distributed.mean_over_ranks(parts.total),
        "mean_contrastive": distributed.mean_over_ranks(parts.contrastive),
        "mean_distillation": distributed.mean_over_ranks(parts.distillation),
        "mean_accuracy": distributed.mean_over_ranks(parts.accuracy),
        "best_view": distributed.gather_values(parts.best_view),
        "diagnostics": step.diagnostics(),
        "grads": grads,
    }


def shared_gradient_step() -> dict:
    """gather_with_grad inside a graph where its incoming gradient tensor is also another branch's gradient.

    ``gathered + other * 2``: AddBackward hands the *same* gradient tensor to both branches, so a gather
    whose backward all-reduces that tensor in place would silently multiply ``other``'s gradient by W
    whenever the autograd engine runs the gather's backward before the other branch's. Both graph
    construction orders are tried (the engine's order follows it).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    weights = torch.arange(2.0 * world * 3, dtype=torch.float64).view(2 * world, 3)
    result = {"weights": weights}
    for order in ("gather_first", "other_first"):
        local = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
        other = torch.zeros(2 * world, 3, dtype=torch.float64, requires_grad=True)
        if order == "gather_first":
            gathered = distributed.gather_with_grad(local)
            scaled = other * 2
        else:
            scaled = other * 2
            gathered = distributed.gather_with_grad(local)
        ((gathered + scaled) * weights).sum().backward()
        result[order] = {"other_grad": other.grad.clone(), "local_grad": local.grad.clone()}
    return result


WORLDS = (3, 2)  # one spawn of max(WORLDS) processes runs every world size in turn (imports cost seconds)


def _run_world(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        assert distributed.is_distributed() and distributed.rank() == rank and distributed.world_size() == world
        results = {}
        for variant in VARIANTS:
            results[variant] = rank_step(variant, distributed.gather_with_grad)
            results[variant + "/no_reduce"] = rank_step(variant, _GatherNoReduce.apply)
        results["shared_gradient"] = shared_gradient_step()
        torch.save(results, os.path.join(out_dir, f"w{world}-rank{rank}.pt"))
        distributed.barrier()
    finally:
        dist.destroy_process_group()


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    for world in WORLDS:
        if rank < world:
            _run_world(rank, world, os.path.join(out_dir, f"rendezvous-w{world}"), out_dir)
    os._exit(0)  # results are on disk; skip the slow interpreter teardown of a torch process


@pytest.fixture(scope="module")
def all_rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(tmp),), nprocs=max(WORLDS), join=True)
    return {w: [torch.load(tmp / f"w{w}-rank{r}.pt") for r in range(w)] for w in WORLDS}


@pytest.fixture(params=WORLDS, ids=lambda w: f"W{w}")
def rank_results(request, all_rank_results):
    return request.param, all_rank_results[request.param]


TOL = dict(rtol=1e-5, atol=1e-6)  # the loss computes in fp32 (view_scores casts), inputs are fp64


@pytest.mark.parametrize("variant", VARIANTS)
def test_distributed_equals_single_process(rank_results, variant):
    world, results = rank_results
    reference, ref_grads, ref_diagnostics = single_process(world, variant)
    per_rank = [r[variant] for r in results]

    local_mean = torch.stack([r["local_total"] for r in per_rank]).mean()
    torch.testing.assert_close(local_mean, reference.total.detach(), **TOL)
    for r in per_rank:
        torch.testing.assert_close(r["mean_total"], reference.total.detach().float(), **TOL)
        torch.testing.assert_close(r["mean_contrastive"], reference.contrastive.detach().float(), **TOL)
        torch.testing.assert_close(r["mean_distillation"], reference.distillation.detach().float(), **TOL)
        torch.testing.assert_close(r["mean_accuracy"], reference.accuracy.float(), **TOL)
        assert r["best_view"].tolist() == reference.best_view.tolist()
        assert r["diagnostics"] == pytest.approx(ref_diagnostics, rel=1e-5, abs=1e-6)  # the whole batch's, on every rank
    if variant in ("sd_only", "full"):
        assert float(reference.distillation.detach()) > 0  # the SD term is really part of what is compared

    for name, expected in ref_grads.items():
        assert expected.abs().max() > 1e-3, name
        for r in per_rank:  # every rank holds the same averaged gradient
            torch.testing.assert_close(r["grads"][name], expected, **TOL, msg=f"{variant}: gradient of {name}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_gather_without_reduce_gives_a_wrong_gradient(rank_results, variant):
    """The check above can fail: dropping the sum over ranks in backward changes the gradient."""
    world, results = rank_results
    reference, ref_grads, _ = single_process(world, variant)
    wrong = results[0][variant + "/no_reduce"]
    # the forward pass is the same, only the backward differs
    torch.testing.assert_close(wrong["mean_total"], reference.total.detach().float(), **TOL)
    gap = max(float((wrong["grads"][n] - g).abs().max() / g.abs().max()) for n, g in ref_grads.items())
    assert gap > 1e-2


def test_gather_leaves_other_gradients_alone(rank_results):
    """Only this rank's slice of the summed gradient goes to the local tensor; nothing else changes.

    Every rank uses the same loss weights, so the summed gradient for rank r's slice is W * weights[slice];
    the gradient of ``other`` (which shares the upstream gradient tensor) must stay 2 * weights.
    """
    world, results = rank_results
    for rank, result in enumerate(results):
        shared = result["shared_gradient"]
        weights = shared["weights"]
        for order in ("gather_first", "other_first"):
            torch.testing.assert_close(shared[order]["local_grad"], world * weights[2 * rank:2 * rank + 2],
                                       msg=f"{order}: gradient of the gathered tensor")
            torch.testing.assert_close(shared[order]["other_grad"], 2 * weights,
                                       msg=f"{order}: gather_with_grad changed the gradient of another branch "
                                           "(in-place all_reduce on its incoming gradient)")
