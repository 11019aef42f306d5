"""Invariant 4: the DEBATER losses equal a naive loop implementation written from the method's definition.

scores s(q_b, d_n^v) = scale * cos(q_b, d_n^v)
CoD  L_c = mean_b CE(max_v s(q_b, d_n^v) over n, label_b)
SD   L_t = -mean_b sum_n softmax_n(best_b.)[detached] * log_softmax_n(s(q_b, d_n^V))   (V = last view)
total    = w_c * L_c + w_t * L_t for sd_only / full; L_c alone for vanilla / cod_only.
"""
from __future__ import annotations

import math

import pytest
import torch

from debater.losses import VARIANTS, debater_loss, view_scores

B, N = 4, 9  # queries, candidates (positives + negatives)
VIEWS = {"vanilla": 1, "sd_only": 4, "cod_only": 4, "full": 4}
LABELS = [2, 0, 7, 5]  # deliberately not arange(B)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a, b) / (torch.sqrt(torch.dot(a, a)) * torch.sqrt(torch.dot(b, b)))


def naive_loss(queries, views, labels, variant, scale, w_c, w_t):
    """Plain Python loops over queries, candidates and views (autograd through scalar ops)."""
    n_q, n_c, n_v = queries.shape[0], views.shape[0], views.shape[1]
    score = [[[scale * _cos(queries[b], views[n, v]) for v in range(n_v)] for n in range(n_c)]
             for b in range(n_q)]
    best = []
    for b in range(n_q):
        row = []
        for n in range(n_c):
            m = score[b][n][0]
            for v in range(1, n_v):
                m = torch.maximum(m, score[b][n][v])
            row.append(m)
        best.append(row)
    contrastive = 0.0
    for b in range(n_q):
        log_z = torch.log(sum(torch.exp(best[b][n]) for n in range(n_c)))
        contrastive = contrastive + (log_z - best[b][labels[b]])
    contrastive = contrastive / n_q
    distillation = 0.0
    for b in range(n_q):
        teacher_z = sum(math.exp(float(best[b][n].detach())) for n in range(n_c))
        student_log_z = torch.log(sum(torch.exp(score[b][n][n_v - 1]) for n in range(n_c)))
        for n in range(n_c):
            teacher = math.exp(float(best[b][n].detach())) / teacher_z  # a plain float: detached
            distillation = distillation - teacher * (score[b][n][n_v - 1] - student_log_z)
    distillation = distillation / n_q
    if variant in ("vanilla", "cod_only"):
        total = contrastive
    else:
        total = w_c * contrastive + w_t * distillation
    accuracy = 0.0
    best_view = []
    for b in range(n_q):
        top = max(range(n_c), key=lambda n: float(best[b][n].detach()))
        accuracy += float(top == labels[b]) / n_q
        best_view.append(max(range(n_v), key=lambda v: float(score[b][labels[b]][v].detach())))
    return total, contrastive, distillation, accuracy, best_view


def _inputs(variant: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(B, 8, generator=gen, dtype=torch.float32)
    views = torch.randn(N, VIEWS[variant], 8, generator=gen, dtype=torch.float32)
    # make some positives clearly closest so accuracy is neither 0 nor 1 by construction
    views[LABELS[0], -1] = queries[0] * 2.0
    views[LABELS[1], 0] = queries[1] * 0.5
    return queries, views


@pytest.mark.parametrize("scale,w_c,w_t", [(30.0, 0.5, 0.5), (20.0, 0.3, 0.9)])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradients_equal_naive_loop(variant, seed, scale, w_c, w_t):
    queries, views = _inputs(variant, seed)
    q1, v1 = queries.clone().requires_grad_(True), views.clone().requires_grad_(True)
    q2, v2 = queries.double().requires_grad_(True), views.double().requires_grad_(True)
    labels = torch.tensor(LABELS)

    parts = debater_loss(q1, v1, labels, variant, scale=scale, cod_weight=w_c, sd_weight=w_t)
    total, contrastive, distillation, accuracy, best_view = naive_loss(q2, v2, LABELS, variant, scale, w_c, w_t)

    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.total.double(), total.detach(), **tol)
    torch.testing.assert_close(parts.contrastive.double(), contrastive.detach(), **tol)
    if variant in ("vanilla", "cod_only"):
        assert float(parts.distillation) == 0.0
    else:
        torch.testing.assert_close(parts.distillation.double(), distillation.detach(), **tol)
    assert float(parts.accuracy) == pytest.approx(accuracy)
    assert parts.best_view.tolist() == best_view
    # accuracy and best_view are informative on these inputs
    assert 0.0 < accuracy < 1.0 or variant == "vanilla"

    parts.total.backward()
    total.backward()
    gtol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q1.grad.double(), q2.grad, **gtol)
    torch.testing.assert_close(v1.grad.double(), v2.grad, **gtol)
    assert q1.grad.abs().sum() > 0 and v1.grad.abs().sum() > 0


def test_sd_teacher_is_detached():
    """The SD term alone must send no gradient through the teacher (max-over-views) path."""
    queries, views = _inputs("full", 3)
    views = views.requires_grad_(True)
    parts = debater_loss(queries, views, torch.tensor(LABELS), "full", cod_weight=0.0, sd_weight=1.0)
    parts.total.backward()
    # only the last view enters the student; every other view gets exactly zero gradient
    assert torch.all(views.grad[:, :-1] == 0)
    assert views.grad[:, -1].abs().sum() > 0


def test_default_weights_and_shared_contrastive_term():
    queries, views = _inputs("full", 4)
    labels = torch.tensor(LABELS)
    cod = debater_loss(queries, views, labels, "cod_only")
    full = debater_loss(queries, views, labels, "full")
    assert float(full.total) == pytest.approx(0.5 * float(full.contrastive) + 0.5 * float(full.distillation))
    assert float(cod.total) == pytest.approx(float(cod.contrastive))
    assert float(cod.contrastive) == pytest.approx(float(full.contrastive))


def test_view_scores_are_scaled_cosines():
    gen = torch.Generator().manual_seed(5)
    q, d = torch.randn(3, 6, generator=gen), torch.randn(5, 2, 6, generator=gen)
    s = view_scores(q * 7.0, d * 0.1, 30.0)  # norms must not matter
    assert s.shape == (3, 5, 2)
    for b in range(3):
        for n in range(5):
            for v in range(2):
                expected = 30.0 * float(torch.dot(q[b], d[n, v]) / (q[b].norm() * d[n, v].norm()))
                assert float(s[b, n, v]) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="unknown loss variant"):
        debater_loss(torch.randn(2, 4), torch.randn(2, 1, 4), torch.tensor([0, 1]), "bogus")
