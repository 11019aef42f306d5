"""One optimizer step of DEBATER training, in the method's terms.

- encode: this rank's b queries -> [b, D]; its b * (1 + k) documents -> K views each, [b(1+k), K, D]
- gather: every rank's views with gradient, all positives then all negatives -> [G(1+k), K, D]
- loss:   CoD (+ SD) of the b local queries against every candidate; the label of local query i is the
          global row of its positive, rank * b + i
- update: DeepSpeed reduces the gradients once and steps the optimizer

With ``grad_cache_chunk_size`` c > 0 (gradient caching, Gao et al. 2021) the encode runs without a graph,
c texts at a time; the loss is taken on those embeddings and its gradient with respect to each of them
kept; each chunk is then encoded again with a graph (same dropout masks, same RNG state) and its kept
gradient pushed into the trainable parameters, summed over chunks. The last chunk keeps its graph from
the first pass instead (one chunk's activations, which the re-encoding needs anyway), so it is encoded
once. DeepSpeed then backpropagates a surrogate, sum(parameter * summed gradient), whose gradient is that
sum: one backward and one reduction per step as without caching, and memory bounded by the chunk instead
of the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from debater import distributed
from debater.diagnostics import batch_diagnostics, lora_b_norm
from debater.core.errors import UserError
from debater.losses import LossParts, debater_loss


class TrainingError(UserError):
    """A run that must stop; the message says at which step and why (from values every rank shares)."""

    same_on_every_rank = True


@dataclass
class TextChunk:
    """Rows [start, stop) of one side (queries or documents) of the batch, leading all-padding columns cut."""

    side: str  # "query" or "doc"
    start: int
    stop: int
    inputs: dict[str, torch.Tensor]
    rng: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (cpu, accelerator) state before its first forward


def split_side(batch: dict[str, torch.Tensor], side: str, size: int) -> list[TextChunk]:
    """Chunks of ``size`` texts (the last may be smaller) of one side, as the encoder's keyword inputs."""
    ids, mask, keys = batch[f"{side}_ids"], batch[f"{side}_mask"], batch[f"{side}_keys"]
    chunks = []
    for start in range(0, ids.shape[0], size):
        stop = min(start + size, ids.shape[0])
        used = mask[start:stop].any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else mask.shape[1] - 1  # left padding: real tokens are at the end
        chunks.append(TextChunk(side, start, stop, {f"{side}_ids": ids[start:stop, first:],
                                                    f"{side}_mask": mask[start:stop, first:],
                                                    f"{side}_keys": keys[start:stop]}))
    return chunks


