"""Resume on another number of ranks (issue 17, item 3): a run checkpointed on 2 ranks continues on 1, and one
checkpointed on 1 continues on 2, at the same global batch, and each ends with the adapter, the Adam moments
and the losses of the uninterrupted 2-rank run (fp32, ZeRO-2 through the launcher, LoRA dropout on). A resume
with another global batch is refused with a message saying why."""
from __future__ import annotations

import shutil

import pytest
import torch
from conftest import FIXTURES, assert_close_to_scale, free_port, launch_training, tensorboard_scalars
from safetensors.torch import load_file

from debater.checkpoint import PORTABLE_STATE

pytestmark = pytest.mark.launcher

GLOBAL_BATCH, STEPS = 4, 4


def _config(tiny_model, data, out, ranks: int, steps: int, **extra) -> dict:
    return {"model_name_or_path": str(tiny_model), "dataset_file_path": str(data), "output_dir": str(out),
            "per_device_train_batch_size": GLOBAL_BATCH // ranks, "learning_rate": 5e-3, "warmup_steps": 2,
            "max_seq_length": 32, "logging_steps": 1, "save_steps": 2, "save_total_limit": 3, "lora_r": 4,
            "lora_dropout": 0.1, "cod_steps": 4, "torch_dtype": "float32", "seed": 11,
            "stop_after_n_steps": steps, **extra}


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("resume-world")
    data = work / "echo"
    shutil.copytree(FIXTURES / "echo", data)

    def launch(name: str, ranks: int, steps: int, **extra):
        config = _config(tiny_model, data, work / name, ranks, steps, **extra)
        return launch_training(config, work / f"{name}-{ranks}-{steps}.json", free_port(), nproc=ranks)

    outcomes = {"straight": [launch("straight", 2, STEPS)], "1to2": [launch("1to2", 1, STEPS // 2)]}
    # the 2-rank first half is the straight run up to its step-2 checkpoint: continue a copy of that on 1 rank
    shutil.copytree(work / "straight", work / "2to1")
    for copied_result in (work / "2to1" / "checkpoints" / f"step-{STEPS}", work / "2to1" / "adapter"):
        shutil.rmtree(copied_result)  # the resumed run must write its own
    (work / "2to1" / "checkpoints" / "latest").write_text(f"step-{STEPS // 2}")
    outcomes["2to1"] = [launch("2to1", 1, STEPS, resume_from_checkpoint="latest")]
    shutil.copytree(work / "1to2", work / "other-batch")  # the half-way checkpoint, before it is continued
    outcomes["1to2"].append(launch("1to2", 2, STEPS, resume_from_checkpoint="latest"))
    refused = launch_training({**_config(tiny_model, data, work / "other-batch", 1, STEPS),
                               "per_device_train_batch_size": 2, "resume_from_checkpoint": "latest"},
                              work / "other-batch.json", free_port(), nproc=1)
    for name, done in outcomes.items():
        for part in done:
            assert part.returncode == 0, name + "\n" + part.stdout[-3000:] + part.stderr[-3000:]
    return {"work": work, "refused": refused}


def _final_state(run) -> dict:
    return torch.load(run / "checkpoints" / f"step-{STEPS}" / PORTABLE_STATE, weights_only=False)


@pytest.mark.parametrize("name", ["2to1", "1to2"])
def test_resumed_on_another_world_size_equals_the_uninterrupted_run(runs, name):
    straight, resumed = runs["work"] / "straight", runs["work"] / name
    expected = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    assert_close_to_scale(got, expected, 1e-4, f"{name}: adapter")
    want, have = _final_state(straight), _final_state(resumed)
    assert have["world_size"] != _load_half(resumed)["world_size"]  # it really changed world size
    assert int(have["optimizer_step"]) == int(want["optimizer_step"]) == STEPS
    for key in ("fp32", "exp_avg", "exp_avg_sq"):  # measured: within 2e-5 of each tensor's largest entry
        assert_close_to_scale({p: m[key] for p, m in have["params"].items()},
                              {p: m[key] for p, m in want["params"].items()}, 1e-4, f"{name}: {key}")
    losses = [tensorboard_scalars(run / "tensorboard", "loss/total") for run in (straight, resumed)]
    assert sorted(losses[1]) == list(range(1, STEPS + 1))
    for step in losses[0]:
        assert losses[1][step] == pytest.approx(losses[0][step], rel=1e-5), step


def _load_half(run) -> dict:
    return torch.load(run / "checkpoints" / f"step-{STEPS // 2}" / PORTABLE_STATE, weights_only=False)


def test_a_resume_with_another_global_batch_is_refused_with_a_reason(runs):
    refused = runs["refused"]
    assert refused.returncode != 0
    output = refused.stdout + refused.stderr
    assert "global batch of 4 and this run has 2" in output
    assert "Traceback" not in output
