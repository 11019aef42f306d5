"""One training step at the released shape (MiniCPM-2.4B, random weights): tokens/s, peak memory, MFU.

The decoder is built from a config in the repository with random weights
(benchmarks/shapes/minicpm2-2b.json: MiniCPM-2.4B's layers and widths), 64 queries with one hard
negative each (192 texts) of 512 tokens, LoRA, gradient checkpointing, through the trainer's own path
(config -> build_training_encoder -> DeepSpeed ZeRO-2 engine -> TrainingStep). Reports tokens/s, peak memory
and MFU, and what the ``diag/*`` values of a logging step add, as a share of one step (issue 25: under 1%).
Runs as one process that is its own single-rank group.

FLOPs counted per token (P: weights of the decoder's linear layers, LoRA's P_lora; L layers, width d,
sequence s; attention counted over the full s x s square, as is usual, though causal kernels skip half):
- forward: 2 P + 2 P_lora + 4 s d L (scores and weighted values)
- backward: the frozen weights need gradients of their inputs only (2 P); LoRA's of inputs and weights
  (4 P_lora); attention twice its forward (8 s d L)
- model FLOPs = forward + backward = 4 P + 6 P_lora + 12 s d L; MFU = model FLOPs x tokens/s / peak
- hardware FLOPs add gradient checkpointing's second forward: 6 P + 8 P_lora + 16 s d L
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from benchmarks.common import benchmark_parser, write_result
from benchmarks.fused_dropout_check import fused_dropout_equality

SHAPE = Path("benchmarks/shapes/minicpm2-2b.json")
PEAK_BF16_TFLOPS = 989.4  # H100 / H200 SXM dense bf16, vendor datasheet
DROPOUT_BAR = 1.05  # the step with keyed LoRA dropout may take at most this many times the step without
DIAGNOSTICS_BAR = 0.01  # what a logging step adds for its diag/* values, as a share of one step (issue 25)
FORMULA = ("model FLOPs/token = 4 P + 6 P_lora + 12 s d L (frozen base: forward 2P + 2P_lora + 4sdL, backward "
           "2P + 4P_lora + 8sdL); hardware FLOPs add checkpointing's second forward: 6 P + 8 P_lora + 16 s d L; "
           "MFU = model FLOPs/token x tokens/s / peak")


def build_random_model(shape: Path, tokenizer_from: Path, out: Path, dtype: torch.dtype) -> Path:
    """Save a model of ``shape`` with random weights and ``tokenizer_from``'s tokenizer (ids stay in range)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    raw = {k: v for k, v in json.loads(shape.read_text()).items() if not k.startswith("_")}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    raw.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    raw["vocab_size"] = max(raw["vocab_size"], len(tokenizer))
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**raw)).to(dtype)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def flops_per_token(model_config, lora_params: int, seq: int) -> dict:
    d, layers = model_config.hidden_size, model_config.num_hidden_layers
    kv = model_config.num_key_value_heads * (d // model_config.num_attention_heads)
    linear = layers * (d * (2 * d + 2 * kv) + 3 * d * model_config.intermediate_size)
    attention = seq * d * layers
    return {"linear_params": linear, "lora_params": lora_params,
            "model": 4 * linear + 6 * lora_params + 12 * attention,
            "hardware": 6 * linear + 8 * lora_params + 16 * attention}


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """The rate of one large matrix product on random data (the ceiling this machine reaches)."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    sync(device)
    start, repeats = time.perf_counter(), 5
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def significant(value: float, digits: int = 4) -> float:
    """Rounds to significant digits, not decimals: a ratio recomputed from the rounded values stays within 0.2%."""
    return float(f"{value:.{digits}g}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(queries: int, negatives: int, seq: int, vocab: int, device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    docs = queries * (1 + negatives)
    batch = {"query_ids": torch.randint(3, vocab, (queries, seq), generator=generator),
             "doc_ids": torch.randint(3, vocab, (docs, seq), generator=generator),
             "query_mask": torch.ones(queries, seq, dtype=torch.long), "doc_mask": torch.ones(docs, seq, dtype=torch.long),
             "query_keys": torch.arange(queries) * 3, "doc_keys": torch.arange(docs) * 3 + 1}
    return {k: v.to(device) for k, v in batch.items()}


def timed_steps(step, batch: dict[str, torch.Tensor], count: int, work: Path) -> tuple[list[float], object, float]:
    """Seconds of each of ``count`` whole steps (forward, backward, optimizer), the last loss and gradient norm."""
    device = batch["query_ids"].device
    times = []
    for number in range(count):
        sync(device)
        start = time.perf_counter()
        parts = step.forward_backward(batch)
        grad_norm = step.update(number + 1, str(work))
        sync(device)
        times.append(time.perf_counter() - start)
    return times, parts, grad_norm


def timed_diagnostics(step, device: torch.device, count: int) -> list[float]:
    """Seconds of each of ``count`` calls of what a logging step adds: every ``diag/*`` value of the last batch."""
    times = []
    for _ in range(count):
        sync(device)
        start = time.perf_counter()
        step.logged_diagnostics()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def measure(args: argparse.Namespace) -> dict:
    import deepspeed
    from transformers import AutoTokenizer

    from debater import distributed
    from debater.core.config import config_from_dict
    from debater.keyed_dropout import KeyedDropout
    from debater.model import avoid_cudnn_attention_backward, build_training_encoder
    from debater.train import build_ds_config, seed_everything
    from debater.training_step import TrainingStep

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(args.port)})
    distributed.init_deepspeed()
    avoid_cudnn_attention_backward()
    gpu = torch.cuda.is_available()
    dtype = "bfloat16" if gpu else "float32"
    started = time.perf_counter()
    folder = build_random_model(args.shape, Path(args.model), args.out / "random-model", getattr(torch, dtype))
    built_s = time.perf_counter() - started
    config = config_from_dict({"model_name_or_path": str(folder), "dataset_file_path": "-", "output_dir": str(args.out),
                               "per_device_train_batch_size": args.queries, "max_seq_length": args.seq,
                               "gradient_checkpointing": True, "torch_dtype": dtype, "attn_implementation": args.attention,
                               "lora_r": 16, "lora_alpha": 32, "loss_variant": "full", "cod_steps": 8})
    ds_config = build_ds_config("ds_configs/zero2_bf16.json" if gpu else "ds_configs/zero2_cpu.json", config, 1)
    seed_everything(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = build_training_encoder(config, tokenizer)
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=encoder, model_parameters=trainable, config=ds_config)
    engine.train()
    step = TrainingStep(engine, config, None)
    batch = random_batch(args.queries, 1, args.seq, len(tokenizer), engine.device)
    tokens = batch["query_ids"].numel() + batch["doc_ids"].numel()
    if gpu:  # the peak of the steps, not of building the random model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, parts, grad_norm = timed_steps(step, batch, 1, args.out)  # warms up (and compiles the dropout kernel)
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    dropouts = [module for module in encoder.modules() if isinstance(module, KeyedDropout)]
    no_dropout_times = []
    for _ in range(args.timed_steps):  # what the LoRA dropout masks cost: the same step without them, alternating
        for module in dropouts:
            module.p = config.lora_dropout
        more, parts, grad_norm = timed_steps(step, batch, 1, args.out)
        times += more
        for module in dropouts:
            module.p = 0.0
        no_dropout_times += timed_steps(step, batch, 1, args.out)[0]
    seconds, no_dropout_seconds = min(times[1:]), min(no_dropout_times)
    diagnostics_seconds = min(timed_diagnostics(step, engine.device, 5))
    flops = flops_per_token(encoder.backbone.config, sum(p.numel() for p in trainable), args.seq)
    tokens_per_s = tokens / seconds
    equality = fused_dropout_equality(engine.device)
    slowdown = seconds / no_dropout_seconds
    diagnostics_share = diagnostics_seconds / seconds
    result = {"shape": str(args.shape), "device": torch.cuda.get_device_name(0) if gpu else "cpu", "dtype": dtype,
              "attention": encoder.backbone.config._attn_implementation,
              "queries": args.queries, "texts": batch["query_ids"].shape[0] + batch["doc_ids"].shape[0],
              "seq": args.seq, "tokens_per_step": tokens, "build_model_s": round(built_s, 1),
              "step_s": [significant(t) for t in times], "tokens_per_s": round(tokens_per_s),
              "lora_dropout": config.lora_dropout, "tokens_per_s_without_lora_dropout": round(tokens / no_dropout_seconds),
              "dropout_step_time_ratio": round(slowdown, 3), "fused_dropout_equals_reference": equality,
              "diagnostics_s": significant(diagnostics_seconds), "diagnostics_step_share": significant(diagnostics_share),
              # the time bars hold on a GPU; a smoke run's few tiny CPU steps on a shared machine are too noisy
              "ok": equality["equal"] and ((slowdown <= DROPOUT_BAR and diagnostics_share <= DIAGNOSTICS_BAR)
                                           or not gpu),
              "loss": float(parts.total.detach()), "grad_norm": grad_norm, "flops_per_token": flops, "flop_formula": FORMULA,
              "model_tflops": round(flops["model"] * tokens_per_s / 1e12, 1),
              "hardware_tflops": round(flops["hardware"] * tokens_per_s / 1e12, 1)}
    if gpu:
        result["peak_gb"] = round(peak_gb, 2)
        result["matmul_tflops"] = round(matmul_tflops(engine.device, torch.bfloat16, 8192), 1)
        result["mfu_vs_datasheet"] = round(result["model_tflops"] / PEAK_BF16_TFLOPS, 4)
        result["mfu_vs_measured_matmul"] = round(result["model_tflops"] / result["matmul_tflops"], 4)
    distributed.shutdown()
    shutil.rmtree(folder, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("step_throughput", __doc__)  # --model: the folder whose tokenizer to use
    parser.add_argument("--shape", type=Path, default=SHAPE, help="a Llama config JSON (widths, layers, vocabulary)")
    parser.add_argument("--queries", type=int, default=64, help="queries per step (each with one hard negative)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per text")
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--timed-steps", type=int, default=2)
    parser.add_argument("--port", type=int, default=29811)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = measure(args)
    result["summary"] = (f"one step at {result['texts']} x {result['seq']} tokens ({result['dtype']}, {result['device']}): "
                         f"{result['tokens_per_s']} tokens/s, {result['model_tflops']} model TFLOP/s"
                         + (f", MFU {result['mfu_vs_datasheet']:.1%}, peak {result['peak_gb']} GB" if "peak_gb" in result else "")
                         + f"; LoRA dropout {result['dropout_step_time_ratio']}x the step without it, fused kernel "
                         + ("equals" if result["fused_dropout_equals_reference"]["equal"] else "DIFFERS FROM")
                         + f" the reference; the diag/* values of a logging step {result['diagnostics_step_share']:.3%} "
                         + "of a step")
    write_result(result, args.out, args.model)
    return 0
