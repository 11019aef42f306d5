"""Gather the benchmark results under one folder into ``report.md``: each speed ratio with its command and
machine, then one table per ablation (``ablation*/ablation.json``). Only results that exist are reported;
nothing is filled in."""
from __future__ import annotations

import json
import sys
from pathlib import Path

SPEED = ("preprocess", "train_step", "trainer", "encoding")  # view_signal.json is a diagnostic, reported apart


def speed_lines(results: dict[str, dict]) -> list[str]:
    lines = ["## Speed ratios (each against the naive way, in one run, same machine)", ""]
    for name in SPEED:
        if name not in results:
            lines.append(f"- **{name}**: not run")
            continue
        result = results[name]
        lines += [f"- **{name}**: {result['summary']}", f"  - machine: {result['machine']}",
                  f"  - command: `{result['command']}`"]
    return lines


def ablation_lines(name: str, result: dict) -> list[str]:
    overrides = ", ".join(f"{key}={value!r}" for key, value in result.get("overrides", {}).items())
    lines = [f"## Ablation on the Debian test subset: {name}", "",
             *([f"Config overrides: {overrides}.", ""] if overrides else []),
             f"{result['steps']} steps x global batch {result['global_batch']} per variant, "
             f"lr {result['learning_rate']}, seeds {result['seeds']}; {result['subset']['queries']} queries / "
             f"{result['subset']['corpus']} documents. "
             f"Training {result['train_wall_seconds'] / 60:.0f} min on {result['train_machine']}; evaluation "
             f"{result['eval_wall_seconds'] / 60:.0f} min on {result['machine']}.", "",
             f"command: `{result['command']}`", "",
             "| model | nDCG@10 | Recall@10 | MRR@10 |", "|---|---|---|---|"]
    for model, scores in result["scores"].items():
        lines.append(f"| {model} | {scores['ndcg_at_10']:.4f} | {scores['recall_at_10']:.4f} | "
                     f"{scores['mrr_at_10']:.4f} |")
    return lines


def view_signal_lines(result: dict) -> list[str]:
    columns = list(next(iter(result["formats"].values())))
    lines = ["## Document views before training", "",
             f"{result['rows']} queries against {result['candidates']} candidates; the base model's formats, then "
             "any trained runs; "
             f"command: `{result['command']}`", "",
             "| format | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, stats in result["formats"].items():
        lines.append(f"| {name} | " + " | ".join(str(stats[column]) for column in columns) + " |")
    return lines


def build_report(folder: Path) -> str:
    results = {path.stem: json.loads(path.read_text()) for path in folder.glob("*.json")}
    lines = ["# Benchmark report", "", *speed_lines(results), ""]
    for ablation in sorted(folder.glob("ablation*/ablation.json")):
        try:
            lines += ablation_lines(ablation.parent.name, json.loads(ablation.read_text())) + [""]
        except KeyError as missing:  # a record from an older version of the ablation
            lines += [f"## Ablation: {ablation.parent.name}", "",
                      f"not reported: {ablation} has no {missing} field; rerun that ablation", ""]
    if "view_signal" in results:
        lines += view_signal_lines(results["view_signal"])
    return "\n".join(lines) + "\n"


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench")
    report = build_report(folder)
    (folder / "report.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
