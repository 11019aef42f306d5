"""Test entry point: ``python -m debater`` that only watches training. It counts how often the first decoder
layer's MLP runs and in which mode, and at each forward of that layer's first LoRA A projection the dropout
probability it holds and whether its output differs from the same projection of the unmasked input. It writes
them to $OBSERVE_DIR/rank<R>.json at exit. It sets nothing itself, so what it sees is what a launched run does
(training mode, recomputation, dropout)."""
from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import torch

import debater.train as train_module
from debater.cli import exit_without_teardown, main
from debater.keyed_dropout import KeyedDropoutLoraA

_build = train_module.build_training_encoder


def _watched(config, tokenizer):
    encoder = _build(config, tokenizer)
    seen = {"calls": 0, "training": [], "lora_dropout": []}

    def count(module, _inputs):
        seen["calls"] += 1
        seen["training"].append(module.training)

    @torch.no_grad()  # a comparison beside the run, kept out of its autograd graph
    def masked(module, inputs, output):
        unmasked = torch.nn.functional.linear(inputs[0], module.weight)
        seen["lora_dropout"].append({"p": module.keyed_dropout.p, "changed": not torch.equal(output, unmasked)})

    layer = encoder.backbone.get_base_model().layers[0]
    layer.mlp.register_forward_pre_hook(count)
    lora_a = next((m for m in layer.modules() if isinstance(m, KeyedDropoutLoraA)), None)  # none without dropout
    if lora_a is not None:
        lora_a.register_forward_hook(masked)
    out = Path(os.environ["OBSERVE_DIR"])
    atexit.register(lambda: (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen)))
    return encoder


train_module.build_training_encoder = _watched
if __name__ == "__main__":
    exit_without_teardown(main(sys.argv[1:]))
