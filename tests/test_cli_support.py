"""A user error is one line and exit code 2; anything else (a RuntimeError from torch, say) keeps its traceback."""
from __future__ import annotations

import argparse
import logging

import pytest

from data_pipeline.registry import RegistryError
from data_pipeline.stage_tokenize import PreprocessError
from debater.checkpoint import CheckpointError
from debater.core.cli_support import run_command
from debater.core.config import ConfigError
from debater.core.errors import USER_ERRORS, UserError
from debater.training_step import TrainingError

log = logging.getLogger("test_cli_support")


def command(error: Exception):
    parser = argparse.ArgumentParser()
    parser.add_argument("-v", "--verbose", action="store_true")

    def fail(args):
        raise error

    parser.set_defaults(func=fail)
    return parser


def test_runtime_error_is_not_a_user_error():
    assert not any(issubclass(RuntimeError, kind) or issubclass(kind, RuntimeError) for kind in USER_ERRORS)


@pytest.mark.parametrize("kind", [UserError, ConfigError, CheckpointError, RegistryError, PreprocessError,
                                  TrainingError])
def test_project_errors_are_one_line_and_exit_2(kind, caplog):
    with caplog.at_level(logging.ERROR, logger=log.name):
        assert run_command(command(kind("what was wrong; what to do")), [], log) == 2
    assert [r.getMessage() for r in caplog.records] == ["what was wrong; what to do"]


def test_a_runtime_error_propagates_with_its_traceback():
    with pytest.raises(RuntimeError, match="a bug in a library"):
        run_command(command(RuntimeError("a bug in a library")), [], log)


def test_an_error_every_rank_meets_is_reported_by_rank_0_alone(caplog, monkeypatch):
    """A launched run's ranks all read the same config: one line for the run, not one per rank. An error of one
    rank's own (a plain UserError, a missing file on that node) is still reported by that rank."""
    for rank, expected in (("0", ["a bad key"]), ("1", [])):
        monkeypatch.setenv("RANK", rank)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger=log.name):
            assert run_command(command(ConfigError("a bad key")), [], log) == 2
        assert [r.getMessage() for r in caplog.records] == expected
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger=log.name):
        assert run_command(command(FileNotFoundError("this node lacks /data")), [], log) == 2
    assert [r.getMessage() for r in caplog.records] == ["this node lacks /data"]
