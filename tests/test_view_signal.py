"""The view-signal diagnostic (benchmarks.view_signal) equals the same statistics computed one text at a
time, without padding, with plain loops; trained runs and base formats go through the same statistics."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import FIXTURES
from benchmarks.view_signal import FORMATS, base_encoder, centred, read_rows, statistics, top_dims_share
from debater.core.prompts import TextFormatter
from debater.model import load_encoder

INSTRUCTION = "Given a query, retrieve the matching document:"
SCALE = 30.0


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def one_at_a_time(encoder, tokenizer, rows: list[dict]) -> dict:
    formatter = TextFormatter(tokenizer, encoder.settings)

    def run(ids: list[int], method) -> torch.Tensor:
        with torch.no_grad():
            return method(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]

    queries = [run(ids, encoder.encode_queries) for ids in formatter.queries([r["query"] for r in rows],
                                                                             [INSTRUCTION] * len(rows))]
    docs = [run(ids, encoder.encode_documents)
            for ids in formatter.documents([r["positive"] for r in rows] + [r["negative"] for r in rows])]
    best = [[max(SCALE * cosine(q, view) for view in d) for d in docs] for q in queries]
    margins = [row[i] - (sum(row) - row[i]) / (len(row) - 1) for i, row in enumerate(best)]
    last = [d[-1] for d in docs]
    doc_doc = [cosine(a, b) for i, a in enumerate(last) for j, b in enumerate(last) if i != j]
    query_query = [cosine(a, b) for i, a in enumerate(queries) for j, b in enumerate(queries) if i != j]
    loss = [math.log(sum(math.exp(s) for s in row)) - row[i] for i, row in enumerate(best)]
    return {"doc_view_cosine": sum(doc_doc) / len(doc_doc), "query_view_cosine": sum(query_query) / len(query_query),
            "positive_margin": sum(margins) / len(margins), "loss": sum(loss) / len(loss)}


def rows() -> list[dict]:
    return read_rows(FIXTURES / "echo" / "tiny_retrieval.jsonl", count=6, stride=1)


@pytest.mark.parametrize("name", ["eos", "steps_added", "steps_no_prompt", "one_step", "steps_eos_init"])
def test_batched_statistics_equal_one_text_at_a_time(tiny_model, name):
    encoder, tokenizer = base_encoder(str(tiny_model), FORMATS[name], max_length=32)
    batched = statistics(encoder, tokenizer, rows(), INSTRUCTION, SCALE)
    for key, value in one_at_a_time(encoder, tokenizer, rows()).items():
        assert batched[key] == pytest.approx(value, abs=2e-4), key
    assert 0.0 <= batched["top1"] <= 1.0


def test_a_loaded_base_model_is_the_default_step_format(tiny_model):
    """The path for trained runs (load_encoder) on an untrained folder gives the base steps_existing numbers
    (the tiny tokenizer has no reserved tokens, so both add the same seeded rows)."""
    loaded = statistics(*load_encoder(str(tiny_model), max_length=32)[:2], rows(), INSTRUCTION, SCALE)
    built = statistics(*base_encoder(str(tiny_model), FORMATS["steps_existing"], max_length=32), rows(), INSTRUCTION,
                       SCALE)
    assert loaded == built


def test_centring_and_the_top_dimensions_share_equal_plain_loops():
    gen = torch.Generator().manual_seed(3)
    queries, views = torch.randn(3, 5, generator=gen), torch.randn(4, 2, 5, generator=gen)
    views[..., 1] += 40.0  # one coordinate every text shares, as massive activations are
    centred_queries, centred_views = centred(queries, views)
    for i in range(4):
        for k in range(2):
            for d in range(5):
                mean = sum(float(views[j, k, d]) for j in range(4)) / 4
                assert float(centred_views[i, k, d]) == pytest.approx(float(views[i, k, d]) - mean, abs=1e-5)
    assert float(centred_queries[1, 2]) == pytest.approx(float(queries[1, 2] - queries[:, 2].sum() / 3), abs=1e-6)
    last = views[:, -1]
    magnitude = [sum(abs(float(last[j, d])) for j in range(4)) / 4 for d in range(5)]
    top = sorted(range(5), key=lambda d: -magnitude[d])[:3]
    shares = [sum(float(last[j, d]) ** 2 for d in top) / sum(float(last[j, d]) ** 2 for d in range(5))
              for j in range(4)]
    assert top_dims_share(last) == pytest.approx(sum(shares) / 4, rel=1e-5)
    assert top_dims_share(last, count=1) > 0.9  # the shared coordinate holds nearly all of every norm
