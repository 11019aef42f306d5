"""Exact resume (invariant 6), launched by torchrun (the stopped run and the refused one by the deepspeed launcher,
whose exit codes and messages are checked), fp32, ZeRO-2 on CPU, LoRA dropout on. The uninterrupted 2-rank run
is the reference; each of these ends with its adapter, Adam moments and losses:
- its step-2 checkpoint continued on 2 ranks, with non-reentrant gradient checkpointing (which so changes
  nothing but memory), and continued on 1 rank at the same global batch;
- a 1-rank run stopped by its job's end time (a fake one, a few steps ahead: tests/paced_deadline.py) at the last
  step whose checkpoint still ends in time, exiting "stopped early", then continued on 2 ranks.
A resume with another global batch is refused with a message saying why.
Invariant 8, second half: the straight run and the checkpointed resume, watched by tests/observe_layers.py
(which sets nothing), train in training mode, with each layer recomputed in backward where checkpointing is on
and LoRA dropout at the configured rate changing what LoRA A sees."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import (FIXTURES, ROOT, as_published_at, assert_close_to_scale, free_port, launch_training,
                      tensorboard_scalars)
from safetensors.torch import load_file

from debater.checkpoint import PORTABLE_STATE
from debater.core.exit_codes import STOPPED_EARLY

pytestmark = pytest.mark.launcher

GLOBAL_BATCH, STEPS, HALF = 4, 4, 2
PACE_S, AHEAD_S, SAFETY_S = 1.0, 4.5, 0.5  # steps of >= 1 s, an end 4.5 s after the first began, 0.5 s kept free
RESUMED = ("same_ranks", "2to1", "1to2")
OBSERVED = ("straight", "same_ranks")  # without, then with gradient checkpointing
DROPOUT = 0.1


def _config(tiny_model, data, out, ranks: int, **extra) -> dict:
    return {"model_name_or_path": str(tiny_model), "dataset_file_path": str(data), "output_dir": str(out),
            "per_device_train_batch_size": GLOBAL_BATCH // ranks, "learning_rate": 5e-3, "warmup_steps": 2,
            "max_seq_length": 32, "logging_steps": 1, "save_steps": HALF, "save_total_limit": 3, "lora_r": 4,
            "lora_dropout": DROPOUT, "cod_steps": 4, "torch_dtype": "float32", "seed": 11, "stop_after_n_steps": STEPS,
            **extra}


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("resume")
    data = work / "echo"
    shutil.copytree(FIXTURES / "echo", data)

    def launch(name: str, ranks: int, script=None, env=None, launcher="torchrun", **extra):
        config = _config(tiny_model, data, work / name, ranks, **extra)
        return launch_training(config, work / f"{name}-{ranks}.json", free_port(), nproc=ranks, script=script,
                               env=env, launcher=launcher)

    def observed(name: str) -> dict:
        (work / f"observed-{name}").mkdir()
        return {"script": ROOT / "tests" / "observe_layers.py", "env": {"OBSERVE_DIR": str(work / f"observed-{name}")}}

    result = {"work": work, "straight": launch("straight", 2, **observed("straight"))}
    for name in ("same_ranks", "2to1"):
        as_published_at(work / "straight", work / name, HALF)
    result["same_ranks"] = launch("same_ranks", 2, resume_from_checkpoint="latest", gradient_checkpointing=True,
                                  **observed("same_ranks"))
    result["2to1"] = launch("2to1", 1, resume_from_checkpoint="latest")
    deadline = {"DEADLINE_AHEAD_S": str(AHEAD_S), "STEP_PACE_S": str(PACE_S), "DEADLINE_FILE": str(work / "end")}
    result["stopped"] = launch("1to2", 1, script=ROOT / "tests" / "paced_deadline.py", env=deadline,
                               launcher="deepspeed", stop_safety_s=SAFETY_S)  # its exit code passes through
    latest = work / "1to2" / "checkpoints" / "latest"
    result["stopped_at"], result["published_at"] = latest.read_text(), latest.stat().st_mtime
    result["end"] = float((work / "end.rank0").read_text())
    shutil.copytree(work / "1to2", work / "other-batch")  # the stopped run's checkpoint, before it is continued
    result["1to2"] = launch("1to2", 2, resume_from_checkpoint="latest")
    result["refused"] = launch_training({**_config(tiny_model, data, work / "other-batch", 1),
                                         "per_device_train_batch_size": 2, "resume_from_checkpoint": "latest"},
                                        work / "other-batch.json", free_port(), nproc=1, launcher="deepspeed")
    for name in ("straight", *RESUMED):
        done = result[name]
        assert done.returncode == 0, name + "\n" + done.stdout[-3000:] + done.stderr[-3000:]
    return result


def _state(run, tag: str) -> dict:
    return torch.load(run / "checkpoints" / tag / PORTABLE_STATE, weights_only=False)


def test_the_end_time_stops_the_run_a_few_steps_in_with_a_checkpoint_published_in_time(runs):
    stopped = runs["stopped"]
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == STOPPED_EARLY, output[-3000:]
    assert "within the margin" in output and "Traceback" not in output
    step = int(runs["stopped_at"].removeprefix("step-"))
    # 4.5 paced steps to the end, less one step, one save and the safety term: it stops after step 2 or 3
    assert 1 < step < STEPS, step
    assert runs["published_at"] <= runs["end"]


@pytest.mark.parametrize("name", RESUMED)
def test_a_resumed_run_ends_as_the_uninterrupted_one(runs, name):
    straight, resumed = runs["work"] / "straight", runs["work"] / name
    expected = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert_close_to_scale(got, expected, 1e-4 if name != "same_ranks" else 1e-6, f"{name}: adapter")
    want, have = _state(straight, f"step-{STEPS}"), _state(resumed, f"step-{STEPS}")
    assert int(have["optimizer_step"]) == int(want["optimizer_step"]) == STEPS
    for key in ("fp32", "exp_avg", "exp_avg_sq"):  # measured: within 2e-5 of each tensor's largest entry
        assert_close_to_scale({p: m[key] for p, m in have["params"].items()},
                              {p: m[key] for p, m in want["params"].items()}, 1e-4, f"{name}: {key}")
    first_resumed = int(runs["stopped_at"].removeprefix("step-")) + 1 if name == "1to2" else HALF + 1
    losses = [tensorboard_scalars(run / "tensorboard", "loss/total") for run in (straight, resumed)]
    assert set(range(first_resumed, STEPS + 1)) <= set(losses[1])  # the resumed run logged its own steps
    for step in losses[1]:
        assert losses[1][step] == pytest.approx(losses[0][step], rel=1e-5), step
    rates = [tensorboard_scalars(run / "tensorboard", "train/learning_rate") for run in (straight, resumed)]
    assert all(rates[1][step] == pytest.approx(rates[0][step]) for step in rates[1])


def test_the_world_size_really_changed(runs):
    work = runs["work"]
    assert _state(work / "2to1", f"step-{STEPS}")["world_size"] == 1 != _state(work / "2to1", f"step-{HALF}")[
        "world_size"]
    stopped_at = runs["stopped_at"]
    assert _state(work / "other-batch", stopped_at)["world_size"] == 1 != _state(work / "1to2", f"step-{STEPS}")[
        "world_size"]


def test_a_resume_with_another_global_batch_is_refused_with_a_reason(runs):
    refused = runs["refused"]
    assert refused.returncode != 0
    output = refused.stdout + refused.stderr
    assert "global batch of 4 and this run has 2" in output
    assert "Traceback" not in output


def _observed(runs, name: str) -> list[dict]:
    return [json.loads((runs["work"] / f"observed-{name}" / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_every_forward_of_a_launched_run_is_in_training_mode(runs):
    for name in OBSERVED:
        for rank in _observed(runs, name):
            assert rank["training"] and all(rank["training"]), name


def test_gradient_checkpointing_recomputes_in_a_launched_run(runs):
    # each step encodes queries, then documents: two forwards; checkpointing runs each again in backward
    assert [rank["calls"] for rank in _observed(runs, "straight")] == [2 * STEPS] * 2
    assert [rank["calls"] for rank in _observed(runs, "same_ranks")] == [4 * (STEPS - HALF)] * 2


def test_lora_dropout_follows_the_config_in_a_launched_run(runs):
    for name in OBSERVED:
        for rank in _observed(runs, name):
            assert len(rank["lora_dropout"]) == rank["calls"], name  # LoRA A sits in every forward of the layer
            assert all(seen == {"p": DROPOUT, "changed": True} for seen in rank["lora_dropout"]), name
