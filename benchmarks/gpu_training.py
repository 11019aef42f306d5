"""The correctness parts of `make gpu-check`: three trainings through the launcher users run, side by side
(training), then every trained adapter and the base model evaluated (evaluation).

Arms: vanilla (last token, one view), full in the paper's document format (prompt, existing frozen rows as
step tokens), and full in the format that learns soonest at small scale (added rows started as EOS copies
and trained, no prompt). Each run must log a finite gradient norm at every step and end with an adapter
that moved (LoRA's B matrices start at zero, so any non-zero entry is the optimizer's doing). Runs still going
at the deadline are stopped once they have published a checkpoint and judged on it.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.ablation import ARMS, PAPER_FORMAT, demo_config, start_training
from benchmarks.common import free_port, tensorboard_scalars
from benchmarks.gpu_budget import GPU_TRAINING

TRAINING_ARMS = {"vanilla": ARMS["vanilla"], "full_paper_format": {**PAPER_FORMAT, **ARMS["full"]},
                 "full_small_scale_format": ARMS["full_eos_no_prompt"]}


def arm_config(arm: str, run: Path, settings: dict) -> dict:
    """The demo config, the arm, then the settings of this check (batch, steps, checkpoints, dtype, data)."""
    return demo_config(TRAINING_ARMS[arm], {"output_dir": str(run), "logging_steps": 1, "save_total_limit": 1},
                       settings)


def train_arms(out: Path, settings: dict, deadline: float, limit: float, arms: list[str]) -> dict[str, dict]:
    """Launch ``arms`` at once. From ``deadline`` (time.monotonic()) on, the arms still running that have published
    a checkpoint are stopped together, and at ``limit`` every arm whether or not; once all have ended, each
    stopped arm's last checkpoint is exported (exporting while others still train would let them run on past the
    deadline). Returns each arm's exit code, seconds, log, export seconds and problems."""
    running = {arm: (start_training(arm_config(arm, out / arm, settings), 1, free_port()), time.monotonic())
               for arm in arms}
    done = {}
    while running:
        time.sleep(0.5)
        now = time.monotonic()
        due = [arm for arm, (process, _) in running.items()
               if process.poll() is None and (now >= limit or (now >= deadline and has_checkpoint(out / arm)))]
        stop_trees([running[arm][0] for arm in due])
        for arm, (process, start) in list(running.items()):
            if process.poll() is not None:
                del running[arm]
                done[arm] = {"exit": process.returncode, "seconds": round(time.monotonic() - start),
                             "log": str(out / f"{arm}.log"), "problems": []}
                if arm in due:
                    done[arm]["stopped_at_deadline"] = True
    for arm, launched in done.items():
        if launched.get("stopped_at_deadline"):
            exported = time.monotonic()
            launched.update(problems=export_latest_checkpoint(out / arm), export_s=round(time.monotonic() - exported, 1))
    return done


def has_checkpoint(run: Path) -> bool:
    from debater.checkpoint import LATEST

    return (run / "checkpoints" / LATEST).exists()


def stop_trees(processes: list[subprocess.Popen], grace: float = GPU_TRAINING.stop) -> None:
    """Stop launches and every process under them (SIGTERM to all, then SIGKILL to those left after ``grace``
    seconds): the deepspeed runner of a local launch does not pass SIGTERM on to the launcher and the ranks below
    it."""
    import psutil

    members = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(process.pid)
            members += [root, *root.children(recursive=True)]
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    for member in psutil.wait_procs(members, timeout=grace)[1]:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    for process in processes:
        process.wait()


def adapter_moved(run: Path) -> float:
    """The largest |entry| of the exported adapter's LoRA B matrices (0: the optimizer never changed them)."""
    from safetensors.torch import load_file

    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    return max(float(t.abs().max()) for name, t in weights.items() if "lora_B" in name)


def export_latest_checkpoint(run: Path) -> list[str]:
    """A run stopped at the deadline exported no adapter: export its latest checkpoint in its place (in this
    process: the budget has no room for another interpreter's start). Returns the problems, if any."""
    from debater.core.errors import USER_ERRORS
    from debater.export import export_checkpoint

    if (run / "adapter").exists():  # it finished and exported before the stop reached it
        return []
    if not has_checkpoint(run):
        return ["stopped before its first checkpoint: nothing to export"]
    try:
        export_checkpoint(run, run / "adapter")
    except (*USER_ERRORS, OSError, RuntimeError) as error:  # reported with the arm; the others are still judged
        return [f"exporting the last checkpoint failed: {type(error).__name__}: {error}"]
    return []


