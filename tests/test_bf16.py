"""The GPU users' path on CPU: ``ds_configs/zero2_bf16.json`` with bf16 weights, through the deepspeed launcher
(2 ranks). Gradient norms stay finite, the adapter moves, and a stop + resume equals the uninterrupted run."""
from __future__ import annotations

import json
import math

import pytest
from conftest import tensorboard_scalars, train_straight_and_resumed
from safetensors.torch import load_file

STEPS = 4


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    config = {"model_name_or_path": str(tiny_model), "torch_dtype": "bfloat16", "learning_rate": 5e-3,
              "warmup_steps": 1, "per_device_train_batch_size": 2, "max_seq_length": 32, "logging_steps": 1,
              "save_steps": 2, "lora_r": 4, "lora_dropout": 0.1, "cod_steps": 4, "seed": 13}
    return train_straight_and_resumed(config, tmp_path_factory.mktemp("bf16"), steps=STEPS,
                                      ds_config="zero2_bf16.json")


def test_bf16_run_trains_in_bf16_with_finite_gradients(runs):
    straight, _ = runs
    ds_config = json.loads((straight / "ds_config.json").read_text())
    assert ds_config["bf16"]["enabled"] is True
    assert json.loads((straight / "train_config.json").read_text())["torch_dtype"] == "bfloat16"
    norms = tensorboard_scalars(straight / "tensorboard", "train/grad_norm")
    assert sorted(norms) == list(range(1, STEPS + 1))
    assert all(math.isfinite(value) and value > 0 for value in norms.values()), norms


def test_bf16_run_moves_the_adapter(runs):
    weights = load_file(str(runs[0] / "adapter" / "adapter_model.safetensors"))
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().max() > 0 for tensor in lora_b)  # LoRA B starts at zero


def test_bf16_resume_is_exact(runs):
    losses = [tensorboard_scalars(run / "tensorboard", "loss/total") for run in runs]
    assert sorted(losses[0]) == sorted(losses[1]) == list(range(1, STEPS + 1))
    for step in losses[0]:
        assert losses[1][step] == pytest.approx(losses[0][step], rel=1e-6), step
    weights = [load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in runs]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert (weights[0][name].float() - weights[1][name].float()).abs().max() == 0, name
