"""What every command line entry point shares: logging set-up, ``--set KEY=VALUE`` overrides and turning
errors into one line."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from debater.core.errors import USER_ERRORS

# the embedded default model that `make assets` converts: the default of every --model (and convert-model --out)
EMBEDDED_MODEL = "assets/models/smollm2-135m"


def setup_logging(verbose: bool = False) -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx", "urllib3", "filelock", "torch.distributed", "DeepSpeed"):
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
    """Parse, set up logging, run ``args.func``; a user error is one log line and exit code 2."""
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        logger.error("%s", err)
        return 2
