"""Test entry point: ``python -m debater`` whose rank $CRASH_RANK dies (SIGKILL) half-way through writing
its optimizer states for checkpoint $CRASH_TAG, as an OOM kill or a lost node would leave it.

Run it under a launcher in place of ``--module debater``; every other rank runs unchanged.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from debater.cli import exit_without_teardown, main

_torch_save = torch.save


def _save_or_die(obj, f, *args, **kwargs):
    path = Path(str(f))
    if (os.environ.get("RANK") == os.environ["CRASH_RANK"] and path.parent.name == os.environ["CRASH_TAG"]
            and "optim_states" in path.name):
        path.write_bytes(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    return _torch_save(obj, f, *args, **kwargs)


torch.save = _save_or_die
if __name__ == "__main__":
    exit_without_teardown(main(sys.argv[1:]))
