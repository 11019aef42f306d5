"""Per-step analysis: how well each deliberation step's document embedding retrieves on its own.

The paper reports steps 1-2 weak, later steps better, then a plateau; this
measures that curve for our models. Documents are encoded once with all their
views (the TextEncoder remembers them from the main evaluation); each step is
then scored by mteb as if it were the model's only document vector, so the
numbers are computed exactly as the main table's (the last step of a
``last_step`` model reproduces its main nDCG@10). The views stay in memory
for the whole run: N documents x K steps x hidden size x 4 bytes per task.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from debater.inference_encoder import TextEncoder
from debater.mteb_model import make_mteb_model, score_with_mteb

log = logging.getLogger(__name__)
STEP_METRICS = ("ndcg_at_10", "recall_at_10")


class StepView:
    """A TextEncoder seen through one document view (``step`` counts from 1), as make_mteb_model expects."""

    pooling = "last_step"

    def __init__(self, text_encoder: TextEncoder, step: int):
        self.text_encoder = text_encoder
        self.step = step

    def queries(self, texts: list[str], instruction: str) -> np.ndarray:
        return self.text_encoder.queries(texts, instruction)

    def documents(self, texts: list[str]) -> np.ndarray:
        return self.text_encoder.document_views(texts)[:, self.step - 1]


def step_scores(text_encoder: TextEncoder, name: str, tasks, instructions: dict[str, str],
                batch_size: int) -> dict[str, dict[str, list[float]]] | None:
    """{task: {metric: [value at step 1, ..., step K]}}, or None for a model without step views."""
    settings = text_encoder.settings
    if settings.num_views == 1:
        log.info("per-step: %s skipped: its documents have one view (doc_mode=%s), no deliberation steps",
                 name, settings.doc_mode)
        return None
    by_step = [score_with_mteb(make_mteb_model(StepView(text_encoder, step), f"{name}-step{step}", instructions),
                               tasks, batch_size, STEP_METRICS) for step in range(1, settings.num_views + 1)]
    return {task: {metric: [scores[task][metric] for scores in by_step] for metric in STEP_METRICS}
            for task in by_step[0]}


def markdown_table(per_step: dict[str, dict]) -> str:
    """One row per model, task and metric; one column per step."""
    steps = max((len(values) for tasks in per_step.values() for task in tasks.values() for values in task.values()),
                default=0)
    lines = ["| model | task | metric | " + " | ".join(f"step {k}" for k in range(1, steps + 1)) + " |",
             "|---|---|---|" + "---|" * steps]
    for model, tasks in per_step.items():
        for task, metrics in tasks.items():
            for metric, values in metrics.items():
                cells = [f"{v:.4f}" for v in values] + [""] * (steps - len(values))
                label = metric.replace("ndcg_at_", "nDCG@").replace("recall_at_", "Recall@")
                lines.append(f"| {model} | {task} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(per_step: dict[str, dict], path: Path) -> None:
    """nDCG@10 against the step, one line per model and task."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for model, tasks in per_step.items():
        for task, metrics in tasks.items():
            values = metrics["ndcg_at_10"]
            axes.plot(range(1, len(values) + 1), values, marker="o", label=f"{model} / {task}")
    axes.set(xlabel="deliberation step", ylabel="nDCG@10", title="Each step's document embedding used alone")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)


def write_reports(per_step: dict[str, dict], skipped: list[str], out: Path) -> None:
    """OUT/per_step.json, per_step.md and (when a model has steps) per_step.png."""
    (out / "per_step.json").write_text(json.dumps({"results": per_step, "skipped": skipped}, indent=2))
    note = "".join(f"\n{model}: skipped, its documents have one view (no deliberation steps).\n" for model in skipped)
    (out / "per_step.md").write_text(markdown_table(per_step) + note)
    if per_step:
        plot(per_step, out / "per_step.png")
    log.info("per-step analysis written to %s", out)
