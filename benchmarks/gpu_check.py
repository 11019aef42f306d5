"""`make gpu-check`: the real job proven on a GPU in one command (a smoke run where there is no GPU).

With a CUDA GPU (after launch/gpu_check.sh has unpacked and installed the wheelhouse) it runs these parts in
this order, the most valuable evidence first, each stopped at its limit (benchmarks/gpu_budget.py), and rewrites
OUT/report.json and OUT/report.md after every one, so a run cut short keeps what it found:
1. preflight: imports, version constraints, CUDA, GPU, Triton, flash-attn, the machine (benchmarks/preflight.py);
2. model: the GGUF converted into a model folder, its EOS and padding checked against the GGUF's metadata;
3. attention: the kernel training really runs, and sdpa against eager (benchmarks/attention_check.py);
4. timing: 5 steps at the arms' model, sequence length and the paper's batch, tokens/s with keyed LoRA dropout
   and without (benchmarks/step_throughput.py);
5. training: three bf16 runs side by side at the paper's global batch, a checkpoint every 5 steps, stopped at
   the deadline once each has one, exported and checked (benchmarks/gpu_training.py);
6. evaluation: the base model and every adapter on the whole Debian test set;
7. throughput: one training step at the released shape (benchmarks/step_throughput.py).
Without one it runs the same parts on a tiny model and the test fixtures, for a few steps: a smoke run that
only shows the script works, and says so in the report.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks import gpu_training
from benchmarks.ablation import TEST_SET, TRAIN_DATA
from benchmarks.common import benchmark_parser, free_port
from benchmarks.gpu_budget import (GPU_CHECKPOINT_EVERY, GPU_PARTS, GPU_TRAINING, SMOKE_CHECKPOINT_EVERY,
                                   SMOKE_PARTS, SMOKE_TRAINING, training_deadline)
from benchmarks.preflight import preflight
from benchmarks.step_throughput import SHAPE
from benchmarks.tiny_model import build_tiny_model, echo_texts
from debater.core.cli_support import EMBEDDED_MODEL

SMOKE_NOTE = ("SMOKE RUN: no CUDA GPU here, so this ran a tiny random model on the test fixtures for a few steps "
              "on the CPU. It shows that the script works; its numbers say nothing about the GPU path.")
TINY_SHAPE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 64, "max_position_embeddings": 512,
              "tie_word_embeddings": True}
FIXTURES = Path("tests/fixtures")
STARTED_ENV = "GPU_CHECK_STARTED"  # set by launch/gpu_check.sh before set-up: the budget's clock starts there
WHEELHOUSE_GGUF = "wheelhouse/unpacked/model"


def plan(smoke: bool, out: Path, steps: int | None) -> dict:
    """What each part runs on: the real model and data on a GPU, the tiny model and fixtures in a smoke run."""
    if not smoke:
        training = {"dataset_file_path": TRAIN_DATA, "per_device_train_batch_size": 256, "negatives_per_query": 1,
                    "stop_after_n_steps": steps or 100, "max_seq_length": 64, "query_max_length": 48,
                    "doc_body_max_length": 44, "torch_dtype": "bfloat16", "attn_implementation": "sdpa",
                    "grad_cache_chunk_size": 128, "warmup_steps": 10, "save_steps": GPU_CHECKPOINT_EVERY}
        return {"parts": GPU_PARTS, "share": GPU_TRAINING, "model": EMBEDDED_MODEL, "tasks": TEST_SET,
                "eval_args": ["--batch-size", "256"], "training": training,
                # one arm's step: its model and sequence length, the paper's 256 queries with one hard negative each
                "timing_args": ["--shape", f"{EMBEDDED_MODEL}/config.json", "--queries", "256", "--seq", "64",
                                "--timed-steps", "5"],  # 5 steps with keyed dropout, 5 without, after a warm-up
                "throughput_args": ["--shape", str(SHAPE), "--queries", "64", "--seq", "512"]}
    model = out / "tiny-model"
    shape = out / "tiny-shape.json"
    shape.write_text(json.dumps(TINY_SHAPE))
    tiny_step = ["--shape", str(shape), "--queries", "2", "--seq", "32", "--timed-steps", "1"]
    return {"parts": SMOKE_PARTS, "share": SMOKE_TRAINING, "model": str(model), "tasks": str(FIXTURES / "beir"),
            "eval_args": ["--max-length", "32"], "timing_args": tiny_step,
            "training": {"dataset_file_path": str(FIXTURES / "echo"), "model_name_or_path": str(model),
                         "per_device_train_batch_size": 4, "stop_after_n_steps": steps or 3, "max_seq_length": 32,
                         "query_max_length": 32, "torch_dtype": "float32", "grad_cache_chunk_size": 3,
                         "warmup_steps": 1, "save_steps": SMOKE_CHECKPOINT_EVERY}}


def prepare_model(smoke: bool, model: str, gguf: Path | None, limit: float) -> dict:
    """The model every later part loads: on a GPU the wheelhouse's GGUF converted (the conversion checks EOS and
    padding against the GGUF's metadata; they are reported here); in a smoke run the tiny random model."""
    from debater.gguf_convert import check_special_tokens, find_package_gguf, gguf_special_token_ids

    if smoke:  # the tiny model; the special-token check on the embedded model, where `make assets` converted it
        if not (Path(model) / "config.json").exists():
            build_tiny_model(Path(model), echo_texts(FIXTURES / "echo" / "tiny_retrieval.jsonl"))
        result = {"model": model, "note": "smoke run: a tiny random model, no GGUF conversion"}
        if (Path(EMBEDDED_MODEL) / "config.json").exists():
            gguf = gguf or find_package_gguf()
            result[f"special_tokens of {EMBEDDED_MODEL}"] = check_special_tokens(Path(EMBEDDED_MODEL),
                                                                                 gguf_special_token_ids(gguf))
        return result
    gguf = gguf or next(Path(WHEELHOUSE_GGUF).glob("*.gguf"))
    done = subprocess.run([sys.executable, "-m", "debater", "convert-model", "--gguf", str(gguf), "--out", model],
                          capture_output=True, text=True, timeout=limit)
    if done.returncode != 0:
        raise RuntimeError(f"converting {gguf} failed: {done.stderr.strip()[-1500:]}")
    return {"model": model, "gguf": str(gguf), "special_tokens": check_special_tokens(Path(model),
                                                                                      gguf_special_token_ids(gguf))}


