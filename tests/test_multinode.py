"""Two nodes on one machine, as launch/slurm.sbatch starts them: the script's own body, run without SLURM
(stand-ins for ``scontrol`` and ``srun`` give it what two one-node tasks would see), starts launch/torchrun.sh
once per node (NODE_RANK 0 and 1, one CPU rank each), rendezvous over 127.0.0.1; both exit 0 and end with the
same weights."""
from __future__ import annotations

import pytest

import json
import shutil

from conftest import FIXTURES, free_port, run_launcher, tensorboard_scalars, training_env

from debater.checkpoint import trainable_weights, weights_digest

pytestmark = pytest.mark.launcher

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
[ "$1 $2" = "show hostnames" ] && printf '127.0.0.1\n127.0.0.2\n'
"""


def test_the_slurm_script_body_trains_on_two_one_node_tasks(tiny_model, tmp_path):
    """What sbatch would run, minus SLURM: the script picks the first host as master, srun starts
    launch/torchrun.sh once per node with NODE_RANK from SLURM_NODEID, and the two nodes train as one run."""
    config_path, run = _config(tiny_model, tmp_path)
    stand_ins = tmp_path / "bin"
    stand_ins.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (stand_ins / name).write_text(body)
        (stand_ins / name).chmod(0o755)
    env = dict(training_env(), SLURM_JOB_NODELIST="node[0-1]", SLURM_NNODES="2", MASTER_PORT=str(free_port()))
    env["PATH"] = f"{stand_ins}:{env['PATH']}"
    done = run_launcher(["bash", "launch/slurm.sbatch", str(config_path)], env, TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _assert_two_ranks_trained_alike(run)
