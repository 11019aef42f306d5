"""Stopping a run early at a step boundary: on a signal to any rank, or before the job's end time.

Clusters preempt jobs (SIGTERM, or a warning signal such as SLURM's ``--signal=USR1@90``) and end them at
their time limit. A handler here only sets a flag. Once per optimizer step the training loop asks
``StopRequest.agreed``, one MAX all-reduce of [signal seen, deadline near] over the ranks, so a signal that
reached a single rank stops every rank after the same step. The loop then saves through the checkpoint
protocol and the process exits with ``STOPPED_EARLY`` (debater/core/exit_codes.py), which launchers and
batch scripts read as "stopped early, resume from latest". Worker processes forked while the handlers are in place (the tokenizing pool)
inherit them, so a stop signal that reaches a worker (SLURM signals every process of a job step) is ignored
there. torchrun exits 1 whatever its workers return, so ``launch/torchrun.sh`` names a
file in ``DEBATER_STOP_NOTE`` that a stopped rank writes, and exits ``STOPPED_EARLY`` when it exists.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from debater import distributed
from debater.core.config import TrainConfig, end_time_epoch
from debater.core.exit_codes import STOPPED_EARLY

log = logging.getLogger(__name__)
STOP_NOTE_ENV = "DEBATER_STOP_NOTE"
RECENT_STEPS = 10  # the margin uses the slowest of the last steps: one slow step must not miss the save


class StoppedEarly(Exception):
    """The run stopped at a step boundary with a published checkpoint; raised once every rank has saved."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"stopped early at step {step} ({reason}); checkpoint step-{step} is 'latest': resume "
                         "with resume_from_checkpoint=latest")
        self.step = step

    def note(self) -> None:
        """Tell a launcher that cannot pass exit codes on (torchrun) that this rank stopped early."""
        path = os.environ.get(STOP_NOTE_ENV)
        if path:
            Path(path).write_text(f"{self.step}\n")


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class StopRequest:
    """Signal flags and the deadline of one training process; ``agreed`` is the per-step collective decision."""

    def __init__(self, config: TrainConfig):
        self.signal_seen: int = 0
        self.signals = (signal.SIGTERM, signal.Signals[config.stop_signal])
        self.end, self.end_source = end_time_epoch(config)
        self.safety_s = config.stop_safety_s
        self.step_times: deque[float] = deque(maxlen=RECENT_STEPS)
        self.save_s = 0.0
        self._last_check = 0.0

    @contextmanager
    def handling_signals(self):
        """While inside, the stop signals only record themselves (nothing heavy may run in a handler); the
        handlers before are restored after, so that a caller of ``train`` in its own process gets its own back."""
        before = {signum: signal.signal(signum, self._record) for signum in self.signals}
        try:
            yield self
        finally:
            for signum, handler in before.items():
                signal.signal(signum, handler)

    def _record(self, signum: int, frame) -> None:
        self.signal_seen = signum

    def describe(self) -> str:
        """The start-up log line: what stops the run, and when it stops at the latest."""
        names = " or ".join(signal.Signals(s).name for s in self.signals)
        text = f"stops at a step boundary on {names} to any rank"
        if self.end is not None:
            text += (f"; end time {_utc(self.end)} (from {self.end_source}): stops by {_utc(self.end - self.safety_s)} "
                     f"at the latest, earlier by the measured step + checkpoint time")
        return text

    def margin_s(self) -> float:
        """Time the run needs before the end: one more step, its checkpoint, and the safety term."""
        step = max(self.step_times, default=0.0)
        return step + (self.save_s or step) + self.safety_s  # before the first save, a step stands in for it

    def begin(self) -> None:
        """The first step starts now (set-up time is no step time)."""
        self._last_check = time.monotonic()

    def step_done(self) -> None:
        now = time.monotonic()
        self.step_times.append(now - self._last_check)
        self._last_check = now

    def saved(self, seconds: float) -> None:
        self.save_s = max(self.save_s, seconds)
        self._last_check += seconds  # the save is not part of the next step's time

    def agreed(self, device: torch.device) -> str | None:
        """Call once per optimizer step on every rank: the reason to stop that any rank has, else None."""
        self.step_done()
        near = self.end is not None and self.end - time.time() < self.margin_s()
        flags = distributed.max_over_ranks(torch.tensor([self.signal_seen, int(near)], device=device))
        signum, deadline = (int(v) for v in flags.cpu())
        if signum:
            return f"{signal.Signals(signum).name} received"
        if deadline:
            return f"end time {_utc(self.end)} within the margin of {self.margin_s():.0f} s"
        return None
