"""``make eval``: MTEB retrieval metrics for one or more models, side by side.

Local BEIR folders are evaluated offline; named MTEB tasks load their data
through mteb (which needs their data to be reachable).
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

log = logging.getLogger(__name__)
METRICS = ("ndcg_at_10", "recall_at_10", "recall_at_100", "mrr_at_10")


def _quiet_offline_mteb() -> None:
    """mteb must not reach the hub or write to ~/.cache; set before importing it."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(key, "1")
    import warnings

    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    logging.getLogger("mteb").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"mteb(\..*)?")


def local_task_name(folder: Path) -> str:
    parts = [p for p in folder.resolve().parts[-2:] if p]
    return re.sub(r"[^A-Za-z0-9_-]+", "-", "-".join(parts))


def build_tasks(specs: list[str], max_queries: int | None, max_corpus: int | None):
    """Return (mteb task objects, {task name: instruction}) for folders and named tasks."""
    from debater.beir import read_beir
    from debater.mteb_model import make_local_task

    tasks, instructions = [], {}
    for spec in specs:
        folder = Path(spec)
        if folder.is_dir():
            data = read_beir(folder, max_queries=max_queries, max_corpus=max_corpus)
            name = local_task_name(folder)
            log.info("%s: %d queries, %d documents (%s)", name, len(data.queries), len(data.corpus),
                     "subset" if max_queries or max_corpus else "all")
            tasks.append(make_local_task(name, data))
            instructions[name] = data.instruction
        else:
            import mteb

            try:
                tasks.extend(mteb.get_tasks(tasks=[spec]))
            except (KeyError, ValueError) as err:
                raise ValueError(f"'{spec}' is neither a BEIR folder nor an MTEB task name ({err})") from None
    return tasks, instructions


def evaluate_model(path: str, tasks, instructions: dict, batch_size: int, max_length: int | None,
                   per_step: bool = False, trust_remote_code: bool = False, base_model: str | None = None) -> dict:
    """Main metrics of one model; with ``per_step``, also each step's (documents encoded once)."""
    from debater.inference_encoder import load_text_encoder
    from debater.mteb_model import make_mteb_model, score_with_mteb
    from debater.step_analysis import step_scores

    text_encoder = load_text_encoder(path, batch_size, max_length, remember=per_step,
                                     trust_remote_code=trust_remote_code, base_model=base_model)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", path)
    start = time.perf_counter()
    model = make_mteb_model(text_encoder, name, instructions)
    entry = {"pooling": text_encoder.pooling, "scores": score_with_mteb(model, tasks, batch_size, METRICS)}
    if per_step:
        entry["per_step"] = step_scores(text_encoder, name, tasks, instructions, batch_size)
    entry["seconds"] = round(time.perf_counter() - start, 1)
    log.info("%s evaluated in %.0f s", path, entry["seconds"])
    return entry


def markdown_table(results: dict) -> str:
    lines = ["| model | task | nDCG@10 | Recall@10 | Recall@100 | MRR@10 |", "|---|---|---|---|---|---|"]
    for model, entry in results.items():
        for task, s in entry["scores"].items():
            lines.append(f"| {model} | {task} | {s['ndcg_at_10']:.4f} | {s['recall_at_10']:.4f} | "
                         f"{s['recall_at_100']:.4f} | {s['mrr_at_10']:.4f} |")
    return "\n".join(lines) + "\n"


def run_evaluation(args) -> dict:
    _quiet_offline_mteb()
    tasks, instructions = build_tasks(args.tasks, args.max_queries, args.max_corpus)
    results = {path: evaluate_model(path, tasks, instructions, args.batch_size, args.max_length, args.per_step,
                                    args.trust_remote_code, args.base_model)
               for path in args.model}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.per_step:
        from debater.step_analysis import write_reports

        per_step = {path: entry.pop("per_step") for path, entry in results.items()}
        write_reports({p: s for p, s in per_step.items() if s is not None},
                      [p for p, s in per_step.items() if s is None], args.out)
    subset = {"max_queries": args.max_queries, "max_corpus": args.max_corpus, "max_length": args.max_length}
    (args.out / "results.json").write_text(json.dumps({"subset": subset, "results": results}, indent=2))
    table = markdown_table(results)
    (args.out / "results.md").write_text(table)
    print(table)
    return results
