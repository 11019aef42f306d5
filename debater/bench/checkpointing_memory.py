"""Peak memory of one training rank with gradient checkpointing on and off, through the launcher that
``make train`` uses, in the paper's document format on the embedded default. The rank's peak is what the
trainer logs as ``memory/peak_mb`` (resident set on CPU, allocated memory on CUDA)."""
from __future__ import annotations

import argparse
from pathlib import Path

from debater.bench.common import write_result
from debater.bench.launched import measure, paper_format_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8, help="per-device batch (queries; 3x as many texts)")
    parser.add_argument("--length", type=int, default=256, help="max tokens per query and document")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=1, help="ranks (the peak is rank 0's)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/checkpointing_memory"))
    args = parser.parse_args()
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
                 args.out.with_suffix(".json"))


if __name__ == "__main__":
    main()
