"""The ablation's bookkeeping: each arm's spread over seeds, the step a run left the plateau, the best view, and
the config every arm gets (same body budget; the paper's format unless the arm says otherwise)."""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pytest

from benchmarks.ablation import ARMS, arm_config, best_views, left_plateau_at, summarise


def test_summary_is_the_mean_and_spread_over_seeds_per_arm_and_step():
    scores = {"full-seed42@60": {"ndcg_at_10": 0.5}, "full-seed7@60": {"ndcg_at_10": 0.7},
              "full-seed1@60": {"ndcg_at_10": 0.9}, "full-seed42@240": {"ndcg_at_10": 0.8},
              "vanilla-seed42@60": {"ndcg_at_10": 0.6}, "MiniLM-L6 (zero-shot)": {"ndcg_at_10": 0.88}}
    summary = summarise(scores, {"full-seed42": 45, "full-seed7": None, "vanilla-seed42": 50})
    assert set(summary) == {"full", "vanilla"}
    at60 = summary["full"]["ndcg_at_10"][60]
    assert at60["mean"] == pytest.approx(statistics.fmean([0.5, 0.7, 0.9]))
    assert at60["std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.9]), abs=1e-4)
    assert (at60["min"], at60["max"], at60["n"]) == (0.5, 0.9, 3)
    assert summary["full"]["ndcg_at_10"][240]["std"] is None and summary["full"]["ndcg_at_10"][240]["n"] == 1
    assert summary["full"]["left_plateau_at"] == {"full-seed42": 45, "full-seed7": None}


def test_best_view_names_the_step_that_retrieves_best():
    assert best_views({"full-seed42@240": [0.2, 0.6, 0.5]}) == {
        "full-seed42@240": {"best_step": 2, "best_ndcg_at_10": 0.6, "last_ndcg_at_10": 0.5}}


def test_left_plateau_at_is_the_first_window_above_one_half(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run" / "tensorboard"))
    for step, top1 in ((5, 0.1), (10, 0.5), (15, 0.55), (20, 0.3), (25, 0.9)):
        writer.add_scalar("train/in_batch_top1", top1, step)
    writer.close()
    assert left_plateau_at(tmp_path / "run") == 15
    (tmp_path / "flat" / "tensorboard").mkdir(parents=True)
    assert left_plateau_at(tmp_path / "flat") is None


def test_every_arm_keeps_the_same_body_and_only_its_own_format():
    args = argparse.Namespace(steps=240, save_every=60, body=44, batch=None, lr=None, warmup=None, dtype=None,
                              set=[])
    configs = {arm: arm_config(arm, 42, args, Path("runs/x")) for arm in ARMS}
    assert {config["doc_body_max_length"] for config in configs.values()} == {44}
    assert configs["full"]["step_tokens"] is None and configs["full"]["train_step_rows"] is False
    assert configs["full"]["deliberation_prompt"].startswith("Use {k} words")
    assert configs["full_eos_no_prompt"]["step_token_init"] == "eos"
    assert configs["full_eos_no_prompt"]["deliberation_prompt"] == ""
    assert configs["vanilla"]["loss_variant"] == "vanilla" and configs["vanilla"]["pooling_mode"] == "last_token"
    assert configs["full"]["save_total_limit"] == 5  # every checkpoint of 60, 120, 180, 240 is kept


def test_evaluation_in_parts_only_evaluates_new_models(tmp_path, monkeypatch):
    from benchmarks import ablation

    calls = []

    def fake_evaluate(models, out, max_queries, max_corpus, tasks):
        calls.append((list(models), out.name))
        assert tasks == ablation.TEST_SET
        return ({m: {"scores": {"debian-test": {"ndcg_at_10": len(m) / 100}}, "seconds": 10.0} for m in models},
                {m: [0.1, 0.2] for m in models if m.startswith("run")})

    monkeypatch.setattr(ablation, "evaluate", fake_evaluate)
    first = ablation.evaluate_new({"base": "base", "run-a": "a@60"}, tmp_path, 200, 600)
    second = ablation.evaluate_new({"base": "base", "run-a": "a@60", "run-bb": "bb@60"}, tmp_path, 200, 600)
    assert calls == [(["base", "run-a"], "batch-0"), (["run-bb"], "batch-1")]
    assert first[0] == {"base": {"ndcg_at_10": 0.04}, "a@60": {"ndcg_at_10": 0.05}}
    assert second[0]["bb@60"] == {"ndcg_at_10": 0.06} and second[0]["a@60"] == first[0]["a@60"]
    assert second[1] == {"a@60": [0.1, 0.2], "bb@60": [0.1, 0.2]}
    assert (first[2], second[2]) == (20, 30)  # seconds summed over the parts
