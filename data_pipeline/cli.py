"""python -m data_pipeline: build the embedded Debian data, and preprocess echo-data into the tokenized
shards that training reads. Each command has its own --help."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from debater.core.cli_support import EMBEDDED_MODEL, run_command

log = logging.getLogger("data_pipeline")


def _settings(args):
    from debater.core.config import config_from_dict, load_config

    if args.config:
        config = load_config(args.config, {"model_name_or_path": args.model}, "--model")
    else:
        config = config_from_dict({"model_name_or_path": args.model, "dataset_file_path": str(args.data),
                                   "output_dir": str(args.out)})
    settings = config.encoding_settings()
    for key in ("cod_steps", "doc_max_length", "query_max_length"):
        value = getattr(args, key)
        if value is not None:
            setattr(settings, key, value)
    return settings


def cmd_preprocess(args) -> int:
    from data_pipeline.stage_tokenize import preprocess

    manifest = preprocess(args.data, args.out, args.model, _settings(args), strict=args.strict,
                          workers=args.workers, mine_k=args.mine_bm25)
    for entry in manifest["files"]:
        log.info("%s: read %d, written %d, skipped %s%s", entry["file"], entry["read"], entry["written"],
                 entry["skipped"] or "none",
                 f", mined {entry['mined']['added']} BM25 negatives" if "mined" in entry else "")
    log.info("manifest: %s", args.out / "manifest.json")
    return 0


def cmd_build_debian(args) -> int:
    from data_pipeline.debian import build_debian_data

    print(json.dumps(build_debian_data(args.out), indent=2))
    return 0


def cmd_build_stdlib_docs(args) -> int:
    from data_pipeline.stdlib_docs import build_stdlib_docs

    print(json.dumps(build_stdlib_docs(args.out, args.stdlib), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("preprocess", help="tokenize an echo-data folder into cached Arrow shards")
    pre.add_argument("--data", type=Path, required=True, help="folder of echo-format .jsonl files")
    pre.add_argument("--out", type=Path, required=True, help="output folder (manifest.json, shards/)")
    pre.add_argument("--model", default=EMBEDDED_MODEL, help=f"model whose tokenizer to use (default: {EMBEDDED_MODEL})")
    pre.add_argument("--config", help="training config JSON: lengths, cod_steps, prompt, loss_variant from it")
    pre.add_argument("--cod-steps", dest="cod_steps", type=int, help="K step tokens per document (overrides the config)")
    pre.add_argument("--max-seq-length", dest="doc_max_length", type=int,
                     help="max tokens per document, suffix included (overrides the config)")
    pre.add_argument("--query-max-length", dest="query_max_length", type=int,
                     help="max tokens per query (overrides the config)")
    pre.add_argument("--workers", type=int, help="parallel processes (default: one per core)")
    pre.add_argument("--mine-bm25", dest="mine_bm25", type=int, default=0, metavar="K",
                     help="add K BM25 hard negatives per query, mined among the same file's positives")
    pre.add_argument("--strict", action="store_true", help="any bad row is an error instead of a counted skip")
    pre.set_defaults(func=cmd_preprocess)
    deb = sub.add_parser("build-debian", help="build the embedded Debian retrieval data (train + BEIR test)")
    deb.add_argument("--out", type=Path, default=Path("assets/data/debian"), help="(default: assets/data/debian)")
    deb.set_defaults(func=cmd_build_debian)
    docs = sub.add_parser("build-stdlib-docs", help="build a second held-out BEIR set from the Python standard "
                                                    "library's docstrings (summary -> the rest)")
    docs.add_argument("--out", type=Path, default=Path("assets/data/stdlib-docs"),
                      help="(default: assets/data/stdlib-docs)")
    docs.add_argument("--stdlib", type=Path, help="a standard library folder (default: this interpreter's)")
    docs.set_defaults(func=cmd_build_stdlib_docs)
    return run_command(parser, argv, log)


if __name__ == "__main__":
    sys.exit(main())
