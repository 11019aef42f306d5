"""Preemption of the demo run on 2 ranks: time from SIGUSR1 to the launch's exit, and steps lost.

SIGUSR1 goes to ``launch/single_node.sh`` mid-run; the result has the exit code, the time from the signal to the
launch's exit, and the work lost (steps done minus the step of the checkpoint ``latest`` it left).

The demo config (``launch/configs/demo-smollm2.json``, its own 40-step checkpoint schedule) trains on the raw
Debian echo-data; the signal goes to the launch script once ``--signal-at`` steps are done (read from the
progress bar in the run's log). Without the stop request the same signal would have lost every step since the
last periodic checkpoint, which the result records too."""
from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path

from benchmarks.ablation import TRAIN_DATA, start_training
from benchmarks.common import benchmark_parser, free_port, write_result

DEMO_CONFIG = Path("launch/configs/demo-smollm2.json")
PROGRESS = re.compile(r"training:\s+\d+%\|[^|]*\|\s*(\d+)/\d+")


def steps_done(log: Path) -> int:
    """The last step the rank-0 progress bar reported in a run's log (0 before the first)."""
    found = PROGRESS.findall(log.read_text(errors="replace")) if log.exists() else []
    return int(found[-1]) if found else 0


def measure(out: Path, model: str, signal_at: int, steps: int, timeout_s: float) -> dict:
    run = out / "run"
    for stale in (run / "checkpoints", run / "tensorboard", run / "adapter"):  # the preprocessed cache stays
        shutil.rmtree(stale, ignore_errors=True)
    (out / "run.log").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    config = {**json.loads(DEMO_CONFIG.read_text()), "model_name_or_path": model, "dataset_file_path": TRAIN_DATA,
              "output_dir": str(run), "stop_after_n_steps": steps}
    launch = start_training(config, 2, free_port())
    log = out / "run.log"
    deadline = time.monotonic() + timeout_s
    while steps_done(log) < signal_at and launch.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if launch.poll() is not None or time.monotonic() >= deadline:
        launch.kill()
        return {"error": f"the run ended (exit {launch.poll()}) or timed out before step {signal_at}; see {log}"}
    at_signal = steps_done(log)
    sent = time.monotonic()
    launch.send_signal(signal.SIGUSR1)
    code = launch.wait(timeout=timeout_s)
    exit_s = time.monotonic() - sent
    done = steps_done(log)
    latest = (run / "checkpoints" / "latest").read_text().strip() if (run / "checkpoints" / "latest").exists() else ""
    saved = int(latest.split("-")[1]) if latest else 0
    return {"exit_code": code, "signal_to_exit_s": round(exit_s, 1), "steps_done_at_signal": at_signal,
            "steps_done": done, "latest": latest, "steps_lost": done - saved,
            "steps_lost_without_stop_request": at_signal - at_signal // config["save_steps"] * config["save_steps"],
            "save_steps": config["save_steps"], "nproc": 2, "pid_signalled": "launch/single_node.sh"}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("preemption", __doc__)
    parser.add_argument("--signal-at", type=int, default=5, help="send SIGUSR1 once this many steps are done")
    parser.add_argument("--steps", type=int, default=40, help="steps the run would train (stop_after_n_steps)")
    parser.add_argument("--timeout-s", type=float, default=1800)
    args = parser.parse_args(argv)
    result = measure(args.out, args.model, args.signal_at, args.steps, args.timeout_s)
    if "error" not in result:
        result["summary"] = (f"SIGUSR1 to the launch after {result['steps_done_at_signal']} steps: exit "
                             f"{result['exit_code']} in {result['signal_to_exit_s']} s, checkpoint {result['latest']}, "
                             f"{result['steps_lost']} steps lost (without the stop request: "
                             f"{result['steps_lost_without_stop_request']})")
    write_result(result, args.out, args.model)
    return 0 if "error" not in result else 1
