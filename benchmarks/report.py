"""Gather the benchmark results under one folder into report.md.

Each speed ratio with its command and machine, then one table per ablation (``ablation*/ablation.json``) and
per mining-rounds comparison (``mining_rounds*/mining_rounds.json``). Only results that exist are reported;
nothing is filled in."""
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


def spread_cell(cell: dict | None) -> str:
    """mean ± sample std [min, max] (n) of one score over seeds; empty when not measured."""
    if cell is None:
        return ""
    std = "" if cell["std"] is None else f" ± {cell['std']:.4f}"
    return f"{cell['mean']:.4f}{std} [{cell['min']:.4f}, {cell['max']:.4f}] ({cell['n']})"


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
        cells = [spread_cell(summary["ndcg_at_10"].get(str(step), summary["ndcg_at_10"].get(step)))
                 for step in steps]
        left = ", ".join(f"{run.split('-seed')[1]}: {step if step is not None else '-'}"
                         for run, step in summary["left_plateau_at"].items())
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {left} |")
    lines += ["", "| model | nDCG@10 | Recall@10 | MRR@10 |", "|---|---|---|---|"]
    for model, scores in result["scores"].items():
        lines.append(f"| {model} | {scores['ndcg_at_10']:.4f} | {scores['recall_at_10']:.4f} | "
                     f"{scores['mrr_at_10']:.4f} |")
    return lines


def rounds_lines(name: str, result: dict) -> list[str]:
    """Each negative source's nDCG@10 on each held-out set at the budget, and its false-negative proxies."""
    step = str(result["settings"]["steps"])
    sets = list(result["arms"])
    lines = [f"## Mining rounds: {name}", "", f"{result['summary']}; command: `{result['command']}`", "",
             "nDCG@10 over seeds: mean ± sample std [min, max] (n). False-negative proxies per data folder: the "
             "share of its negatives that are near-duplicates of their positive, and that score above it.", "",
             "| negatives | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for arm in result["arms"][sets[0]]:
        cells = [spread_cell(result["arms"][eval_set].get(arm, {}).get("ndcg_at_10", {}).get(step))
                 for eval_set in sets]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "| data folder | near-duplicate | above the positive |", "|---|---|---|"]
    for folder, proxy in result["false_negative_proxy"].items():
        lines.append(f"| {folder} | {proxy['near_duplicate']} | {proxy['above_positive']} |")
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
    for rounds in sorted(folder.glob("mining_rounds*/mining_rounds.json")):
        lines += rounds_lines(rounds.parent.name, json.loads(rounds.read_text())) + [""]
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

