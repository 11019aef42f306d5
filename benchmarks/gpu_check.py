"""`make gpu-check`: the real job proven on a GPU in one command (a smoke run where there is no GPU).

With a CUDA GPU (after launch/gpu_check.sh has installed the wheelhouse and converted the model) it runs,
within a wall-clock budget, and writes OUT/report.json and OUT/report.md after every part:
1. environment: machine, GPU, driver and package versions;
2. attention: the kernel training really runs, and sdpa against eager on one batch (benchmarks/attention_check.py);
3. training: three bf16 runs side by side at the paper's global batch, checked, plotted and evaluated on the
   whole Debian test set (benchmarks/gpu_training.py), stopped in time to leave the rest its share of the budget;
4. throughput: one training step at the released shape (benchmarks/step_throughput.py).
Without one it runs the same parts on a tiny model and the test fixtures, for a few steps: a smoke run that
only shows the script works, and says so in the report.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

import torch

from benchmarks import gpu_training
from benchmarks.ablation import TEST_SET, TRAIN_DATA
from benchmarks.common import benchmark_parser
from benchmarks.step_throughput import SHAPE
from benchmarks.tiny_model import build_tiny_model, echo_texts
from debater.core.cli_support import EMBEDDED_MODEL

PACKAGES = ("torch", "transformers", "peft", "deepspeed", "datasets", "mteb", "pyarrow", "flash-attn")
SMOKE_NOTE = ("SMOKE RUN: no CUDA GPU here, so this ran a tiny random model on the test fixtures for a few steps "
              "on the CPU. It shows that the script works; its numbers say nothing about the GPU path.")
TINY_SHAPE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 64, "max_position_embeddings": 512,
              "tie_word_embeddings": True}
FIXTURES = Path("tests/fixtures")


def plan(smoke: bool, out: Path, steps: int | None) -> dict:
    """What each part runs on: the real model and data on a GPU, the tiny model and fixtures in a smoke run."""
    if not smoke:
        return {"model": EMBEDDED_MODEL, "tasks": TEST_SET, "eval_args": ["--batch-size", "256"],
                "shape": str(SHAPE), "throughput_args": ["--queries", "64", "--seq", "512"],
                "jobs": 3, "part_timeout": 240, "eval_timeout": 150, "reserve": {"throughput": 120, "eval": 90},
                "training": {"dataset_file_path": TRAIN_DATA, "per_device_train_batch_size": 256,
                             "negatives_per_query": 1, "stop_after_n_steps": steps or 100, "max_seq_length": 64,
                             "query_max_length": 48, "doc_body_max_length": 44, "torch_dtype": "bfloat16",
                             "attn_implementation": "sdpa", "grad_cache_chunk_size": 128, "warmup_steps": 10,
                             "save_steps": 25}}
    model = out / "tiny-model"
    if not (model / "config.json").exists():
        build_tiny_model(model, echo_texts(FIXTURES / "echo" / "tiny_retrieval.jsonl"))
    shape = out / "tiny-shape.json"
    shape.write_text(json.dumps(TINY_SHAPE))
    return {"model": str(model), "tasks": str(FIXTURES / "beir"), "eval_args": ["--max-length", "32"],
            "shape": str(shape), "throughput_args": ["--queries", "2", "--seq", "32"], "jobs": 1, "part_timeout": 300,
            "eval_timeout": 600, "reserve": {"throughput": 60, "eval": 30},
            "training": {"dataset_file_path": str(FIXTURES / "echo"), "model_name_or_path": str(model),
                         "per_device_train_batch_size": 4, "stop_after_n_steps": steps or 3, "max_seq_length": 32,
                         "query_max_length": 32, "torch_dtype": "float32", "grad_cache_chunk_size": 3,
                         "warmup_steps": 1}}


def environment(smoke: bool) -> dict:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    info = {"mode": "smoke" if smoke else "gpu", "python": platform.python_version(), "host": platform.node(),
            "cpus": os.cpu_count(), "versions": versions, "cuda": torch.version.cuda,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
        if shutil.which("nvidia-smi"):
            query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True)
            info["driver"] = query.stdout.strip() or None
    return info


class Report:
    """report.json and report.md, rewritten after every part so that a run cut short still leaves both."""

    def __init__(self, out: Path, smoke: bool):
        self.out, self.smoke, self.start = out, smoke, time.monotonic()
        self.data = {"mode": "smoke" if smoke else "gpu", "note": SMOKE_NOTE if smoke else None,
                     "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "parts": {}}

    def part(self, name: str, function, *args) -> dict | None:
        started = time.monotonic()
        entry: dict = {}
        try:
            entry["result"] = function(*args)
            entry["ok"] = bool(entry["result"].get("ok", True))
        except Exception as error:  # noqa: BLE001  one part failing must not lose the others' results
            entry.update(ok=False, error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-3000:])
        entry["seconds"] = round(time.monotonic() - started, 1)
        self.data["parts"][name] = entry
        self.write()
        print(f"gpu-check: {name}: {'ok' if entry['ok'] else 'FAILED'} ({entry['seconds']} s)", flush=True)
        return entry.get("result")

    def write(self) -> None:
        self.data["wall_s"] = round(time.monotonic() - self.start, 1)
        self.data["ok"] = all(p["ok"] for p in self.data["parts"].values())
        (self.out / "report.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        (self.out / "report.md").write_text(markdown(self.data))


def markdown(data: dict) -> str:
    lines = [f"# gpu-check ({data['mode']}), {data['started']}", ""]
    if data["note"]:
        lines += [f"**{data['note']}**", ""]
    lines += [f"Overall: {'ok' if data['ok'] else 'FAILED'}; wall time {data['wall_s']} s.", "",
              "| part | ok | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if p['ok'] else 'NO'} | {p['seconds']} |" for name, p in data["parts"].items()]
    for name, part in data["parts"].items():
        lines += ["", f"## {name}", ""]
        if "error" in part:
            lines += ["```", part["error"], "```"]
            continue
        result = part["result"]
        if name == "training":
            lines += ["| run | exit | s | steps logged | finite grad norm | first loss | last loss | top-1 | "
                      "largest LoRA B | problems |", "|---|---|---|---|---|---|---|---|---|---|"]
            for arm, check in result["arms"].items():
                lines.append(f"| {arm} | {check['exit']} | {check['seconds']} | {check['steps_logged']} | "
                             f"{check['steps_with_finite_grad_norm']} | {check['first_loss']} | {check['last_loss']} | "
                             f"{check['last_in_batch_top1']} | {check.get('largest_lora_b')} | "
                             f"{'; '.join(check['problems']) or '-'} |")
            lines += ["", "| model | nDCG@10 | Recall@10 | Recall@100 | MRR@10 |", "|---|---|---|---|---|"]
            for model, scores in result["scores"].items():
                lines.append(f"| {model} | " + " | ".join(f"{scores[k]:.4f}" for k in
                                                        ("ndcg_at_10", "recall_at_10", "recall_at_100", "mrr_at_10")) + " |")
            if "eval_error" in result:
                lines += ["", f"Evaluation failed: {result['eval_error']}"]
            lines += ["", f"![loss curves]({Path(result['loss_curves']).name})"]
        else:
            lines += ["```json", json.dumps(result, indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


def run_part_process(name: str, args: list[str], out: Path, timeout: float) -> dict:
    """A benchmark in its own process (a crash or an out-of-memory there cannot take the report with it);
    its result is OUT.json, its output OUT.log."""
    log, result = out.parent / f"{out.name}.log", out.parent / f"{out.name}.json"
    result.unlink(missing_ok=True)  # an earlier check's result must not stand in for this one's
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, "-m", "benchmarks", name, *args, "--out", str(out)], stdout=handle,
                              stderr=subprocess.STDOUT, timeout=timeout)
    if not result.exists():
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{name} exited {done.returncode} without a result; the end of {log}:\n{tail}")
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("gpu_check", __doc__, model=False)
    parser.set_defaults(out=Path("runs/gpu-check"))  # the folder of report.json and report.md (issue 15)
    parser.add_argument("--smoke", action="store_true", help="the smoke run even when a GPU is present")
    parser.add_argument("--steps", type=int, help="training steps per run (default: 100 on a GPU, 3 in a smoke run)")
    parser.add_argument("--budget-s", type=float, help="wall-clock budget after set-up (default: 360 on a GPU; 900 in a "
                        "smoke run, which takes about 2 minutes but must not fail on a busy machine); "
                        "training runs still going when only the evaluation's and the throughput step's share is left "
                        "are stopped and judged on their last checkpoint")
    args = parser.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    budget = args.budget_s or (900 if smoke else 360)
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out, smoke)
    if smoke:
        print(f"gpu-check: {SMOKE_NOTE}", flush=True)
    settings = plan(smoke, args.out, args.steps)
    report.part("environment", environment, smoke)
    report.part("attention", run_part_process, "attention_check", ["--model", settings["model"]],
                args.out / "attention", settings["part_timeout"])
    # training first, stopped in time to leave the evaluation and the throughput step their share of the budget
    deadline = report.start + budget - sum(settings["reserve"].values())
    report.part("training", gpu_training.run, args.out / "training", settings["training"], settings["jobs"],
                deadline, settings["model"], settings["tasks"], settings["eval_args"], settings["eval_timeout"])
    report.part("throughput", run_part_process, "step_throughput",
                ["--shape", settings["shape"], "--model", settings["model"], *settings["throughput_args"]],
                args.out / "throughput", settings["part_timeout"])
    print(f"gpu-check: report in {args.out}/report.md ({'ok' if report.data['ok'] else 'FAILED'}, "
          f"{report.data['wall_s']} s)")
    return 0 if report.data["ok"] else 1
