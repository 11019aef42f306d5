"""Test entry point: ``python -m debater`` whose job ends $DEADLINE_AHEAD_S seconds after its first training step
begins, each step lasting at least $STEP_PACE_S seconds: a fake end time a few steps ahead of the run, however
long set-up takes on a busy machine. Each rank writes the end time it used (epoch seconds) to
$DEADLINE_FILE.rank{RANK}. Run it under a launcher in place of ``--module debater``; the stop logic is unchanged.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from debater.cli import exit_without_teardown, main
from debater.stop_request import StopRequest

_begin, _step_done = StopRequest.begin, StopRequest.step_done


def _begin_with_an_end_ahead(self) -> None:
    self.end, self.end_source = time.time() + float(os.environ["DEADLINE_AHEAD_S"]), "the test's fake end time"
    Path(f"{os.environ['DEADLINE_FILE']}.rank{os.environ.get('RANK', '0')}").write_text(repr(self.end))
    _begin(self)


def _paced_step_done(self) -> None:
    time.sleep(max(0.0, float(os.environ["STEP_PACE_S"]) - (time.monotonic() - self._last_check)))
    _step_done(self)


StopRequest.begin, StopRequest.step_done = _begin_with_an_end_ahead, _paced_step_done
if __name__ == "__main__":
    exit_without_teardown(main(sys.argv[1:]))
