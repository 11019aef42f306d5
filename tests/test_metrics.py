"""The nDCG@10 that `make eval` reports equals an independent computation on a fixed ranking."""
from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import FIXTURES

from debater.beir import read_beir


class FixedVectors:
    """Stands in for TextEncoder: deterministic vectors per text, and records the instructions it got."""

    def __init__(self, pooling: str = "last_step", dim: int = 16):
        self.pooling, self.dim, self.instructions = pooling, dim, []

    def vector(self, text: str) -> np.ndarray:
        rng = np.random.default_rng(sum(ord(c) * (i + 1) for i, c in enumerate(text)))
        v = rng.standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)

    def mixed(self, word: str, text: str) -> np.ndarray:
        """Mostly the word's vector, plus a little of the whole text's, so no two scores tie."""
        v = self.vector(word) + 0.5 * self.vector(text.strip())
        return v / np.linalg.norm(v)

    def queries(self, texts, instruction):
        self.instructions.append(instruction)
        return np.stack([self.mixed(t.split()[-1], t) for t in texts])

    def documents(self, texts):
        views = np.stack([np.stack([self.mixed(w, t) for w in t.split()[-4:-1]]) for t in texts])
        return views if self.pooling == "multi_view" else views[:, -1]


def independent_scores(data, fake) -> dict[str, float]:
    doc_ids = list(data.corpus)
    ndcg, recall, mrr = [], [], []
    for qid, text in data.queries.items():
        q = fake.queries([text], "")[0]
        d = fake.documents([data.corpus[i]["text"] for i in doc_ids])
        scores = d @ q if d.ndim == 2 else (d @ q).max(axis=1)
        ranking = [doc_ids[i] for i in np.argsort(-scores, kind="stable")][:10]
        rel = data.qrels[qid]
        dcg = sum(rel.get(d, 0) / math.log2(rank + 2) for rank, d in enumerate(ranking))
        ideal = sum(g / math.log2(rank + 2) for rank, g in enumerate(sorted(rel.values(), reverse=True)[:10]))
        ndcg.append(dcg / ideal)
        hits = [d for d in ranking if rel.get(d, 0) > 0]
        recall.append(len(hits) / sum(1 for v in rel.values() if v > 0))
        mrr.append(next((1 / (r + 1) for r, d in enumerate(ranking) if rel.get(d, 0) > 0), 0.0))
    return {"ndcg_at_10": float(np.mean(ndcg)), "recall_at_10": float(np.mean(recall)), "mrr_at_10": float(np.mean(mrr))}


@pytest.mark.parametrize("pooling", ["last_step", "multi_view"])
def test_reported_ndcg_matches_an_independent_computation(pooling):
    import mteb

    from debater.evaluate import METRICS, _quiet_offline_mteb
    from debater.mteb_model import make_local_task, make_mteb_model

    _quiet_offline_mteb()
    data = read_beir(FIXTURES / "beir")
    fake = FixedVectors(pooling)
    model = make_mteb_model(fake, "fixed", {"fixture-task": "Find it:"})
    result = mteb.evaluate(model, [make_local_task("fixture-task", data)], cache=None, overwrite_strategy="always",
                           co2_tracker=False, show_progress_bar=False)
    row = next(s for s in result.task_results[0].scores["test"] if s["hf_subset"] == "default")
    expected = independent_scores(data, FixedVectors(pooling))
    for metric in ("ndcg_at_10", "recall_at_10", "mrr_at_10"):
        assert row[metric] == pytest.approx(expected[metric], abs=1e-4), metric
    assert 0.0 < expected["ndcg_at_10"] < 1.0  # a ranking with both hits and misses
    assert set(METRICS) <= set(row) and set(fake.instructions) == {"Find it:"}
