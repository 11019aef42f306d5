"""Peak memory of one training rank with gradient checkpointing on and off, through the launcher that
``make train`` uses, in the paper's document format on the embedded default. The rank's peak is what the
trainer logs as ``memory/peak_mb`` (resident set on CPU, allocated memory on CUDA)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from debater.bench.ablation import BASE_CONFIG, PAPER_FORMAT, TRAIN_DATA
from debater.bench.common import tensorboard_scalars, write_result


def train(run: Path, checkpointing: bool, args: argparse.Namespace) -> float:
    config = json.loads(BASE_CONFIG.read_text())
    config.update(PAPER_FORMAT)
    config.update({"output_dir": str(run), "dataset_file_path": TRAIN_DATA, "loss_variant": "full",
                   "per_device_train_batch_size": args.batch, "max_seq_length": args.length,
                   "query_max_length": args.length, "stop_after_n_steps": args.steps, "logging_steps": 1,
                   "save_steps": args.steps, "gradient_checkpointing": checkpointing})
    run.mkdir(parents=True, exist_ok=True)
    config_path = run.parent / f"{run.name}.json"
    config_path.write_text(json.dumps(config, indent=2))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    subprocess.run(["launch/single_node.sh", str(config_path), str(args.nproc)], env=env, check=True)
    return max(tensorboard_scalars(run, "memory/peak_mb").values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8, help="per-device batch (queries; 3x as many texts)")
    parser.add_argument("--length", type=int, default=256, help="max tokens per query and document")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=1, help="ranks (the peak is rank 0's)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/checkpointing_memory"))
    args = parser.parse_args()
    peaks = {"off": train(args.out / "off", False, args), "on": train(args.out / "on", True, args)}
    write_result({"name": "checkpointing_memory", "batch": args.batch, "length": args.length, "nproc": args.nproc,
                  "peak_mb": peaks,
                  "summary": f"peak memory of rank 0 ({args.batch} per device x {args.length} tokens): checkpointing "
                             f"off {peaks['off']:.0f} MB, on {peaks['on']:.0f} MB"},
                 args.out.with_suffix(".json"))


if __name__ == "__main__":
    main()
