"""The benchmark report renders what exists (speed ratios, the ablation record, the mining rounds, the view-signal
table) and marks what was not run, without filling anything in."""
from __future__ import annotations

import json

from benchmarks.report import build_report

MACHINE = "some CPU, 2 cores"


def write(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_report_renders_each_result_and_marks_missing_ones(tmp_path):
    write(tmp_path / "trainer.json", {"summary": "trainer 1.11x", "machine": MACHINE, "command": "python -m x"})
    write(tmp_path / "ablation" / "ablation.json", {
        "steps": 240, "body_tokens": 44, "global_batch": 8, "learning_rate": 2e-4, "seeds": [7, 42],
        "subset": {"queries": 200, "corpus": 600}, "train_seconds": {"full-seed42": 1500, "full-seed7": 1080},
        "train_machine": "one GPU", "eval_seconds": 987, "machine": MACHINE,
        "command": "python -m benchmarks ablation --eval-only",
        "scores": {"full-seed42@60": {"ndcg_at_10": 0.74443, "recall_at_10": 0.865, "mrr_at_10": 0.7058}},
        "arms": {"full": {"ndcg_at_10": {"60": {"mean": 0.5, "std": 0.1, "min": 0.4, "max": 0.6, "n": 2},
                                         "240": {"mean": 0.8, "std": None, "min": 0.8, "max": 0.8, "n": 1}},
                          "left_plateau_at": {"full-seed42": 105, "full-seed7": None}}}})
    write(tmp_path / "ablation-eos-steps" / "ablation.json", {
        "steps": 60, "body_tokens": 44, "global_batch": 8, "learning_rate": 2e-4, "seeds": [7],
        "subset": {"queries": 200, "corpus": 600}, "overrides": {"scale": 60},
        "train_seconds": {"vanilla-seed7": 600}, "train_machine": MACHINE, "eval_seconds": 60, "machine": MACHINE,
        "command": "python -m benchmarks ablation --set scale=60",
        "scores": {"vanilla-seed7@60": {"ndcg_at_10": 0.7, "recall_at_10": 0.8, "mrr_at_10": 0.6}},
        "arms": {"vanilla": {"ndcg_at_10": {"60": {"mean": 0.7, "std": None, "min": 0.7, "max": 0.7, "n": 1}},
                             "left_plateau_at": {"vanilla-seed7": 45}}}})
    write(tmp_path / "view_signal.json", {
        "rows": 32, "candidates": 64, "command": "python -m benchmarks view_signal",
        "formats": {"base eos": {"doc_doc_cosine": 0.909, "score_spread": 1.78}}})
    report = build_report(tmp_path)
    assert "- **trainer**: trainer 1.11x" in report
    assert "- **preprocess**: not run" in report
    assert "Training 43 min on one GPU; evaluation 16 min (summed over its parts) on some CPU, 2 cores." in report
    assert "44 document body tokens in every arm" in report
    assert ("| full | 0.5000 ± 0.1000 [0.4000, 0.6000] (2) | 0.8000 [0.8000, 0.8000] (1) | 42: 105, 7: - |"
            in report)
    assert "| full-seed42@60 | 0.7444 | 0.8650 | 0.7058 |" in report
    first, second = report.index("subset: ablation\n"), report.index("subset: ablation-eos-steps\n")
    assert first < report.index("full-seed42@60") < second < report.index("| vanilla-seed7@60 | 0.7000 | 0.8000 |")
    assert "Config overrides: scale=60." in report
    assert report.count("Config overrides") == 1
    assert "| format | doc_doc_cosine | score_spread |" in report
    assert "| base eos | 0.909 | 1.78 |" in report


def test_an_ablation_record_missing_a_field_is_named_not_a_crash(tmp_path):
    write(tmp_path / "ablation" / "ablation.json", {"steps": 60, "seeds": [42], "scores": {}})
    report = build_report(tmp_path)
    assert "has no 'train_seconds' field; rerun that ablation" in report


def test_mining_rounds_render_each_source_on_each_set_with_its_proxies(tmp_path):
    cell = {"mean": 0.6, "std": 0.05, "min": 0.55, "max": 0.65, "n": 3}
    write(tmp_path / "mining_rounds" / "mining_rounds.json", {
        "settings": {"steps": 240}, "seeds": [1, 7, 42], "summary": "mining rounds (240 steps): ...",
        "command": "python -m benchmarks mining_rounds",
        "arms": {"debian": {"given": {"ndcg_at_10": {"240": cell}}, "bm25": {"ndcg_at_10": {"240": cell}}},
                 "stdlib-docs": {"given": {"ndcg_at_10": {"240": {**cell, "std": None, "n": 1}}}}},
        "false_negative_proxy": {"bm25": {"queries": 2000, "near_duplicate": 0.23, "above_positive": None}}})
    report = build_report(tmp_path)
    assert "## Mining rounds: mining_rounds" in report and "| negatives | debian | stdlib-docs |" in report
    assert "| given | 0.6000 ± 0.0500 [0.5500, 0.6500] (3) | 0.6000 [0.5500, 0.6500] (1) |" in report
    assert "| bm25 | 0.6000 ± 0.0500 [0.5500, 0.6500] (3) |  |" in report  # not evaluated there: left empty
    assert "| bm25 | 0.23 | None |" in report
