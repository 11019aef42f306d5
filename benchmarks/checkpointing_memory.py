"""Peak memory of one training rank with gradient checkpointing on and off.

Peak memory of one training rank with gradient checkpointing on and off, through the launcher that
``make train`` uses, in the paper's document format on the embedded default. The rank's peak is what the
trainer logs as ``memory/peak_mb`` (resident set on CPU, allocated memory on CUDA)."""
from __future__ import annotations

from benchmarks.common import benchmark_parser, write_result
from benchmarks.launched import measure, paper_format_config


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("checkpointing_memory", __doc__, model=False)
    parser.add_argument("--batch", type=int, default=8, help="per-device batch (queries; 3x as many texts)")
    parser.add_argument("--length", type=int, default=256, help="max tokens per query and document")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=1, help="ranks (the peak is rank 0's)")
    args = parser.parse_args(argv)
    peaks = {}
    for name, checkpointing in (("off", False), ("on", True)):
        run = args.out / name
        config = paper_format_config(run, args.batch, args.length, args.steps,
                                     {"gradient_checkpointing": checkpointing})
        measured = measure(run, config, args.nproc)
        if "error" in measured:
            raise SystemExit(measured["error"])
        peaks[name] = measured["peak_mb"]
    write_result({"name": "checkpointing_memory", "batch": args.batch, "length": args.length, "nproc": args.nproc,
                  "peak_mb": peaks,
                  "summary": f"peak memory of rank 0 ({args.batch} per device x {args.length} tokens): checkpointing "
                             f"off {peaks['off']:.0f} MB, on {peaks['on']:.0f} MB"},
                 args.out, config["model_name_or_path"])
    return 0

