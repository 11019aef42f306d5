"""Invariant 6: N steps, stop, resume from 'latest', N more steps gives the same losses and the same
weights as 2N uninterrupted steps (fp32, CPU, 2 ranks, ZeRO-2).

The interrupted halves also run with non-reentrant gradient checkpointing (LoRA dropout on), so the same
equality shows that checkpointing under ZeRO-2 changes nothing but memory."""
from __future__ import annotations

import pytest
from conftest import tensorboard_scalars, train_straight_and_resumed
from safetensors.torch import load_file

pytestmark = pytest.mark.launcher


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    config = {"model_name_or_path": str(tiny_model), "learning_rate": 5e-3, "warmup_steps": 2,
              "per_device_train_batch_size": 2, "max_seq_length": 32, "logging_steps": 1, "save_steps": 2,
              "lora_r": 4, "lora_dropout": 0.1, "cod_steps": 4, "torch_dtype": "float32", "seed": 11}
    return train_straight_and_resumed(config, tmp_path_factory.mktemp("resume"), steps=4,
                                      split_extra={"gradient_checkpointing": True})


def test_resumed_run_has_the_same_losses(runs):
    straight, split = runs
    uninterrupted = tensorboard_scalars(straight / "tensorboard", "loss/total")
    resumed = tensorboard_scalars(split / "tensorboard", "loss/total")
    assert sorted(uninterrupted) == sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7), step
    assert len(set(round(v, 6) for v in uninterrupted.values())) > 1  # training moved the loss
    lrs = [tensorboard_scalars(run / "tensorboard", "train/learning_rate") for run in runs]
    assert lrs[0] == pytest.approx(lrs[1])


def test_resumed_run_has_the_same_weights(runs):
    weights = [load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in runs]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert (weights[0][name] - weights[1][name]).abs().max() <= 1e-6, name
