"""One training step: positives and negatives in one encoder pass against three passes.

One training step (forward + backward): positives and negatives in one encoder pass (ours)
against queries, positives and negatives in three separate passes (the original code), same
LoRA model, same batch, same machine. Both give the same loss; only the time differs."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import benchmark_parser, write_result
from debater.core.config import config_from_dict
from debater.core.padding import left_pad, pad_token_id
from debater.core.prompts import TextFormatter
from debater.losses import debater_loss

INSTRUCTION = "Given the one-line summary of a Debian package, retrieve the package's full description:"


def load_batch(path: Path, size: int, formatter: TextFormatter, pad_id: int) -> dict[str, tuple]:
    rows = []
    with open(path) as handle:
        for line in handle:
            rows.append(json.loads(line))
            if len(rows) == size:
                break
    negatives = [r["negative"] if isinstance(r["negative"], str) else r["negative"][0] for r in rows]
    positives = formatter.documents([r["positive"] for r in rows])
    negatives = formatter.documents(negatives)
    return {"queries": left_pad(formatter.queries([r["query"] for r in rows], [INSTRUCTION] * size), pad_id),
            "positives": left_pad(positives, pad_id), "negatives": left_pad(negatives, pad_id),
            "documents": left_pad(positives + negatives, pad_id)}


def step_ours(encoder, batch, labels) -> float:
    queries = encoder.encode_queries(*batch["queries"])
    views = encoder.encode_documents(*batch["documents"])
    loss = debater_loss(queries, views, labels, "full").total
    loss.backward()
    return loss.item()


def step_three_passes(encoder, batch, labels) -> float:
    queries = encoder.encode_queries(*batch["queries"])
    views = torch.cat([encoder.encode_documents(*batch["positives"]), encoder.encode_documents(*batch["negatives"])])
    loss = debater_loss(queries, views, labels, "full").total
    loss.backward()
    return loss.item()


def timed(step, encoder, batch, labels, repeats: int) -> tuple[float, float]:
    """(median seconds per step, loss); the first call warms up and is not timed."""
    loss = step(encoder, batch, labels)
    encoder.zero_grad(set_to_none=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(encoder, batch, labels)
        times.append(time.perf_counter() - start)
        encoder.zero_grad(set_to_none=True)
    return statistics.median(times), loss


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from debater.model import build_training_encoder

    parser = benchmark_parser("train_step", __doc__)
    parser.add_argument("--data", type=Path, default=Path("assets/data/debian/echo-data/debian_packages.jsonl"))
    parser.add_argument("--batch", type=int, default=8, help="queries per step (each with 1 positive, 1 negative)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = config_from_dict({"model_name_or_path": args.model, "dataset_file_path": "unused",
                               "output_dir": "unused", "max_seq_length": args.max_length, "lora_r": 16,
                               "lora_dropout": 0.0, "torch_dtype": "float32", "attn_implementation": "sdpa"})
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)
    encoder = build_training_encoder(config, tokenizer).train()
    batch = load_batch(args.data, args.batch, TextFormatter(tokenizer, encoder.settings), pad_token_id(tokenizer))
    labels = torch.arange(args.batch)
    ours, ours_loss = timed(step_ours, encoder, batch, labels, args.repeats)
    naive, naive_loss = timed(step_three_passes, encoder, batch, labels, args.repeats)
    result = {
        "name": "train_step", "batch": args.batch, "max_length": args.max_length, "threads": args.threads,
        "seconds_per_step": {"ours_one_document_pass": round(ours, 3), "three_passes": round(naive, 3)},
        "speedup": round(naive / ours, 2), "loss": {"ours": ours_loss, "three_passes": naive_loss},
        "doc_padding": {name: round(1 - float(batch[name][1].float().mean()), 3)
                        for name in ("positives", "negatives", "documents")},
    }
    result["summary"] = (f"train step, batch {args.batch}: one document pass {ours:.2f} s, three passes "
                         f"{naive:.2f} s -> {result['speedup']}x (losses {ours_loss:.6f} / {naive_loss:.6f})")
    write_result(result, args.out, args.model)
    return 0

