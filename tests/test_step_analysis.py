"""Per-step analysis: each step is scored on its own view, the last step of a last_step model
reproduces the main evaluation, documents are encoded once, models without steps are skipped."""
from __future__ import annotations

import argparse
import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import FIXTURES
from test_metrics import FixedVectors, independent_scores

from debater.beir import read_beir
from debater.evaluate import _quiet_offline_mteb, run_evaluation
from debater.inference_encoder import TextEncoder
from debater.mteb_model import make_local_task
from debater.step_analysis import step_scores, write_reports


class ThreeSteps(FixedVectors):
    """Deterministic vectors with three document views, shaped like a TextEncoder of a 3-step model."""

    settings = SimpleNamespace(num_views=3, doc_mode="step_tokens")

    def __init__(self):
        super().__init__("last_step")

    def document_views(self, texts):
        return np.stack([np.stack([self.mixed(w, t) for w in t.split()[-4:-1]]) for t in texts])


class OneView(ThreeSteps):
    """The same vectors, documents reduced to one chosen view."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def documents(self, texts):
        return self.document_views(texts)[:, self.step - 1]


def test_each_step_is_scored_on_its_own_view():
    _quiet_offline_mteb()
    data = read_beir(FIXTURES / "beir")
    per_task = step_scores(ThreeSteps(), "fake", [make_local_task("fixture-task", data)],
                           {"fixture-task": "Find it:"}, batch_size=8)
    scores = per_task["fixture-task"]
    for step in (1, 2, 3):
        expected = independent_scores(data, OneView(step))
        assert scores["ndcg_at_10"][step - 1] == pytest.approx(expected["ndcg_at_10"], abs=1e-4)
        assert scores["recall_at_10"][step - 1] == pytest.approx(expected["recall_at_10"], abs=1e-4)
    assert len(set(np.round(scores["ndcg_at_10"], 4))) > 1, "the steps should not all score the same"


def test_model_without_steps_is_skipped(caplog, tmp_path):
    fake = ThreeSteps()
    fake.settings = SimpleNamespace(num_views=1, doc_mode="last_token")
    with caplog.at_level(logging.INFO, logger="debater.step_analysis"):
        assert step_scores(fake, "vanilla-model", [], {}, batch_size=8) is None
    assert any("vanilla-model skipped" in r.getMessage() for r in caplog.records)
    write_reports({}, ["vanilla-model"], tmp_path)
    assert json.loads((tmp_path / "per_step.json").read_text()) == {"results": {}, "skipped": ["vanilla-model"]}
    assert "vanilla-model: skipped" in (tmp_path / "per_step.md").read_text()
    assert not (tmp_path / "per_step.png").exists()


def test_last_step_equals_the_main_evaluation_and_documents_are_encoded_once(tiny_model, tmp_path, monkeypatch):
    calls = []
    encode = TextEncoder._encode
    monkeypatch.setattr(TextEncoder, "_encode",
                        lambda self, seqs, method, desc, view: calls.append((method, len(seqs))) or encode(
                            self, seqs, method, desc, view))
    args = argparse.Namespace(model=[str(tiny_model)], tasks=[str(FIXTURES / "beir")], out=tmp_path, max_queries=None,
                              max_corpus=None, max_length=None, batch_size=8, per_step=True,
                              trust_remote_code=False, base_model=None)
    main_scores = run_evaluation(args)[str(tiny_model)]["scores"]["fixtures-beir"]
    assert sorted(calls) == [("encode_documents", 24), ("encode_queries", 24)]
    per_step = json.loads((tmp_path / "per_step.json").read_text())["results"][str(tiny_model)]["fixtures-beir"]
    assert len(per_step["ndcg_at_10"]) == len(per_step["recall_at_10"]) == 8
    assert per_step["ndcg_at_10"][-1] == pytest.approx(main_scores["ndcg_at_10"], abs=1e-9)
    assert per_step["recall_at_10"][-1] == pytest.approx(main_scores["recall_at_10"], abs=1e-9)
    table = (tmp_path / "per_step.md").read_text()
    assert "| step 8 |" in table and f"| {tiny_model} | fixtures-beir | nDCG@10 |" in table
    assert (tmp_path / "per_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
