"""Why a run sits on the chance plateau, in numbers: how alike the embeddings are and how much the scores
separate a query's positive from the other candidates.

Contrastive loss can rest at ln(N) without learning when every document view points the same way (view
cosine near 1, score spread near 0). These statistics of one global batch show that state and its end; the
trainer logs them as ``diag/*`` every logging step, and ``python -m benchmarks view_signal`` reports the same
numbers for any model and format. Pure functions on embeddings, like the losses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from debater.losses import view_scores


def mean_pairwise_cosine(vectors: torch.Tensor) -> torch.Tensor:
    """Mean cosine over the pairs (i, j), i != j, of [N, D] vectors (0 for fewer than two)."""
    count = vectors.shape[0]
    if count < 2:
        return vectors.new_zeros((), dtype=torch.float32)
    unit = F.normalize(vectors.float(), dim=-1)
    total = unit.sum(0)
    # sum over all pairs = |sum of unit vectors|^2; the diagonal adds N ones
    return ((total @ total) - count) / (count * (count - 1))


def batch_diagnostics(queries: torch.Tensor, views: torch.Tensor, labels: torch.Tensor,
                      scale: float) -> dict[str, float]:
    """Statistics of [B, D] queries against [N, K, D] candidate views, ``labels`` the positives' rows.

    - ``doc_view_cosine`` / ``query_view_cosine``: mean pairwise cosine of the candidates' last views / of
      the queries;
    - ``positive_margin``: a query's score for its positive minus its mean score over the other candidates
      (scaled units, best view, as the contrastive loss scores), averaged over queries;
    - ``score_std``: the spread of a query's scaled best-view scores over the candidates, averaged.
    """
    with torch.no_grad():
        best = view_scores(queries, views, scale).max(dim=-1).values          # [B, N]
        rows = torch.arange(best.shape[0], device=best.device)
        positive = best[rows, labels]
        others = (best.sum(-1) - positive) / max(best.shape[1] - 1, 1)
        return {"diag/doc_view_cosine": float(mean_pairwise_cosine(views[:, -1])),
                "diag/query_view_cosine": float(mean_pairwise_cosine(queries)),
                "diag/positive_margin": float((positive - others).mean()),
                "diag/score_std": float(best.std(dim=-1).mean())}


def lora_b_norm(module: torch.nn.Module) -> float:
    """The norm of every LoRA B matrix together: zero at initialisation, so it shows when LoRA starts to act."""
    squares = [p.detach().float().pow(2).sum() for name, p in module.named_parameters() if "lora_B" in name]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0
