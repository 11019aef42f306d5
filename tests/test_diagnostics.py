"""The plateau diagnostics equal a naive loop on a fixed batch; the LoRA B norm is every B matrix's norm."""
from __future__ import annotations

import math

import pytest
import torch

from debater.diagnostics import batch_diagnostics, lora_b_norm, mean_pairwise_cosine

SCALE = 30.0


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))


def naive(queries: torch.Tensor, views: torch.Tensor, labels: list[int]) -> dict[str, float]:
    """Plain loops over pairs, queries and candidates."""
    n, b = views.shape[0], queries.shape[0]
    last = views[:, -1]
    doc_pairs = [cosine(last[i], last[j]) for i in range(n) for j in range(n) if i != j]
    query_pairs = [cosine(queries[i], queries[j]) for i in range(b) for j in range(b) if i != j]
    margins, spreads = [], []
    for i in range(b):
        best = [max(SCALE * cosine(queries[i], views[j, v]) for v in range(views.shape[1])) for j in range(n)]
        others = [s for j, s in enumerate(best) if j != labels[i]]
        margins.append(best[labels[i]] - sum(others) / len(others))
        mean = sum(best) / n
        spreads.append(math.sqrt(sum((s - mean) ** 2 for s in best) / (n - 1)))
    return {"diag/doc_view_cosine": sum(doc_pairs) / len(doc_pairs),
            "diag/query_view_cosine": sum(query_pairs) / len(query_pairs),
            "diag/positive_margin": sum(margins) / b, "diag/score_std": sum(spreads) / b}


def test_batch_diagnostics_equal_a_naive_loop():
    gen = torch.Generator().manual_seed(5)
    queries = torch.randn(5, 7, generator=gen)
    views = torch.randn(12, 3, 7, generator=gen) + 0.5  # a shared direction, as on the plateau
    labels = [3, 0, 7, 11, 2]
    got = batch_diagnostics(queries, views, torch.tensor(labels), SCALE)
    assert got == pytest.approx(naive(queries, views, labels), rel=1e-5, abs=1e-6)


def test_identical_documents_show_the_plateau():
    """Every view the same: cosine 1, no spread, no margin, whatever the queries are."""
    queries = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    views = torch.ones(8, 2, 6)
    got = batch_diagnostics(queries, views, torch.arange(4), SCALE)
    assert got["diag/doc_view_cosine"] == pytest.approx(1.0)
    assert got["diag/score_std"] == pytest.approx(0.0, abs=1e-5)
    assert got["diag/positive_margin"] == pytest.approx(0.0, abs=1e-5)


def test_mean_pairwise_cosine_of_one_vector_is_zero():
    assert float(mean_pairwise_cosine(torch.ones(1, 3))) == 0.0


def test_lora_b_norm_is_the_norm_of_every_b_matrix():
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["0", "2"]))
    assert lora_b_norm(model) == 0.0  # B starts at zero
    b_matrices = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert len(b_matrices) == 2
    with torch.no_grad():
        b_matrices[0].fill_(1.0)
        b_matrices[1].fill_(2.0)
    expected = math.sqrt(b_matrices[0].numel() * 1.0 + b_matrices[1].numel() * 4.0)
    assert lora_b_norm(model) == pytest.approx(expected)
