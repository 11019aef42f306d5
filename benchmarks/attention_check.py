"""Which attention kernel training really runs, and whether sdpa computes what eager attention does.

The backend is flash_attention_2 when flash-attn is importable on a GPU, else sdpa (the trainer's own
choice, ``choose_attention``). The kernels are read from the profiler over one forward and backward. Then one
batch, left-padded as the loader pads (rows of several lengths, 64 tokens wide: the shape that made cuDNN's
backward return NaN), goes through two encoders that differ only in ``attn_implementation`` (sdpa and eager,
same weights, same LoRA initialisation, no dropout); relative L2 errors ||a - b|| / ||b|| of their embeddings
and their gradients in every trainable tensor. In fp32 they must agree within a fixed tolerance. In bf16 the
rounding alone moves the gradients by several percent, so both are compared with eager attention in fp32, and
sdpa must be no further from it than eager is (up to a factor).
"""
from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.common import benchmark_parser, write_result

TOLERANCE_FP32 = {"embeddings": 1e-4, "gradients": 1e-3}  # relative L2 error allowed between sdpa and eager in fp32
# in bf16 (rounding alone moves gradients by ~0.1-0.2 relative here): sdpa may be at most this much further than eager
# from the fp32 eager answer
BF16_SLACK = 1.5
KERNEL_WORDS = ("attention", "flash", "fmha")  # in the names of sdpa's, flash-attn's and eager's kernels/ops


def build(model: Path, attention: str, dtype: str, device: torch.device):
    from transformers import AutoTokenizer

    from debater.core.config import config_from_dict
    from debater.model import build_training_encoder
    from debater.train import seed_everything

    config = config_from_dict({"model_name_or_path": str(model), "dataset_file_path": "-", "output_dir": "-",
                               "torch_dtype": dtype, "attn_implementation": attention, "lora_dropout": 0.0,
                               "cod_steps": 8, "loss_variant": "full"})
    tokenizer = AutoTokenizer.from_pretrained(model)
    seed_everything(config.seed)
    encoder = build_training_encoder(config, tokenizer).to(device).train()
    return encoder, tokenizer


def padded_batch(vocab: int, rows: int, width: int, device) -> dict[str, torch.Tensor]:
    """Random ids, left-padded: row i keeps its last width - 5 i tokens (at least 8)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (rows, width), generator=generator)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for i in range(rows):
        mask[i, -max(8, width - 5 * i):] = 1
    queries, docs = rows // 3, rows - rows // 3
    batch = {"query_ids": ids[:queries], "query_mask": mask[:queries], "doc_ids": ids[queries:], "doc_mask": mask[queries:],
             "query_keys": torch.arange(queries), "doc_keys": torch.arange(docs) + 1000}
    return {k: v.to(device) for k, v in batch.items()}


def embeddings_and_gradients(encoder, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    from debater.losses import debater_loss

    encoder.zero_grad(set_to_none=True)
    queries, views = encoder(**batch)  # the first documents are the queries' positives
    loss = debater_loss(queries, views, torch.arange(queries.shape[0], device=queries.device), "full").total
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in encoder.named_parameters() if p.grad is not None}
    return torch.cat([queries.detach().float().flatten(), views.detach().float().flatten()]), grads, float(loss.detach())


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def profiled(encoder, batch) -> tuple[tuple, list[str]]:
    """(embeddings_and_gradients, names of the attention kernels or CPU ops that forward and backward ran)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        outputs = embeddings_and_gradients(encoder, batch)
    names = {event.key for event in prof.key_averages()}
    return outputs, sorted(n for n in names if any(word in n.lower() for word in KERNEL_WORDS))


def errors_against(reference: tuple, other: tuple) -> dict[str, float]:
    """Relative L2 errors of (embeddings, gradients) against a reference's, over every trainable tensor."""
    names = sorted(reference[1])
    flat = lambda grads: torch.cat([grads[n].flatten() for n in names])  # noqa: E731
    return {"embeddings": relative_error(other[0], reference[0]),
            "gradients": relative_error(flat(other[1]), flat(reference[1])),
            "worst_tensor": max(relative_error(other[1][n], reference[1][n]) for n in names)}


def run_with(model: Path, attention: str, dtype: str, device, batch) -> tuple:
    encoder, _ = build(model, attention, dtype, device)
    return embeddings_and_gradients(encoder, batch)


def check(model: Path) -> dict:
    from debater.model import avoid_cudnn_attention_backward, choose_attention

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = "bfloat16" if gpu else "float32"
    avoid_cudnn_attention_backward()  # as the trainer does
    backend = choose_attention("flash_attention_2")
    encoder, tokenizer = build(model, backend, dtype, device)
    batch = padded_batch(len(tokenizer), 12, 64, device)
    outputs, kernels = profiled(encoder, batch)
    result = {"dtype": dtype, "backend": backend, "kernels": kernels}
    del encoder
    sdpa = outputs if backend == "sdpa" else run_with(model, "sdpa", dtype, device, batch)
    eager = run_with(model, "eager", dtype, device, batch)
    finite = bool(torch.isfinite(sdpa[0]).all() and all(torch.isfinite(g).all() for g in sdpa[1].values()))
    result.update({"sdpa_vs_eager": errors_against(eager, sdpa), "losses": {"sdpa": sdpa[2], "eager": eager[2]},
                   "finite": finite})
    if dtype == "float32":
        tolerance = TOLERANCE_FP32
        result["rule"] = f"sdpa within {tolerance} of eager (relative L2)"
        within = all(result["sdpa_vs_eager"][k] <= tolerance[k] for k in tolerance)
    else:  # bf16 rounding alone moves gradients by several percent: judge both against fp32 eager attention
        exact = run_with(model, "eager", "float32", device, batch)
        result["against_fp32_eager"] = {"sdpa": errors_against(exact, sdpa), "eager": errors_against(exact, eager)}
        result["rule"] = f"sdpa's error against fp32 eager at most {BF16_SLACK}x eager's own bf16 error (+1e-3)"
        within = all(result["against_fp32_eager"]["sdpa"][k] <= BF16_SLACK * result["against_fp32_eager"]["eager"][k]
                     + 1e-3 for k in ("embeddings", "gradients"))
    result["ok"] = finite and within
    return result


def main(argv: list[str] | None = None) -> int:
    args = benchmark_parser("attention_check", __doc__).parse_args(argv)
    result = check(Path(args.model))
    errors = result["sdpa_vs_eager"]
    result["summary"] = (f"attention: {result['backend']} ({result['dtype']}); sdpa vs eager relative error "
                         f"{errors['embeddings']:.2e} (embeddings), {errors['gradients']:.2e} (gradients): "
                         + ("ok" if result["ok"] else "FAILED") + f" ({result['rule']})")
    write_result(result, args.out, args.model)
    return 0 if result["ok"] else 1
