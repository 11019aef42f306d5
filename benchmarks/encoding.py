"""Document encoding: our TextEncoder against the naive way, same model, texts and device.

- ours: ``TextEncoder.document_views``: texts sorted by length, so each batch
  is padded only to its own longest text;
- naive: texts in their given order, fixed batches, every batch padded to the
  maximum length (what ``tokenizer(..., padding="max_length")`` feeds a model).

Both start from the raw texts (tokenizing is timed too), use one device (the
first GPU in bf16, else the CPU in fp32) and must give the same embeddings: the
largest absolute difference is recorded. ``--max-length`` defaults to 128 so
the CPU run stays short; the gain grows with the gap between the maximum and
the texts' real lengths, so on a GPU use the evaluation's 512.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import benchmark_parser, write_result
from debater.beir import read_texts
from debater.core.padding import left_pad
from debater.inference_encoder import TextEncoder, inference_devices, load_text_encoder


def naive_document_views(text_encoder: TextEncoder, texts: list[str]) -> np.ndarray:
    """[N, V, D] in input order, every batch left-padded to the configured maximum length."""
    replica = text_encoder.replicas[0]
    device = next(replica.parameters()).device
    width = text_encoder.settings.doc_max_length
    sequences = text_encoder.formatter.documents(texts)
    out = []
    with torch.inference_mode():
        for first in range(0, len(sequences), text_encoder.batch_size):
            ids, mask = left_pad(sequences[first:first + text_encoder.batch_size], text_encoder.pad_id)
            ids = F.pad(ids, (width - ids.shape[1], 0), value=text_encoder.pad_id)
            mask = F.pad(mask, (width - mask.shape[1], 0), value=0)
            views = replica.encode_documents(ids.to(device), mask.to(device))
            out.append(F.normalize(views.float(), dim=-1).cpu())
    return torch.cat(out).numpy()


def timed(function, *args) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def measure(args) -> dict:
    texts = read_texts(args.texts)[1][:args.n]
    device = inference_devices()[:1]
    text_encoder = load_text_encoder(args.model, args.batch_size, args.max_length, devices=device)
    text_encoder.document_views(texts[:2])  # warm-up: first-call allocations stay out of both timings
    ours, ours_s = timed(text_encoder.document_views, texts)
    naive, naive_s = timed(naive_document_views, text_encoder, texts)
    lengths = [len(ids) for ids in text_encoder.formatter.documents(texts)]
    max_abs_diff = float(np.abs(ours - naive).max())
    tolerance = 1e-4 if device[0] == "cpu" else 2e-2  # fp32 on the CPU, bf16 on a GPU
    return {
        "name": "encoding", "model": args.model, "texts": str(args.texts), "n": len(texts),
        "device": device[0], "batch_size": args.batch_size, "max_length": text_encoder.settings.doc_max_length,
        "mean_tokens_per_text": round(float(np.mean(lengths)), 1), "views": int(ours.shape[1]),
        "ours_seconds": round(ours_s, 2), "naive_seconds": round(naive_s, 2),
        "ours_texts_per_s": round(len(texts) / ours_s, 2), "naive_texts_per_s": round(len(texts) / naive_s, 2),
        "ratio": round(naive_s / ours_s, 2), "max_abs_diff": max_abs_diff,
        "same_embeddings": max_abs_diff <= tolerance, "tolerance": tolerance,
    }


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("encoding", __doc__)
    parser.add_argument("--texts", type=Path, default=Path("assets/data/debian/test/corpus.jsonl"),
                        help="BEIR corpus.jsonl, other jsonl with 'text', or a text file, one per line")
    parser.add_argument("--n", type=int, default=256, help="encode the first N texts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per document, suffix included")
    args = parser.parse_args(argv)
    result = measure(args)
    result["summary"] = (
        f"encoding {result['n']} texts on {result['device']}: ours {result['ours_texts_per_s']} texts/s, "
        f"naive {result['naive_texts_per_s']} texts/s, {result['ratio']}x; "
        f"max abs diff {result['max_abs_diff']:.2e} "
        f"({'same' if result['same_embeddings'] else 'DIFFERENT'} embeddings)")
    write_result(result, args.out, args.model)
    return 0

