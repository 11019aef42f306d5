"""The benchmark report renders what exists (speed ratios, the ablation record, the view-signal table) and marks
what was not run, without filling anything in."""
from __future__ import annotations

import json

from debater.bench.report import build_report

MACHINE = "some CPU, 2 cores"


def write(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_report_renders_each_result_and_marks_missing_ones(tmp_path):
    write(tmp_path / "trainer.json", {"summary": "trainer 1.11x", "machine": MACHINE, "command": "python -m x"})
    write(tmp_path / "ablation" / "ablation.json", {
        "steps": 60, "global_batch": 8, "learning_rate": 2e-4, "seeds": [42], "subset": {"queries": 200, "corpus": 600},
        "train_wall_seconds": 2594, "train_machine": "one GPU", "eval_wall_seconds": 987, "machine": MACHINE,
        "command": "python -m debater.bench.ablation --eval-only",
        "scores": {"vanilla-seed42": {"ndcg_at_10": 0.74443, "recall_at_10": 0.865, "mrr_at_10": 0.7058}}})
    write(tmp_path / "ablation-eos-steps" / "ablation.json", {
        "steps": 60, "global_batch": 8, "learning_rate": 2e-4, "seeds": [42, 7], "subset": {"queries": 200, "corpus": 600},
        "overrides": {"step_token_init": "eos", "deliberation_prompt": ""},
        "train_wall_seconds": 600, "train_machine": MACHINE, "eval_wall_seconds": 60, "machine": MACHINE,
        "command": "python -m debater.bench.ablation --set step_token_init=eos",
        "scores": {"full-seed7": {"ndcg_at_10": 0.7, "recall_at_10": 0.8, "mrr_at_10": 0.6}}})
    write(tmp_path / "view_signal.json", {
        "rows": 32, "candidates": 64, "command": "python -m debater.bench.view_signal",
        "formats": {"base eos": {"doc_doc_cosine": 0.909, "score_spread": 1.78}}})
    report = build_report(tmp_path)
    assert "- **trainer**: trainer 1.11x" in report
    assert "- **preprocess**: not run" in report
    assert "Training 43 min on one GPU; evaluation 16 min on some CPU, 2 cores." in report
    assert "| vanilla-seed42 | 0.7444 | 0.8650 | 0.7058 |" in report
    first, second = report.index("subset: ablation\n"), report.index("subset: ablation-eos-steps\n")
    assert first < report.index("vanilla-seed42") < second < report.index("| full-seed7 | 0.7000 | 0.8000 | 0.6000 |")
    assert "Config overrides: step_token_init='eos', deliberation_prompt=''." in report
    assert report.count("Config overrides") == 1
    assert "| format | doc_doc_cosine | score_spread |" in report
    assert "| base eos | 0.909 | 1.78 |" in report


def test_an_ablation_record_missing_a_field_is_named_not_a_crash(tmp_path):
    write(tmp_path / "ablation" / "ablation.json", {"steps": 60, "seeds": [42], "scores": {}})
    report = build_report(tmp_path)
    assert "has no 'global_batch' field; rerun that ablation" in report
