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


def evaluate_model(path: str, tasks, instructions: dict, batch_size: int, max_length: int | None) -> dict:
    import mteb

    from debater.encode import TextEncoder
    from debater.mteb_model import make_mteb_model
    from debater.model import load_encoder

    encoder, tokenizer, pooling = load_encoder(path, max_length=max_length)
    text_encoder = TextEncoder(encoder, tokenizer, pooling, batch_size)
    model = make_mteb_model(text_encoder, re.sub(r"[^A-Za-z0-9_.-]+", "_", path), instructions)
    start = time.perf_counter()
    try:
        result = mteb.evaluate(model, tasks, cache=None, overwrite_strategy="always", co2_tracker=False,
                               show_progress_bar=False, encode_kwargs={"batch_size": batch_size,
                                                                       "show_progress_bar": False})
    except OSError as err:
        raise RuntimeError(f"mteb could not load a task's data (offline?): {err}") from None
    scores = {}
    for task_result in result.task_results:
        row = next(s for s in task_result.scores["test"] if s["hf_subset"] == "default")
        scores[task_result.task_name] = {m: float(row[m]) for m in METRICS}
    log.info("%s evaluated in %.0f s", path, time.perf_counter() - start)
    return {"pooling": pooling, "seconds": round(time.perf_counter() - start, 1), "scores": scores}


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
    results = {path: evaluate_model(path, tasks, instructions, args.batch_size, args.max_length)
               for path in args.model}
    args.out.mkdir(parents=True, exist_ok=True)
    subset = {"max_queries": args.max_queries, "max_corpus": args.max_corpus, "max_length": args.max_length}
    (args.out / "results.json").write_text(json.dumps({"subset": subset, "results": results}, indent=2))
    table = markdown_table(results)
    (args.out / "results.md").write_text(table)
    print(table)
    return results
