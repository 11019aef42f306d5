"""The errors a command reports as one line (what was wrong, where, what to do) instead of a traceback."""
from __future__ import annotations


class UserError(Exception):
    """A condition the user can fix (a missing file, a bad value, a run that cannot go on as configured); the
    message says what to do. Project code raises a subclass of this, never a bare RuntimeError, for those.

    ``same_on_every_rank``: every rank of a launched run meets this error the same way (a config, the data, the
    output_dir), so rank 0 alone reports it; otherwise each rank that meets it says so."""

    same_on_every_rank = False


# ValueError and the OSErrors cover bad arguments and paths found by the standard library and our own checks;
# RuntimeError is left out on purpose: raised by torch or another library it is a bug, and needs its traceback.
USER_ERRORS = (UserError, ValueError, FileNotFoundError, PermissionError)
