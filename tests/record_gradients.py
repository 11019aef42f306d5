"""Test entry point: ``python -m debater`` that also records, at step 1, the gradient DeepSpeed is about to apply
(each trainable parameter's full reduced gradient, read with ``safe_get_full_grad`` by every rank, written by
rank 0 to $GRADIENTS_FILE). It changes nothing in the run."""
from __future__ import annotations

import os
import sys

import torch
from deepspeed.utils import safe_get_full_grad

import debater.training_step as training_step
from debater.cli import exit_without_teardown, main

_update = training_step.TrainingStep.update


def _recording_update(self, step: int, checkpoints: str) -> float:
    if step == 1:
        grads = {name: safe_get_full_grad(p).detach().float().cpu().clone()
                 for name, p in self.engine.module.named_parameters() if p.requires_grad}
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(grads, os.environ["GRADIENTS_FILE"])
    return _update(self, step, checkpoints)


training_step.TrainingStep.update = _recording_update
if __name__ == "__main__":
    exit_without_teardown(main(sys.argv[1:]))
