"""launch/slurm.sbatch's requeue logic, with stand-ins for ``srun`` and ``scontrol``, in a loop that plays SLURM:
a job that called ``scontrol requeue`` runs again with SLURM_RESTART_COUNT one higher. The warning signal goes to
the batch shell only (``--signal=B:USR1@N``): the script passes it on to srun. It requeues on the "stopped early"
exit code only, never on success or a crash, at most MAX_REQUEUES times, and a restarted job resumes from
``latest``. (The same script training for real, through torchrun, is in tests/test_multinode.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT

from debater.core.exit_codes import STOPPED_EARLY

# srun: records its arguments; "preempted" waits until the script passes the warning signal on, then exits as a
# stopped run does; a number is the exit status of a run that ends by itself
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$FAKE_LOG/srun"
if [ "$FAKE_OUTCOME" = preempted ]; then
  trap 'echo USR1 >> "$FAKE_LOG/srun_signals"; exit 75' USR1
  touch "$FAKE_LOG/srun_started"
  while :; do sleep 0.02; done
fi
exit "$FAKE_OUTCOME"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1" in
  show) printf 'node0\\nnode1\\n' ;;
  requeue) echo "$2" >> "$FAKE_LOG/requeued" ;;
esac
"""


@pytest.fixture
def slurm(tmp_path):
    """Runs the script as SLURM would, requeue after requeue; returns (exit statuses, srun argument lines,
    requeued job ids)."""
    stand_ins = tmp_path / "bin"
    stand_ins.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (stand_ins / name).write_text(body)
        (stand_ins / name).chmod(0o755)

    def run(outcome: str, **env_extra) -> tuple[list[int], list[str], list[str]]:
        log = tmp_path / f"log-{outcome}-{len(list(tmp_path.iterdir()))}"
        log.mkdir()
        statuses = []
        env = {**os.environ, "PATH": f"{stand_ins}:{os.environ['PATH']}", "FAKE_LOG": str(log),
               "FAKE_OUTCOME": outcome, "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[0-1]",
               "SLURM_NNODES": "2", **env_extra}
        while len(statuses) < 10:
            requeues = _lines(log / "requeued")
            statuses.append(_run_job({**env, "SLURM_RESTART_COUNT": str(len(requeues))}, log, outcome))
            if len(_lines(log / "requeued")) == len(requeues):
                break
        return statuses, _lines(log / "srun"), _lines(log / "requeued")

    return run


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _run_job(env: dict, log: Path, outcome: str) -> int:
    job = subprocess.Popen(["bash", "launch/slurm.sbatch", "run.json"], cwd=ROOT, env=env, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if outcome == "preempted":
            deadline = time.monotonic() + 30
            while not (log / "srun_started").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            (log / "srun_started").unlink()
            job.send_signal(signal.SIGUSR1)  # to the batch shell only, as --signal=B:USR1@N does
        job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    return job.returncode


def test_a_preempted_job_requeues_itself_and_resumes_from_latest_until_the_cap(slurm):
    statuses, sruns, requeued = slurm("preempted", MAX_REQUEUES="2")
    assert statuses == [STOPPED_EARLY] * 3  # the first run and two requeued ones; the third stop is not requeued
    assert requeued == ["4242", "4242"]
    assert "resume_from_checkpoint" not in sruns[0]
    assert all(line.endswith("run.json --set resume_from_checkpoint=latest") for line in sruns[1:]), sruns


def test_the_default_cap_is_three_requeues(slurm):
    statuses, _, requeued = slurm("preempted")
    assert len(statuses) == 4 and len(requeued) == 3


@pytest.mark.parametrize("outcome", ["0", "1", "143"])
def test_a_finished_or_crashed_job_is_not_requeued(slurm, outcome):
    statuses, sruns, requeued = slurm(outcome)
    assert statuses == [int(outcome)] and requeued == [] and len(sruns) == 1