def check_run(run: Path, steps: int, problems: tuple[str, ...] = ()) -> dict:
    """Finite gradient norms at every step run (``steps``) and a moved adapter; the curves for the plot.
    ``problems``: found before (an export that failed), reported with the rest."""
    grad_norms = tensorboard_scalars(run, "train/grad_norm")
    losses = tensorboard_scalars(run, "loss/total")
    top1 = tensorboard_scalars(run, "train/in_batch_top1")
    finite = [s for s, v in grad_norms.items() if math.isfinite(v) and v > 0]
    last = lambda curve: round(curve[max(curve)], 4) if curve else None  # noqa: E731
    result = {"steps_logged": len(grad_norms), "steps_with_finite_grad_norm": len(finite),
              "first_loss": round(losses[min(losses)], 4) if losses else None, "last_loss": last(losses),
              "last_in_batch_top1": last(top1), "curves": {"loss": losses, "top1": top1}}
    problems = list(problems)
    if len(grad_norms) < steps:
        problems.append(f"{len(grad_norms)} of {steps} steps logged")
    if len(finite) < len(grad_norms):
        problems.append(f"{len(grad_norms) - len(finite)} steps with a zero or non-finite gradient norm")
    if (run / "adapter").exists():
        result["largest_lora_b"] = adapter_moved(run)
        if result["largest_lora_b"] == 0:
            problems.append("the adapter did not move")
    else:
        problems.append("no adapter exported")
    result.update({"ok": not problems, "problems": problems})
    return result


def plot_curves(checks: dict[str, dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, top1_axes = figure.subplots(1, 2)
    for arm, check in checks.items():
        for axes, curve in ((loss_axes, "loss"), (top1_axes, "top1")):
            points = sorted(check["curves"][curve].items())
            axes.plot([s for s, _ in points], [v for _, v in points], label=arm)
    loss_axes.set(xlabel="step", ylabel="training loss", title="Loss")
    top1_axes.set(xlabel="step", ylabel="in-batch top-1", title="In-batch top-1 (all ranks' candidates)")
    for axes in (loss_axes, top1_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.savefig(path, dpi=110)


def evaluate(models: list[str], tasks: str, out: Path, extra: list[str], timeout: float) -> dict:
    """nDCG@10 and the other metrics of every model, through `python -m debater eval`."""
    command = [sys.executable, "-m", "debater", "eval", "--tasks", tasks, "--out", str(out), *extra]
    for model in models:
        command += ["--model", model]
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    results = json.loads((out / "results.json").read_text())["results"]
    return {model: next(iter(entry["scores"].values())) for model, entry in results.items()}


def judge(out: Path, arm: str, launched: dict, steps: int) -> dict:
    """One arm's check: a run stopped at the deadline is judged on the steps it ran, from its last checkpoint; one
    that ended by itself on every step it planned (``steps``, or fewer where its data holds fewer batches)."""
    from debater.run_folder import BATCH_PLAN

    if launched.get("stopped_at_deadline"):
        steps = max(1, len(tensorboard_scalars(out / arm, "train/grad_norm")))
    elif (out / arm / BATCH_PLAN).exists():
        steps = min(steps, json.loads((out / arm / BATCH_PLAN).read_text())["batches"])
    return {**launched, **check_run(out / arm, steps, tuple(launched["problems"]))}


def run(out: Path, settings: dict, deadline: float, limit: float, arms: list[str]) -> dict:
    """The training part: ``arms`` trained (stopped at the deadline), exported, checked; the loss curves plotted."""
    shutil.rmtree(out, ignore_errors=True)  # runs left by an earlier check would be resumed, not trained
    out.mkdir(parents=True)
    launched = train_arms(out, settings, deadline, limit, arms)
    checks = {arm: judge(out, arm, launched[arm], settings["stop_after_n_steps"]) for arm in arms}
    plot_curves(checks, out / "loss_curves.png")
    for check in checks.values():
        check["curves"] = {name: {str(s): round(v, 4) for s, v in curve.items()} for name, curve in check["curves"].items()}
    return {"arms": checks, "loss_curves": str(out / "loss_curves.png"),
            "ok": all(check["ok"] for check in checks.values())}


def evaluation(out: Path, base_model: str, tasks: str, extra: list[str], timeout: float) -> dict:
    """The evaluation part: the base model and the adapter of every arm trained on the test set."""
    labels = {base_model: "base model (untrained)"}
    labels.update({str(out / arm): arm for arm in TRAINING_ARMS if (out / arm / "adapter").exists()})
    scores = evaluate(list(labels), tasks, out / "eval", extra, timeout)
    return {"scores": {labels[model]: values for model, values in scores.items()},
            "ok": set(scores) == set(labels)}
