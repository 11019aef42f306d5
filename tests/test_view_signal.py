"""The view-signal diagnostic (debater.bench.view_signal) equals the same statistics computed one text at a
time, without padding, with plain loops."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import FIXTURES
from transformers import AutoTokenizer

from debater.bench.view_signal import FORMATS, read_rows, signal
from debater.model import DebaterEncoder, grow_embeddings, load_backbone
from debater.prompts import EncodingSettings, TextFormatter, resolve_step_tokens

INSTRUCTION = "Given a query, retrieve the matching document:"
SCALE = 30.0


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def one_at_a_time(model_path: str, rows: list[dict], fields: dict) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    settings = EncodingSettings(**fields, query_max_length=32, doc_max_length=32)
    added = resolve_step_tokens(tokenizer, settings)
    backbone = load_backbone(model_path, "float32", "sdpa")
    if added:
        grow_embeddings(backbone, tokenizer)
    encoder = DebaterEncoder(backbone, settings).eval()
    formatter = TextFormatter(tokenizer, settings)

    def run(ids: list[int], method) -> torch.Tensor:
        with torch.no_grad():
            return method(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]

    queries = [run(ids, encoder.encode_queries) for ids in formatter.queries([r["query"] for r in rows],
                                                                             [INSTRUCTION] * len(rows))]
    docs = [run(ids, encoder.encode_documents)
            for ids in formatter.documents([r["positive"] for r in rows] + [r["negative"] for r in rows])]
    best = [[max(SCALE * cosine(q, view) for view in d) for d in docs] for q in queries]
    margins = [row[i] - sum(row) / len(row) for i, row in enumerate(best)]
    last = [d[-1] for d in docs]
    doc_doc = [cosine(a, b) for a in last for b in last]
    loss = [math.log(sum(math.exp(s) for s in row)) - row[i] for i, row in enumerate(best)]
    return {"doc_doc_cosine": sum(doc_doc) / len(doc_doc), "positive_margin": sum(margins) / len(margins),
            "initial_loss": sum(loss) / len(loss)}


@pytest.mark.parametrize("name", ["eos", "steps_added", "steps_no_prompt"])
def test_batched_statistics_equal_one_text_at_a_time(tiny_model, name):
    rows = read_rows(FIXTURES / "echo" / "tiny_retrieval.jsonl", count=6, stride=1)
    batched = signal(str(tiny_model), rows, INSTRUCTION, FORMATS[name], max_length=32, scale=SCALE)
    reference = one_at_a_time(str(tiny_model), rows, FORMATS[name])
    for key, value in reference.items():
        assert batched[key] == pytest.approx(value, abs=2e-4), key
    assert 0.0 <= batched["top1"] <= 1.0
