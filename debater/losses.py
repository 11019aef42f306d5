"""DEBATER losses as pure functions on embeddings (no model, no process group).

``views`` holds K document views per candidate; scores are ``scale * cos``.
- contrastive (CoD): cross-entropy over max-over-views scores.
- self-distillation (SD): the max-over-views distribution, detached, teaches the
  last view's distribution (KL up to a constant: -sum teacher * log student).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from debater.core.config import LOSS_VARIANTS

VARIANTS = tuple(LOSS_VARIANTS)


@dataclass
class LossParts:
    total: torch.Tensor
    contrastive: torch.Tensor
    distillation: torch.Tensor
    accuracy: torch.Tensor        # fraction of queries whose own positive scores highest
    best_view: torch.Tensor       # [B] index of the view that scores each query's positive best


def view_scores(queries: torch.Tensor, views: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, D] x [N, V, D] -> [B, N, V] scaled cosine similarities."""
    q = F.normalize(queries.float(), dim=-1)
    d = F.normalize(views.float(), dim=-1)
    return scale * torch.einsum("bd,nvd->bnv", q, d)


def self_distillation(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    teacher = torch.softmax(teacher_logits.detach(), dim=-1)
    return -(teacher * torch.log_softmax(student_logits, dim=-1)).sum(-1).mean()


def debater_loss(queries: torch.Tensor, views: torch.Tensor, labels: torch.Tensor, variant: str,
                 scale: float = 30.0, cod_weight: float = 0.5, sd_weight: float = 0.5) -> LossParts:
    """Loss of B queries against N candidates (labels index each query's positive)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown loss variant {variant!r}; choose from {VARIANTS}")
    scores = view_scores(queries, views, scale)
    best = scores.max(dim=-1).values
    contrastive = F.cross_entropy(best, labels)
    rows = torch.arange(len(labels), device=labels.device)
    best_view = scores[rows, labels].argmax(dim=-1)
    accuracy = (best.argmax(dim=-1) == labels).float().mean()
    if not LOSS_VARIANTS[variant].self_distillation:
        zero = contrastive.new_zeros(())
        return LossParts(contrastive, contrastive, zero, accuracy, best_view)
    distillation = self_distillation(best, scores[..., -1])
    total = cod_weight * contrastive + sd_weight * distillation
    return LossParts(total, contrastive, distillation, accuracy, best_view)