class TrainingStep:
    """Forward, loss and backward of one global batch on this rank, then the optimizer update."""

    def __init__(self, engine, config, scheduler=None):
        self.engine, self.config, self.scheduler = engine, config, scheduler
        self.chunk_size = config.grad_cache_chunk_size
        self.last_scored: tuple[torch.Tensor, torch.Tensor] | None = None  # (local queries, candidates), detached

    def encode(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(queries [n, D], views [m, K, D]) of the texts in ``inputs``, through the engine."""
        return self.engine(**inputs)

    @staticmethod
    def gather(views: torch.Tensor, local_queries: int) -> torch.Tensor:
        """[b(1+k), K, D] local views -> [G(1+k), K, D]: every rank's positives, then every rank's negatives."""
        positives, negatives = views[:local_queries], views[local_queries:]
        return torch.cat([distributed.gather_with_grad(positives), distributed.gather_with_grad(negatives)])

    def loss(self, queries: torch.Tensor, candidates: torch.Tensor) -> LossParts:
        """Loss of the [b, D] local queries against the [G(1+k), K, D] gathered candidates."""
        local = queries.shape[0]
        labels = torch.arange(local, device=queries.device) + distributed.rank() * local
        self.last_scored = (queries.detach(), candidates.detach())
        return debater_loss(queries, candidates, labels, self.config.loss_variant, self.config.scale,
                            self.config.cod_loss_weight, self.config.sd_loss_weight)

    def diagnostics(self) -> dict[str, float]:
        """``batch_diagnostics`` of the last step's whole global batch (every rank's queries, gathered in rank
        order, so query i's positive is candidate i); every rank must call it, as for any collective."""
        queries, candidates = self.last_scored
        everyone = distributed.gather_values(queries)
        labels = torch.arange(everyone.shape[0], device=everyone.device)
        return batch_diagnostics(everyone, candidates, labels, self.config.scale)

    def logged_diagnostics(self) -> dict[str, float]:
        """Every ``diag/*`` value a logging step writes: ``diagnostics`` and the LoRA B norm; every rank calls it."""
        return {"diag/lora_b_norm": lora_b_norm(self.engine.module), **self.diagnostics()}

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> LossParts:
        """Gradients of the whole global batch's loss in the trainable parameters; returns this rank's loss."""
        if self.chunk_size:
            return self._cached_forward_backward(batch)
        queries, views = self.encode(batch)
        parts = self.loss(queries, self.gather(views, queries.shape[0]))
        self.engine.backward(parts.total)
        return parts

    def _cached_forward_backward(self, batch: dict[str, torch.Tensor]) -> LossParts:
        chunks = split_side(batch, "query", self.chunk_size) + split_side(batch, "doc", self.chunk_size)
        *replayed, last = chunks  # the last chunk keeps its graph from the first pass: it is not encoded twice
        with torch.no_grad():
            embedded = [self._encode_chunk(chunk, first_pass=True) for chunk in replayed]
        kept = self._encode_chunk(last, first_pass=False)
        embedded.append(kept.detach())
        queries = torch.cat([e for c, e in zip(chunks, embedded) if c.side == "query"]).requires_grad_()
        views = torch.cat([e for c, e in zip(chunks, embedded) if c.side == "doc"]).requires_grad_()
        parts = self.loss(queries, self.gather(views, queries.shape[0]))
        cached = dict(zip(("query", "doc"), torch.autograd.grad(parts.total, [queries, views])))
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        sums: list[torch.Tensor | None] = [None] * len(params)
        for chunk in (last, *replayed):
            embedding = kept if chunk is last else self._encode_chunk(chunk, first_pass=False)
            # autograd.grad frees this chunk's graph before the next one is built
            grads = torch.autograd.grad(embedding, params, grad_outputs=cached[chunk.side][chunk.start:chunk.stop],
                                        allow_unused=True)
            for i, grad in enumerate(grads):
                if grad is not None:
                    sums[i] = grad.float() if sums[i] is None else sums[i].add_(grad)
        surrogate = sum((p * s.to(p.dtype)).sum() for p, s in zip(params, sums) if s is not None)
        self.engine.backward(surrogate)
        return LossParts(parts.total.detach(), parts.contrastive.detach(), parts.distillation.detach(),
                         parts.accuracy, parts.best_view)

    def _encode_chunk(self, chunk: TextChunk, first_pass: bool) -> torch.Tensor:
        """Encode one chunk. A first pass (no graph) goes through the engine and notes the RNG state. A pass
        with a graph goes through the bare module, because the engine hooks its outputs so that a backward
        through them runs DeepSpeed's reduction, which must happen once, for the surrogate; when it repeats a
        first pass it replays that RNG state (any random op in the backbone draws as it did; LoRA dropout is
        keyed by text and needs no replay)."""
        device = self.engine.device
        on_accelerator = device.type == "cuda"
        if first_pass:
            chunk.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if on_accelerator else None)
            return self._side(chunk, self.encode(chunk.inputs))
        replay = chunk.rng is not None
        with torch.random.fork_rng(devices=[device] if on_accelerator else [], device_type=device.type,
                                   enabled=replay):
            if replay:
                torch.set_rng_state(chunk.rng[0])
                if on_accelerator:
                    torch.cuda.set_rng_state(chunk.rng[1], device)
            return self._side(chunk, self.engine.module(**chunk.inputs))

    @staticmethod
    def _side(chunk: TextChunk, encoded: tuple[torch.Tensor | None, torch.Tensor | None]) -> torch.Tensor:
        return encoded[0] if chunk.side == "query" else encoded[1]

    def update(self, step: int, checkpoints: str) -> float:
        """The optimizer step; returns the global gradient norm, stopping the run if it is not finite."""
        self.engine.step()
        grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        if not math.isfinite(grad_norm) and not self.engine.fp16_enabled():  # fp16's scaler skips overflows
            raise TrainingError(
                f"non-finite gradient norm ({grad_norm}) at step {step} while the loss is finite: DeepSpeed "
                f"skipped the update, so training would go on without learning; stopping (the last good checkpoint "
                f"stays 'latest' in {checkpoints}). If this happens on a GPU with attn_implementation="
                f"{self.config.attn_implementation}, rerun with attn_implementation=eager to tell an attention-kernel "
                "bug from a model problem")
        return grad_norm
