"""Invariant 8, second half: a launched run trains in training mode. Launched by torchrun (2 CPU
ranks), with nothing in the test setting the mode: gradient checkpointing recomputes each layer in backward, and
LoRA dropout follows the config (it changes the gradients). That the recomputation replays the same dropout masks
is shown in test_resume.py (a checkpointed resume equals the uninterrupted run without checkpointing)."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import FIXTURES, ROOT, free_port, launch_training, tensorboard_scalars

pytestmark = pytest.mark.launcher

STEPS = 2


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("training-mode")
    shutil.copytree(FIXTURES / "echo", work / "echo")
    observed = {}
    for name, checkpointing, dropout in (("checkpointed", True, 0.5), ("plain_without_dropout", False, 0.0)):
        out = work / name
        out.mkdir()
        config = {"model_name_or_path": str(tiny_model), "dataset_file_path": str(work / "echo"),
                  "output_dir": str(out / "run"), "gradient_checkpointing": checkpointing, "lora_dropout": dropout,
                  "learning_rate": 5e-3, "warmup_steps": 1, "per_device_train_batch_size": 2, "max_seq_length": 32,
                  "stop_after_n_steps": STEPS, "logging_steps": 1, "save_steps": STEPS, "lora_r": 4,
                  "cod_steps": 4, "torch_dtype": "float32", "seed": 5}
        done = launch_training(config, work / f"{name}.json", free_port(), script=ROOT / "tests" / "observe_layers.py",
                               env={"OBSERVE_DIR": str(out)})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        observed[name] = {"ranks": [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)],
                          "loss": tensorboard_scalars(out / "run" / "tensorboard", "loss/total"),
                          "grad_norm": tensorboard_scalars(out / "run" / "tensorboard", "train/grad_norm")}
    return observed


def test_every_forward_of_a_launched_run_is_in_training_mode(runs):
    for name, run in runs.items():
        for rank in run["ranks"]:
            assert rank["training"] and all(rank["training"]), name


def test_gradient_checkpointing_recomputes_in_a_launched_run(runs):
    # each step encodes queries, then documents: two forwards; checkpointing runs each again in backward
    assert [rank["calls"] for rank in runs["plain_without_dropout"]["ranks"]] == [2 * STEPS] * 2
    assert [rank["calls"] for rank in runs["checkpointed"]["ranks"]] == [4 * STEPS] * 2


def test_lora_dropout_follows_the_config_in_a_launched_run(runs):
    # LoRA B starts at zero, so step 1's loss is the base model's either way; its gradient is not (checkpointing
    # alone leaves gradients as they are: test_resume.py)
    with_dropout, without = runs["checkpointed"], runs["plain_without_dropout"]
    assert with_dropout["loss"][1] == pytest.approx(without["loss"][1], rel=1e-6)
    assert with_dropout["grad_norm"][1] != pytest.approx(without["grad_norm"][1], rel=1e-3)
