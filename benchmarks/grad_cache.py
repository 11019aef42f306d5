"""Gradient caching against plain and checkpointed training: peak memory and time per step.

Gradient caching against plain training (and against gradient checkpointing, the other way to fit a
larger batch): one rank's peak memory and time per step as the per-device batch grows, at a fixed chunk,
through the launcher ``make train`` uses, on the embedded default in the paper's document format. Both modes
compute the same gradients (tests/test_grad_cache*.py); this measures what they cost. Time per step is the global batch over the trainer's logged samples/s, after the first step."""
from __future__ import annotations

from benchmarks.common import benchmark_parser, write_result
from benchmarks.launched import measure, paper_format_config

# mode -> gradient checkpointing: the two ways to fit a larger batch, next to neither
MODES = {"plain": False, "checkpointed": True, "cached": False}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("grad_cache", __doc__, model=False)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8, 16], help="per-device batches (queries)")
    parser.add_argument("--chunk", type=int, default=8, help="grad_cache_chunk_size of the cached runs")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--length", type=int, default=64, help="max tokens per query and document")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=1, help="ranks (the peak is rank 0's)")
    args = parser.parse_args(argv)
    rows = []
    for batch in args.batches:
        for mode in args.modes:
            chunk = args.chunk if mode == "cached" else 0
            run = args.out / f"{mode}-b{batch}"
            config = paper_format_config(run, batch, args.length, args.steps,
                                         {"grad_cache_chunk_size": chunk, "gradient_checkpointing": MODES[mode]})
            rows.append({"batch": batch, "global_batch": batch * args.nproc, "mode": mode, "chunk": chunk,
                         **measure(run, config, args.nproc)})
            print(rows[-1], flush=True)
    cells = "; ".join(f"{r['mode']} b{r['batch']}: " + (r["error"] if "error" in r else
                                                        f"{r['peak_mb']} MB, {r['s_per_step']} s/step") for r in rows)
    write_result({"name": args.out.name, "rows": rows, "length": args.length, "nproc": args.nproc,
                  "summary": f"rank 0 peak memory and time per step, {args.length} tokens, {args.nproc} rank(s), "
                             f"chunk {args.chunk}: {cells}"},
                 args.out, config["model_name_or_path"])
    return 0

