"""How far apart queries and document views are, before and after training (a diagnostic).

How far apart queries and document views are, and how much the scores tell candidates apart (the statistics
training logs as ``diag/*``, from ``debater.diagnostics``): for the base model in each document format, and
for trained runs.

Contrastive loss can reach ln(N) (uniform scores) without learning anything, by making every document's view
alike (doc-doc cosine near 1, score spread near 0); a run that learns spreads them out instead. Also, for the
cause: the same cosine and margin once the batch's mean query and mean view are subtracted (``centred_*``: the
signal under a shared direction), the share of a view's squared norm in the 3 coordinates largest over the
batch (massive activations) and the views' mean norm. One batch of
training rows; the base model's formats (no LoRA):
- ``eos``: the vanilla view (the EOS after the text);
- ``last_k``: the last K input tokens (the SD-only ablation);
- ``steps_existing``: the deliberation prompt + K existing special tokens (SmolLM2's code markup), the default;
- ``steps_added``: the same prompt + K added ``<step_i>`` rows drawn at the vocabulary covariance;
- ``steps_no_prompt``: K added step rows right after the text, no prompt;
- ``one_step``: one added step row right after the text (vanilla's format with a new token in place of EOS);
- ``steps_eos_init`` / ``steps_eos_init_no_prompt``: the added rows start as copies of the EOS row.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import benchmark_parser, write_result
from debater.core.padding import left_pad, pad_token_id
from debater.core.prompts import EncodingSettings, TextFormatter
from debater.diagnostics import batch_diagnostics
from debater.losses import view_scores
from debater.model import DebaterEncoder, load_backbone_with_steps, load_encoder

INSTRUCTION_FILE = "assets/data/debian/echo-data/datasets.json"  # the instruction training uses
ADDED = [f"<step_{i}>" for i in range(1, 9)]
FORMATS = {
    "eos": {"doc_mode": "last_token"},
    "last_k": {"doc_mode": "last_k_tokens"},
    "steps_existing": {"doc_mode": "step_tokens"},
    "steps_added": {"doc_mode": "step_tokens", "step_tokens": ADDED},
    "steps_no_prompt": {"doc_mode": "step_tokens", "step_tokens": ADDED, "deliberation_prompt": ""},
    "one_step": {"doc_mode": "step_tokens", "step_tokens": ADDED[:1], "cod_steps": 1, "deliberation_prompt": ""},
    "steps_eos_init": {"doc_mode": "step_tokens", "step_tokens": ADDED, "step_token_init": "eos"},
    "steps_eos_init_no_prompt": {"doc_mode": "step_tokens", "step_tokens": ADDED, "deliberation_prompt": "",
                                 "step_token_init": "eos"},
}


def read_rows(path: Path, count: int, stride: int) -> list[dict]:
    with path.open() as lines:
        return [json.loads(line) for line in itertools.islice(lines, 0, count * stride, stride)]


def centred(queries: torch.Tensor, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, D] queries less their batch mean, [N, K, D] views less the documents' mean at each view position: what
    is left once a direction every text shares is taken out."""
    return queries - queries.mean(0), views - views.mean(0, keepdim=True)


def top_dims_share(vectors: torch.Tensor, count: int = 3) -> float:
    """The mean share of each [N, D] vector's squared norm held by the ``count`` coordinates with the largest
    mean magnitude over the batch: near 1 when a few fixed coordinates dominate every text (massive
    activations)."""
    dims = vectors.abs().mean(0).topk(min(count, vectors.shape[1])).indices
    squares = vectors.float().square()
    return float((squares[:, dims].sum(-1) / squares.sum(-1)).mean())


def statistics(encoder: DebaterEncoder, tokenizer, rows: list[dict], instruction: str, scale: float) -> dict:
    """Score statistics of one encoder: queries against every positive and negative of the batch."""
    formatter = TextFormatter(tokenizer, encoder.settings)
    pad_id = pad_token_id(tokenizer)
    queries = formatter.queries([r["query"] for r in rows], [instruction] * len(rows))
    documents = formatter.documents([r["positive"] for r in rows] + [r["negative"] for r in rows])
    with torch.no_grad():
        q = encoder.encode_queries(*left_pad(queries, pad_id))
        views = encoder.encode_documents(*left_pad(documents, pad_id))
    scores = view_scores(q, views, scale)                       # [B, 2B, V]
    best = scores.max(-1).values
    labels = torch.arange(len(rows))
    # the same statistics the trainer logs as diag/* (one definition: debater.diagnostics)
    shared = {name.removeprefix("diag/"): round(value, 4)
              for name, value in batch_diagnostics(q, views, labels, scale).items()}
    without_shared = batch_diagnostics(*centred(q, views), labels, scale)
    return {
        **shared,
        "centred_doc_view_cosine": round(without_shared["diag/doc_view_cosine"], 4),
        "centred_positive_margin": round(without_shared["diag/positive_margin"], 4),
        "doc_top3_dims_share": round(top_dims_share(views[:, -1]), 4),
        "doc_view_norm": round(float(views[:, -1].norm(dim=-1).mean()), 2),
        "query_doc_cosine": round(float(scores[..., -1].mean() / scale), 4),
        "loss": round(float(F.cross_entropy(best, labels)), 4),
        "top1": round(float((best.argmax(-1) == labels).float().mean()), 4),
    }


def base_encoder(model_path: str, fields: dict, max_length: int) -> tuple[DebaterEncoder, object]:
    """The untrained model with one document format (fresh step rows where tokens are added)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    fields = dict(fields)
    init = fields.pop("step_token_init", "sampled")  # how added rows start; not an encoding setting
    settings = EncodingSettings(**fields, query_max_length=max_length, doc_max_length=max_length)
    backbone = load_backbone_with_steps(model_path, tokenizer, settings, "float32", "sdpa", step_token_init=init)
    return DebaterEncoder(backbone, settings).eval(), tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("view_signal", __doc__)
    parser.add_argument("--trained", nargs="*", default=[], help="trained runs or exported adapters to compare")
    parser.add_argument("--data", type=Path, default=Path("assets/data/debian/echo-data/debian_packages.jsonl"))
    parser.add_argument("--rows", type=int, default=32, help="batch size (queries; 2x as many candidates)")
    parser.add_argument("--stride", type=int, default=125, help="take every n-th row, to mix packages")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--scale", type=float, default=30.0)
    args = parser.parse_args(argv)
    rows = read_rows(args.data, args.rows, args.stride)
    instruction = json.loads(Path(INSTRUCTION_FILE).read_text())[args.data.stem]
    encoders = {f"base {name}": lambda fields=fields: base_encoder(args.model, fields, args.max_length)
                for name, fields in FORMATS.items()}
    encoders.update({"/".join(Path(path).parts[-2:]):
                     lambda path=path: load_encoder(path, max_length=args.max_length)[:2] for path in args.trained})
    table = {name: statistics(*make(), rows, instruction, args.scale) for name, make in encoders.items()}
    width = max(map(len, table))
    for name, stats in table.items():
        print(f"{name:<{width}}  " + "  ".join(f"{key}={value}" for key, value in stats.items()))
    spreads = ", ".join(f"{name} {stats['score_std']}" for name, stats in table.items())
    write_result({"name": "view_signal", "rows": len(rows), "candidates": 2 * len(rows), "formats": table,
                  "summary": f"score spread over candidates (scaled units): {spreads}"}, args.out, args.model)
    return 0

