"""What every command line entry point shares: logging set-up, ``--set KEY=VALUE`` overrides and turning
errors into one line."""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import warnings

from debater.core.errors import USER_ERRORS

# the embedded default model that `make assets` converts: the default of every --model (and convert-model --out)
EMBEDDED_MODEL = "assets/models/smollm2-135m"


def launched_rank() -> int:
    """This process's global rank as the launcher set it (0 when started alone)."""
    return int(os.environ.get("RANK", "0"))


class OwnMessagesOnly(logging.Filter):
    """On ranks other than 0: what every rank would say the same way is said once, by rank 0; a rank still
    reports errors and what it has of its own to say (a record logged with ``extra={"own": True}``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or getattr(record, "own", False)


def setup_logging(verbose: bool = False) -> None:
    rank = launched_rank()
    root = logging.getLogger()
    ours = not root.handlers  # a host that set up logging itself (pytest, a notebook) keeps its handlers as they are
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if ours and rank != 0 and not verbose:
        for handler in root.handlers:
            handler.addFilter(OwnMessagesOnly())
    # libraries whose INFO lines say nothing to a user (torch's extension loader: where DeepSpeed's ops are cached)
    for noisy in ("transformers", "httpx", "urllib3", "filelock", "torch.distributed", "DeepSpeed",
                  "torch.utils.cpp_extension"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    quiet_transformers()


def quiet_transformers() -> None:
    """transformers logs errors only and draws no progress bars. When it is not imported yet this is set up
    without importing it (that alone takes a second or more, which a command with nothing to do, such as a
    cached ``make preprocess``, should not pay): its logger reads TRANSFORMERS_VERBOSITY when it is first
    configured, and its progress-bar switch starts from huggingface_hub's, turned off here."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        return
    disable_progress_bars()


def config_override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses (numbers, lists, true) and as a string otherwise;
    an argparse ``type`` (a malformed pair is a usage error)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def run_command(parser, argv: list[str] | None, logger: logging.Logger) -> int:
    """Parse, set up logging, run ``args.func``; a user error is one log line and exit code 2 (one line per
    run when every rank meets it the same way)."""
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except ModuleNotFoundError as err:
        if importlib.util.find_spec("torch") is not None:
            raise  # the environment is the project's: a missing optional package keeps its traceback
        logger.error("%s has none of the project's packages (%s): run `make setup`, then `source .venv/bin/activate` "
                     "(or call .venv/bin/python), or use the make targets", sys.executable, err)
        return 2
    except USER_ERRORS as err:
        if not getattr(err, "same_on_every_rank", False) or launched_rank() == 0:
            logger.error("%s", err)
        return 2
