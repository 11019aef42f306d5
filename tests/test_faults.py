"""Faults, each through the deepspeed launcher on 2 CPU ranks: a diverging run stops at the step that
diverged and keeps its last good checkpoint; a rank killed while writing a checkpoint fails the launch, that
half-written checkpoint never becomes 'latest' and a resume starts from the previous one; only the newest
``save_total_limit`` checkpoints are kept."""
from __future__ import annotations

import re
import shutil

import pytest
from conftest import FIXTURES, free_port, launch_training, tensorboard_scalars

from debater.checkpoint import trainable_weights

pytestmark = pytest.mark.launcher


def _output(done) -> str:
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def diverged(tiny_model, tmp_path_factory):
    """A learning rate of 1e30: the weights blow up after the first update."""
    work = tmp_path_factory.mktemp("diverged")
    shutil.copytree(FIXTURES / "echo", work / "echo")
    config = {"model_name_or_path": str(tiny_model), "dataset_file_path": str(work / "echo"),
              "output_dir": str(work / "run"), "learning_rate": 1e30, "warmup_steps": 0,
              "per_device_train_batch_size": 2, "max_seq_length": 32, "stop_after_n_steps": 4, "logging_steps": 1,
              "save_steps": 1, "lora_r": 4, "cod_steps": 4, "torch_dtype": "float32", "seed": 3}
    return launch_training(config, work / "config.json", free_port(), timeout=480, launcher="deepspeed"), work / "run"


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(diverged):
    done, run = diverged
    assert done.returncode != 0
    found = re.search(r"non-finite loss \((?:nan|-?inf)\) at step (\d+)", _output(done))
    assert found, _output(done)[-3000:]
    step = int(found.group(1))
    assert step >= 2, "the test needs a good step before the divergence"
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"step-{step - 1}"
    assert not (checkpoints / f"step-{step}").exists()
    assert all(w.isfinite().all() for w in trainable_weights(checkpoints / f"step-{step - 1}").values())
    assert not (run / "adapter").exists()
    assert sorted(tensorboard_scalars(run / "tensorboard", "loss/total")) == list(range(1, step))


@pytest.fixture(scope="module")
def infinite_gradient(tiny_model, tmp_path_factory):
    """A score scale of 1e30: the loss stays finite but the squared gradient norm overflows float32."""
    work = tmp_path_factory.mktemp("inf_grad")
    shutil.copytree(FIXTURES / "echo", work / "echo")
    config = {"model_name_or_path": str(tiny_model), "dataset_file_path": str(work / "echo"),
              "output_dir": str(work / "run"), "scale": 1e30, "warmup_steps": 0, "per_device_train_batch_size": 2,
              "max_seq_length": 32, "stop_after_n_steps": 3, "logging_steps": 1, "save_steps": 1, "lora_r": 4,
              "cod_steps": 4, "torch_dtype": "float32", "seed": 3}
    return launch_training(config, work / "config.json", free_port(), timeout=480, launcher="deepspeed"), work / "run"


def test_non_finite_gradient_with_finite_loss_stops_instead_of_skipping_every_update(infinite_gradient):
    done, run = infinite_gradient
    assert done.returncode != 0
    assert re.search(r"non-finite gradient norm \((?:nan|inf)\) at step 1 while the loss is finite", _output(done)), \
        _output(done)[-3000:]
    assert not (run / "checkpoints" / "latest").exists()
    assert not (run / "adapter").exists()


def test_a_killed_rank_fails_the_launch_without_hanging(interrupted_run):
    crashed = interrupted_run.crashed  # launched with a timeout: a hang fails the fixture
    assert crashed.returncode != 0
    assert "exits with return code" in _output(crashed)  # the launcher saw a rank fail and stopped the others


def test_a_half_written_checkpoint_never_becomes_latest(interrupted_run):
    assert interrupted_run.tags_after_crash == ["step-1", "step-2", "step-3"]  # step-3: rank 1 died writing it
    assert interrupted_run.latest_after_crash == "step-2"


def test_resume_after_the_crash_starts_from_the_last_complete_checkpoint(interrupted_run):
    resumed = interrupted_run.resumed
    assert resumed.returncode == 0, _output(resumed)[-3000:]
    assert re.search(r"resumed from \S+/step-2 at step 2", _output(resumed))


def test_only_the_newest_checkpoints_are_kept(interrupted_run):
    checkpoints = interrupted_run.output_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-3", "step-4"]
    assert (checkpoints / "latest").read_text() == "step-4"