class Report:
    """report.json and report.md, rewritten after every part so that a run cut short still leaves both. The clock
    starts where launch/gpu_check.sh started the set-up, so the wall time is the whole check's."""

    def __init__(self, out: Path, smoke: bool, parts: dict):
        self.out, self.smoke, self.parts = out, smoke, parts
        began = float(os.environ.get(STARTED_ENV, time.time()))
        self.start = time.monotonic() - (time.time() - began)
        self.data = {"mode": "smoke" if smoke else "gpu", "note": SMOKE_NOTE if smoke else None,
                     "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(began)), "parts": {}}
        if STARTED_ENV in os.environ:  # the set-up script's part: it stopped the check itself had it failed
            self.data["parts"]["setup"] = {"ok": True, "seconds": round(time.monotonic() - self.start, 1),
                                           "limit": parts["setup"].limit, "result": {"by": "launch/gpu_check.sh"}}

    def part(self, name: str, function, *args) -> dict | None:
        started = time.monotonic()
        entry: dict = {}
        try:
            entry["result"] = function(*args)
            entry["ok"] = bool(entry["result"].get("ok", True))
        except Exception as error:  # noqa: BLE001  one part failing must not lose the others' results
            entry.update(ok=False, error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-3000:])
        entry.update(seconds=round(time.monotonic() - started, 1), limit=self.parts[name].limit)
        if entry["seconds"] > entry["limit"]:  # the budget's sum no longer holds: say so even if the part passed
            entry.update(ok=False, over_limit=True)
        self.data["parts"][name] = entry
        self.write()
        print(f"gpu-check: {name}: {'ok' if entry['ok'] else 'FAILED'} ({entry['seconds']} s of {entry['limit']})",
              flush=True)
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
    lines += [f"Overall: {'ok' if data['ok'] else 'FAILED'}; wall time {data['wall_s']} s (set-up included).", "",
              "| part | ok | seconds | limit |", "|---|---|---|---|"]
    lines += [f"| {name} | {'yes' if p['ok'] else 'NO'} | {p['seconds']} | {p['limit']} |"
              for name, p in data["parts"].items()]
    for name, part in data["parts"].items():
        lines += ["", f"## {name}", ""]
        if "error" in part:
            lines += ["```", part["error"], "```"]
            continue
        result = part["result"]
        if name == "preflight" and result.get("problems"):
            lines += ["Problems:", *[f"- {problem}" for problem in result["problems"]], ""]
        if name == "training":
            lines += ["| run | exit | s | stopped at deadline | steps logged | finite grad norm | first loss | last loss "
                      "| top-1 | largest LoRA B | problems |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for arm, check in result["arms"].items():
                lines.append(f"| {arm} | {check['exit']} | {check['seconds']} | "
                             f"{'yes' if check.get('stopped_at_deadline') else 'no'} | {check['steps_logged']} | "
                             f"{check['steps_with_finite_grad_norm']} | {check['first_loss']} | {check['last_loss']} | "
                             f"{check['last_in_batch_top1']} | {check.get('largest_lora_b')} | "
                             f"{'; '.join(check['problems']) or '-'} |")
            lines += ["", f"![loss curves]({Path(result['loss_curves']).name})"]
        elif name == "evaluation":
            lines += ["| model | nDCG@10 | Recall@10 | Recall@100 | MRR@10 |", "|---|---|---|---|---|"]
            for model, scores in result["scores"].items():
                lines.append(f"| {model} | " + " | ".join(f"{scores[k]:.4f}" for k in
                                                        ("ndcg_at_10", "recall_at_10", "recall_at_100", "mrr_at_10")) + " |")
        else:
            lines += ["```json", json.dumps(result, indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


def run_part_process(name: str, args: list[str], out: Path, limit: float) -> dict:
    """A benchmark in its own process (a crash or an out-of-memory there cannot take the report with it), stopped
    with everything under it at ``limit`` seconds; its result is OUT.json, its output OUT.log."""
    log, result = out.parent / f"{out.name}.log", out.parent / f"{out.name}.json"
    result.unlink(missing_ok=True)  # an earlier check's result must not stand in for this one's
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "benchmarks", name, *args, "--out", str(out)],
                                   stdout=handle, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            gpu_training.stop_trees([process])
            raise TimeoutError(f"{name} ran past its limit of {limit} s and was stopped (see {log})") from None
    if not result.exists():
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{name} exited {process.returncode} without a result; the end of {log}:\n{tail}")
    return json.loads(result.read_text())


def timing_step_again(timing: dict | None) -> dict:
    """The throughput part of a smoke run: the timing part ran the very same tiny step, so its result stands."""
    if timing is None:
        raise RuntimeError("the timing part failed, and in a smoke run the throughput part is its step")
    return {**timing, "note": "smoke run: the timing part's step (the same tiny step), not run again"}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("gpu_check", __doc__, model=False)
    parser.set_defaults(out=Path("runs/gpu-check"))  # the folder of report.json and report.md (issue 15)
    parser.add_argument("--smoke", action="store_true", help="the smoke run even when a GPU is present")
    parser.add_argument("--steps", type=int, help="training steps per run (default: 100 on a GPU, 3 in a smoke run)")
    parser.add_argument("--arms", nargs="+", choices=list(gpu_training.TRAINING_ARMS),
                        default=list(gpu_training.TRAINING_ARMS), metavar="ARM",
                        help=f"training arms to run, at once (default: all: {' '.join(gpu_training.TRAINING_ARMS)})")
    parser.add_argument("--gguf", type=Path, help=f"the GGUF to convert (default: the one in {WHEELHOUSE_GGUF}/)")
    parser.add_argument("--training-deadline-s", type=float,
                        help="seconds into the training part at which runs still going are stopped, each once it "
                             "has published a checkpoint (default: what the part's limit leaves after the exports, "
                             "benchmarks/gpu_budget.py)")
    args = parser.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = plan(smoke, args.out, args.steps)
    parts, share, model = settings["parts"], settings["share"], settings["model"]
    report = Report(args.out, smoke, parts)
    if smoke:
        print(f"gpu-check: {SMOKE_NOTE}", flush=True)
    report.part("preflight", preflight)
    report.part("model", prepare_model, smoke, model, args.gguf, parts["model"].limit)
    report.part("attention", run_part_process, "attention_check", ["--model", model], args.out / "attention",
                parts["attention"].limit)
    timing = report.part("timing", run_part_process, "step_throughput",
                         [*settings["timing_args"], "--model", model, "--port", str(free_port())],
                         args.out / "timing", parts["timing"].limit)
    arms, limit, started = len(args.arms), parts["training"].limit, time.monotonic()
    deadline = started + (args.training_deadline_s if args.training_deadline_s is not None
                          else training_deadline(limit, share, arms))
    report.part("training", gpu_training.run, args.out / "training", settings["training"], deadline,
                started + limit - share.stop - arms * share.export, args.arms)
    report.part("evaluation", gpu_training.evaluation, args.out / "training", model, settings["tasks"],
                settings["eval_args"], parts["evaluation"].limit)
    if smoke:  # both parts run the same tiny step here: a second run would exercise nothing new
        report.part("throughput", timing_step_again, timing)
    else:
        report.part("throughput", run_part_process, "step_throughput",
                    [*settings["throughput_args"], "--model", model, "--port", str(free_port())],
                    args.out / "throughput", parts["throughput"].limit)
    print(f"gpu-check: report in {args.out}/report.md ({'ok' if report.data['ok'] else 'FAILED'}, "
          f"{report.data['wall_s']} s)")
    return 0 if report.data["ok"] else 1
