"""Two nodes on one machine, as launch/slurm.sbatch starts them: the script's own body, run without SLURM
(stand-ins for ``scontrol`` and ``srun`` give it what two one-node tasks would see), starts launch/torchrun.sh
once per node (NODE_RANK 0 and 1, one CPU rank each), rendezvous over 127.0.0.1; a deadline stops both nodes at
the same step, the script requeues the job, and the requeued job resumes; both exit 0 and end with the same
weights."""
from __future__ import annotations

import pytest

import json
import re
import shutil
import time

from conftest import FIXTURES, free_port, run_launcher, tensorboard_scalars, training_env

from debater.checkpoint import trainable_weights, weights_digest
from debater.core.exit_codes import STOPPED_EARLY

pytestmark = [pytest.mark.launcher, pytest.mark.cluster]

TIMEOUT_S = 480


def _config(tiny_model, tmp_path):
    shutil.copytree(FIXTURES / "echo", tmp_path / "echo")
    config = {"model_name_or_path": str(tiny_model), "dataset_file_path": str(tmp_path / "echo"),
              "output_dir": str(tmp_path / "run"), "learning_rate": 5e-3, "warmup_steps": 1,
              "per_device_train_batch_size": 2, "max_seq_length": 32, "stop_after_n_steps": 3, "logging_steps": 1,
              "save_steps": 3, "lora_r": 4, "cod_steps": 4, "torch_dtype": "float32", "seed": 5}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path / "config.json", tmp_path / "run"


def _assert_two_ranks_trained_alike(run) -> None:
    assert json.loads((run / "batch_plan.json").read_text())["global_batch"] == 4
    assert sorted(tensorboard_scalars(run / "tensorboard", "loss/total")) == [1, 2, 3]
    by_rank = json.loads((run / "weights_by_rank.json").read_text())["sha256"]
    assert len(by_rank) == 2 and by_rank[0] == by_rank[1]
    assert by_rank[0] == weights_digest(trainable_weights(run / "checkpoints" / "step-3"))


# srun as SLURM runs one task per node: every task at once, each with its node id, failing if any fails
FAKE_SRUN = """#!/usr/bin/env bash
pids=()
for node in $(seq 0 $((SLURM_NNODES - 1))); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_GPUS_ON_NODE=1 "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1" in
  show) printf '127.0.0.1\n127.0.0.2\n' ;;
  requeue) echo "$2" >> "$FAKE_LOG" ;;
esac
"""


def test_the_slurm_script_body_trains_on_two_one_node_tasks_across_a_deadline_and_a_requeue(tiny_model, tmp_path):
    """What sbatch would run, minus SLURM: the script picks the first host as master, srun starts
    launch/torchrun.sh once per node with NODE_RANK from SLURM_NODEID, and the two nodes train as one run. The
    job's end time (SLURM_JOB_END_TIME) is already within the stop margin: every rank stops after the first step
    with a checkpoint, torchrun.sh exits 75, and the script requeues the job; run again as requeued
    (SLURM_RESTART_COUNT=1), it resumes from 'latest' with the config unchanged and finishes."""
    config_path, run = _config(tiny_model, tmp_path)
    stand_ins = tmp_path / "bin"
    stand_ins.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (stand_ins / name).write_text(body)
        (stand_ins / name).chmod(0o755)
    env = dict(training_env(), SLURM_JOB_NODELIST="node[0-1]", SLURM_NNODES="2", SLURM_JOB_ID="4242",
               MASTER_PORT=str(free_port()), FAKE_LOG=str(tmp_path / "requeued"))
    env["PATH"] = f"{stand_ins}:{env['PATH']}"
    first = run_launcher(["bash", "launch/slurm.sbatch", str(config_path)],
                         {**env, "SLURM_JOB_END_TIME": str(int(time.time()))}, TIMEOUT_S)
    assert first.returncode == STOPPED_EARLY, first.stdout[-3000:] + first.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text() == "step-1"
    assert (tmp_path / "requeued").read_text().split() == ["4242"]
    assert "within the margin" in first.stderr
    second = run_launcher(["bash", "launch/slurm.sbatch", str(config_path)],
                          {**env, "SLURM_RESTART_COUNT": "1", "MASTER_PORT": str(free_port())}, TIMEOUT_S)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert re.search(r"resumed from \S+/step-1 at step 1", second.stderr)
    assert (tmp_path / "requeued").read_text().split() == ["4242"]  # a finished job is not requeued
    _assert_two_ranks_trained_alike(run)
