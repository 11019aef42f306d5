"""Preprocessing: our pipeline against the original code's way and the bare tokenizer, same rows.

- ours: ``data_pipeline.stage_tokenize.preprocess`` from the jsonl folder to
  Arrow shards (reading, validation, tokenizing, writing), one worker per core;
- original: every row read into Python lists, then per batch of 64 rows the
  collator tokenizes queries, positives and negatives (padded tensors), plus
  one extra tokenizer call per text (its part after the instruction, alone)
  to find the instruction boundary, as llm2vec's ``tokenize`` does;
- bare: the fast tokenizer alone on the same formatted texts, already in
  memory, in large batches (its own threads), no file work at all.

``--memory`` also reports the peak RSS (all processes of the run summed) of
``python -m data_pipeline preprocess`` on ``--rows`` rows and on 10x as many.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import benchmark_parser, measured_run, write_result
from data_pipeline.registry import DATASETS_FILE_NAME, instructions_for, load_extra_instructions
from debater.core.prompts import EncodingSettings

ORIGINAL_BATCH = 64
BARE_BATCH = 10_000


def sample_folder(source: Path, rows: int, folder: Path) -> Path:
    """``rows`` rows of the source file (cycled when it has fewer) in an echo folder of its own."""
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / source.name, "w") as handle:
        for index in range(rows):
            handle.write(lines[index % len(lines)] + "\n")
    datasets = source.parent / DATASETS_FILE_NAME
    if datasets.exists():
        shutil.copy(datasets, folder / DATASETS_FILE_NAME)
    return folder / source.name


def load_rows(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def time_ours(folder: Path, out: Path, model: str, settings: EncodingSettings) -> float:
    import transformers.models.auto.tokenization_auto  # noqa: F401  (a one-off import, not per-row work)

    from data_pipeline.stage_tokenize import preprocess

    start = time.perf_counter()
    preprocess(folder, out, model, settings)
    return time.perf_counter() - start


def time_bare(tokenizer, settings: EncodingSettings, queries: list[str], docs: list[str]) -> float:
    start = time.perf_counter()
    for texts, limit in ((queries, settings.query_max_length), (docs, settings.doc_max_length)):
        for first in range(0, len(texts), BARE_BATCH):
            tokenizer(texts[first:first + BARE_BATCH], truncation=True, max_length=limit)
    return time.perf_counter() - start


def time_original(path: Path, tokenizer, settings: EncodingSettings, instruction: str, suffix: str) -> float:
    """The released code's shape (llm2vec's tokenize): all rows in lists, then per batch of 64 the
    collator tokenizes each text group padded, and each text's part after the instruction once more,
    alone, to find where the instruction ends."""
    start = time.perf_counter()
    rows = load_rows(path)
    for first in range(0, len(rows), ORIGINAL_BATCH):
        batch = rows[first:first + ORIGINAL_BATCH]
        negatives = [r["negative"] if isinstance(r["negative"], str) else r["negative"][0] for r in batch]
        for prefix, contents, limit in ((f"{instruction} ", [r["query"] for r in batch], settings.query_max_length),
                                        ("", [r["positive"] + suffix for r in batch], settings.doc_max_length),
                                        ("", [n + suffix for n in negatives], settings.doc_max_length)):
            tokenizer([prefix + c for c in contents], padding=True, truncation=True, max_length=limit,
                      return_tensors="pt")
            for content in contents:
                tokenizer([content], padding=True, truncation=True, max_length=limit, add_special_tokens=False,
                          return_tensors="pt")
    return time.perf_counter() - start


def speed(args) -> dict:
    from data_pipeline.stage_tokenize import load_tokenizer
    from debater.core.prompts import TextFormatter

    settings = EncodingSettings(query_max_length=args.max_length, doc_max_length=args.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        path = sample_folder(args.data, args.rows, Path(tmp) / "data")
        ours = time_ours(path.parent, Path(tmp) / "out", args.model, settings)
        tokenizer = load_tokenizer(args.model, settings)
        instruction = instructions_for(path.stem, load_extra_instructions(path.parent / DATASETS_FILE_NAME))[0]
        rows = load_rows(path)
        suffix = " " + settings.prompt_text() + "".join(settings.step_tokens)
        queries = [f"{instruction} {r['query']}" for r in rows]
        docs = [r["positive"] + suffix for r in rows] + [
            (r["negative"] if isinstance(r["negative"], str) else r["negative"][0]) + suffix for r in rows]
        TextFormatter(tokenizer, settings)  # the same checks as ours, outside the timings
        bare = time_bare(tokenizer, settings, queries, docs)
        original = time_original(path, tokenizer, settings, instruction, suffix)
    per_s = {name: args.rows / seconds for name, seconds in
             (("ours", ours), ("original", original), ("bare_tokenizer", bare))}
    return {
        "rows": args.rows, "max_length": args.max_length,
        "seconds": {"ours": round(ours, 2), "original": round(original, 2), "bare_tokenizer": round(bare, 2)},
        "rows_per_s": {k: round(v) for k, v in per_s.items()},
        "speedup_vs_original": round(per_s["ours"] / per_s["original"], 2),
        "fraction_of_bare_tokenizer": round(per_s["ours"] / per_s["bare_tokenizer"], 2),
    }


def memory(args) -> dict:
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (args.rows, 10 * args.rows):
            path = sample_folder(args.data, rows, Path(tmp) / f"data-{rows}")
            command = [sys.executable, "-m", "data_pipeline", "preprocess", "--data", str(path.parent),
                       "--out", str(Path(tmp) / f"out-{rows}"), "--model", args.model,
                       "--max-seq-length", str(args.max_length), "--query-max-length", str(args.max_length)]
            result[str(rows)] = round(measured_run(command)[0])
    return {"peak_rss_mb": result}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("preprocess", __doc__)
    parser.add_argument("--data", type=Path, default=Path("assets/data/debian/echo-data/debian_packages.jsonl"))
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS on --rows and 10x rows")
    args = parser.parse_args(argv)
    result = {"name": "preprocess", **speed(args)}
    if args.memory:
        result.update(memory(args))
    result["summary"] = (
        f"preprocess {args.rows} rows: ours {result['rows_per_s']['ours']} rows/s, "
        f"{result['speedup_vs_original']}x the original collator, "
        f"{result['fraction_of_bare_tokenizer']:.0%} of the bare tokenizer"
        + (f"; peak RSS {result['peak_rss_mb']} MB" if args.memory else ""))
    write_result(result, args.out, args.model)
    return 0

