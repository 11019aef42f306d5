"""The view-signal diagnostic (benchmarks.view_signal) equals the same statistics computed one text at a
time, without padding, with plain loops; trained runs and base formats go through the same statistics."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import FIXTURES
from benchmarks.view_signal import FORMATS, base_encoder, read_rows, statistics
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
