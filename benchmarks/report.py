"""Gather the benchmark results under one folder into report.md.

Each speed ratio with its command and machine, then one table per ablation (``ablation*/ablation.json``).
Only results that exist are reported; nothing is filled in."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import BENCH_DIR

# each against its baseline in one run on one machine; view_signal.json is a diagnostic, reported apart
SPEED = ("preprocess", "train_step", "trainer", "encoding", "mining", "checkpointing_memory", "grad_cache",
         "grad_cache_global64")


def speed_lines(results: dict[str, dict]) -> list[str]:
    lines = ["## Speed and memory (each against its baseline, in one run, same machine)", ""]
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
    train_minutes = sum(result["train_seconds"].values()) / 60
    lines = [f"## Ablation on the Debian test subset: {name}", "",
             *([f"Config overrides: {overrides}.", ""] if overrides else []),
             f"Up to {result['steps']} steps x global batch {result['global_batch']}, lr {result['learning_rate']}, "
             f"{result['body_tokens']} document body tokens in every arm, seeds {result['seeds']}; "
             f"{result['subset']['queries']} queries / {result['subset']['corpus']} documents. "
             f"Training {train_minutes:.0f} min on {result['train_machine']}; evaluation "
             f"{result['eval_seconds'] / 60:.0f} min (summed over its parts) on {result['machine']}.", "",
             f"command: `{result['command']}`", ""]
    steps = sorted({int(step) for arm in result["arms"].values() for step in arm["ndcg_at_10"]})
    lines += ["nDCG@10 over seeds: mean ± sample std [min, max] (n); the step each seed left the plateau "
              "(window in-batch top-1 first above 0.5; '-' never).", "",
              "| arm | " + " | ".join(f"step {step}" for step in steps) + " | left the plateau at |",
              "|---" * (len(steps) + 2) + "|"]
    for arm, summary in result["arms"].items():
        cells = []
        for step in steps:
            cell = summary["ndcg_at_10"].get(str(step), summary["ndcg_at_10"].get(step))
            std = "" if cell is None or cell["std"] is None else f" ± {cell['std']:.4f}"
            cells.append("" if cell is None else
                         f"{cell['mean']:.4f}{std} [{cell['min']:.4f}, {cell['max']:.4f}] ({cell['n']})")
        left = ", ".join(f"{run.split('-seed')[1]}: {step if step is not None else '-'}"
                         for run, step in summary["left_plateau_at"].items())
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {left} |")
    lines += ["", "| model | nDCG@10 | Recall@10 | MRR@10 |", "|---|---|---|---|"]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks report", description=__doc__)
    parser.add_argument("folder", type=Path, nargs="?", default=BENCH_DIR,
                        help="the benchmarks' output folder (default: %(default)s)")
    folder = parser.parse_args(argv).folder
    report = build_report(folder)
    (folder / "report.md").write_text(report)
    print(report)
    return 0

