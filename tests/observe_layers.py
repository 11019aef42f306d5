"""Test entry point: ``python -m debater`` that only watches training. It counts how often the first decoder
layer's MLP runs and in which mode, and writes the counts to $OBSERVE_DIR/rank<R>.json at exit. It sets
nothing itself, so what it sees is what a launched run does (training mode, recomputation)."""
from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import debater.train as train_module
from debater.cli import exit_without_teardown, main

_build = train_module.build_training_encoder


def _watched(config, tokenizer):
    encoder = _build(config, tokenizer)
    seen = {"calls": 0, "training": []}

    def count(module, _inputs):
        seen["calls"] += 1
        seen["training"].append(module.training)

    encoder.backbone.get_base_model().layers[0].mlp.register_forward_pre_hook(count)
    out = Path(os.environ["OBSERVE_DIR"])
    atexit.register(lambda: (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen)))
    return encoder


train_module.build_training_encoder = _watched
if __name__ == "__main__":
    exit_without_teardown(main(sys.argv[1:]))
