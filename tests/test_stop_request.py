"""The stop request of one process: its config keys, its signal flags and its deadline arithmetic (a fake clock
drives steps and saves). That any rank's signal stops every rank, through the launchers, is in
tests/test_hostfile_launch.py, tests/test_multinode.py and tests/test_slurm_requeue.py."""
from __future__ import annotations

import os
import signal
from datetime import datetime, timezone

import pytest
import torch

from debater import stop_request
from debater.core.config import ConfigError, config_from_dict, end_time_epoch
from debater.stop_request import StopRequest

REQUIRED = {"model_name_or_path": "m", "dataset_file_path": "d", "output_dir": "o"}


def _config(**keys):
    return config_from_dict({**REQUIRED, **keys})


@pytest.mark.parametrize("name", ["SIGKILL", "USR1", "sigusr1", "SIGSEGV"])
def test_a_stop_signal_that_cannot_be_caught_or_is_misspelt_is_refused_naming_the_key(name):
    with pytest.raises(ConfigError, match="stop_signal"):
        _config(stop_signal=name)


def test_end_time_is_iso_8601_utc_unless_it_says_otherwise():
    expected = datetime(2026, 12, 1, 23, 30, tzinfo=timezone.utc).timestamp()
    for text in ("2026-12-01T23:30:00Z", "2026-12-01T23:30:00", "2026-12-02T00:30:00+01:00"):
        assert end_time_epoch(_config(end_time=text), {}) == (expected, "end_time")
    with pytest.raises(ConfigError, match="end_time must be an ISO 8601 time"):
        _config(end_time="in an hour")


def test_slurm_job_end_time_is_the_deadline_unless_the_config_names_one():
    assert end_time_epoch(_config(), {"SLURM_JOB_END_TIME": "1764631800"}) == (1764631800.0, "SLURM_JOB_END_TIME")
    assert end_time_epoch(_config(), {}) == (None, "")
    assert end_time_epoch(_config(end_time="2026-12-01T23:30:00Z"), {"SLURM_JOB_END_TIME": "1"})[1] == "end_time"
    with pytest.raises(ConfigError, match="SLURM_JOB_END_TIME should be seconds since the epoch"):
        end_time_epoch(_config(), {"SLURM_JOB_END_TIME": "soon"})


@pytest.mark.parametrize("configured, sent", [("SIGUSR1", signal.SIGUSR1), ("SIGUSR1", signal.SIGTERM),
                                              ("SIGUSR2", signal.SIGUSR2)])
def test_a_signal_only_sets_a_flag_that_the_next_step_check_reports(configured, sent):
    before = signal.getsignal(sent)
    stop = StopRequest(_config(stop_signal=configured))
    with stop.handling_signals():
        stop.begin()
        assert stop.agreed(torch.device("cpu")) is None
        os.kill(os.getpid(), sent)  # the process lives on: the handler only records the signal
        assert stop.agreed(torch.device("cpu")) == f"{sent.name} received"
    assert signal.getsignal(sent) == before  # the caller's handler is back


class FakeClock:
    def __init__(self, start: float):
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


@pytest.mark.parametrize("step_s, save_s, save_steps", [(10.0, 20.0, 2), (10.0, 3.0, 100), (7.0, 30.0, 3)])
def test_the_deadline_stops_at_the_last_step_whose_checkpoint_still_ends_in_time(monkeypatch, step_s, save_s,
                                                                                 save_steps):
    """An end time a few steps ahead: the run stops after the last step that leaves time for its checkpoint and
    the safety term, and not a step earlier than the measured times require."""
    clock = FakeClock(1_000_000.0)
    monkeypatch.setattr(stop_request, "time", clock)
    safety, end = 5.0, clock.now + 100.0
    stop = StopRequest(_config(end_time=datetime.fromtimestamp(end, timezone.utc).isoformat(), stop_safety_s=safety))
    stop.begin()
    step = 0
    while True:  # in the order of the training loop: step, scheduled save, the check, the stop's save
        clock.now += step_s
        step += 1
        scheduled = step % save_steps == 0
        if scheduled:
            clock.now += save_s
            stop.saved(save_s)
        reason = stop.agreed(torch.device("cpu"))
        if reason:
            if not scheduled:
                clock.now += save_s
                stop.saved(save_s)
            break
        assert step < 100, "never stopped"
    assert "end time" in reason
    assert clock.now <= end - safety, "the checkpoint of the stop ended too late"
    continued_until = clock.now + step_s + (save_s if scheduled else 0.0)  # one more step, then its checkpoint
    slack = max(0.0, step_s - save_s)  # before the first save the margin counts a step for it
    assert continued_until > end - safety - slack, "stopped a step earlier than needed"


def test_the_start_up_line_says_when_the_run_stops_at_the_latest():
    stop = StopRequest(_config(end_time="2026-12-01T23:30:00Z", stop_safety_s=90))
    assert "end time 2026-12-01 23:30:00 UTC (from end_time): stops by 2026-12-01 23:28:30 UTC" in stop.describe()


def _survive_a_stop_signal(signum: int) -> int:
    os.kill(os.getpid(), signum)
    return os.getpid()


def test_forked_worker_processes_ignore_the_stop_signals():
    """The tokenizing pool's workers are forked from a rank that is handling the stop signals: a stop signal that
    reaches a worker (SLURM signals every process of a job step) leaves it working."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    with StopRequest(_config()).handling_signals():
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            for signum in (signal.SIGTERM, signal.SIGUSR1):
                assert pool.submit(_survive_a_stop_signal, signum).result(timeout=60) != os.getpid()
