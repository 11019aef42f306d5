"""Two nodes on one machine: launch/torchrun.sh started twice (NODE_RANK 0 and 1, one CPU rank each, as
launch/slurm.sbatch runs it), rendezvous over 127.0.0.1; both exit 0 and end with the same weights."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

from conftest import FIXTURES, ROOT, free_port, tensorboard_scalars, training_env

from debater.checkpoint import trainable_weights, weights_digest

TIMEOUT_S = 480


def _start_node(node_rank: int, config_path, port: int, log_path) -> subprocess.Popen:
    env = dict(training_env(), NNODES="2", NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with open(log_path, "w") as log:
        return subprocess.Popen(["bash", "launch/torchrun.sh", str(config_path), "1", "ds_configs/zero2_cpu.json"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_two_nodes_train_and_end_with_the_same_weights(tiny_model, tmp_path):
    shutil.copytree(FIXTURES / "echo", tmp_path / "echo")
    run = tmp_path / "run"
    config = {"model_name_or_path": str(tiny_model), "dataset_file_path": str(tmp_path / "echo"),
              "output_dir": str(run), "learning_rate": 5e-3, "warmup_steps": 1, "per_device_train_batch_size": 2,
              "max_seq_length": 32, "stop_after_n_steps": 3, "logging_steps": 1, "save_steps": 3, "lora_r": 4,
              "cod_steps": 4, "torch_dtype": "float32", "seed": 5}
    (tmp_path / "config.json").write_text(json.dumps(config))
    port = free_port()
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    nodes = [_start_node(r, tmp_path / "config.json", port, logs[r]) for r in (0, 1)]
    try:
        codes = [node.wait(timeout=TIMEOUT_S) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    output = "\n".join(f"--- node {r}\n" + log.read_text()[-3000:] for r, log in enumerate(logs))
    assert codes == [0, 0], output
    assert "rank 1/2" in logs[1].read_text()
    assert json.loads((run / "batch_plan.json").read_text())["global_batch"] == 4
    assert sorted(tensorboard_scalars(run / "tensorboard", "loss/total")) == [1, 2, 3]
    by_rank = json.loads((run / "weights_by_rank.json").read_text())["sha256"]
    assert len(by_rank) == 2 and by_rank[0] == by_rank[1]
    assert by_rank[0] == weights_digest(trainable_weights(run / "checkpoints" / "step-3"))
