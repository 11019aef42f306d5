"""The DeepSpeed ZeRO-2 training loop: thin on purpose.

Each rank encodes its slice of the planned global batch (positives and hard
negatives in one forward pass), gathers every rank's candidates with
gradient, and computes the loss of its own queries against all of them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.loader import PreprocessedData, RankLoader
from data_pipeline.stage_tokenize import MANIFEST_NAME, preprocess, tokenizer_fingerprint
from debater import checkpoint, distributed
from debater.config import TrainConfig
from debater.losses import debater_loss
from debater.model import avoid_cudnn_attention_backward, build_training_encoder, save_encoder
from debater.monitor import Monitor, peak_memory_mb

log = logging.getLogger(__name__)
WEIGHTS_BY_RANK = "weights_by_rank.json"
LOGGED_MEANS = ("loss/total", "loss/contrastive", "loss/distillation", "train/in_batch_top1")


class TrainingError(RuntimeError):
    """A run that must stop; the message says at which step and why."""


def lr_lambda(config: TrainConfig, total_steps: int):
    """Linear warm-up, then decay over ``total_steps`` (the planned epoch, as the released code:
    ``stop_after_n_steps`` cuts the run short without compressing the schedule, so a stopped
    and resumed run follows the same learning rates as an uninterrupted one)."""
    warmup = min(config.warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if config.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


def build_ds_config(path: str, config: TrainConfig, world: int) -> dict:
    ds = json.loads(Path(path).read_text())
    ds["train_micro_batch_size_per_gpu"] = config.per_device_train_batch_size
    ds["train_batch_size"] = config.per_device_train_batch_size * world
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = config.max_grad_norm
    params = ds.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    params.update(lr=config.learning_rate, weight_decay=config.weight_decay)
    half = ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled")
    if not half and config.torch_dtype != "float32":
        log.info("DeepSpeed config %s trains in fp32: loading weights as float32 (torch_dtype=%s ignored)",
                 path, config.torch_dtype)
        config.torch_dtype = "float32"
    return ds


def open_training_data(config: TrainConfig, settings, tokenizer) -> PreprocessedData:
    """A preprocessed folder as is, or a raw echo-data folder preprocessed (cached) by rank 0."""
    source = Path(config.dataset_file_path)
    folder = source
    if not (source / MANIFEST_NAME).exists():
        folder = Path(config.output_dir) / "preprocessed"
        if distributed.rank() == 0:
            preprocess(source, folder, config.model_name_or_path, dataclasses.replace(settings))
        distributed.barrier()
    data = PreprocessedData(folder)
    if data.manifest["settings"] != settings.to_dict():
        raise TrainingError(f"{folder} was preprocessed with other settings than this config "
                            f"({data.manifest['settings']} vs {settings.to_dict()}): re-run `make preprocess` "
                            "with this CONFIG, or point dataset_file_path at the raw echo-data folder")
    if data.manifest["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise TrainingError(f"{folder} was tokenized with another tokenizer than {config.model_name_or_path}")
    return data


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(config: TrainConfig, ds_config_path: str) -> Path:
    import deepspeed
    from transformers import AutoTokenizer

    deepspeed.init_distributed()
    avoid_cudnn_attention_backward()
    rank, world = distributed.rank(), distributed.world_size()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ds_config = build_ds_config(ds_config_path, config, world)
    seed_everything(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    encoder = build_training_encoder(config, tokenizer)
    data = open_training_data(config, encoder.settings, tokenizer)
    global_batch = config.per_device_train_batch_size * world
    plan = data.plan(global_batch, config.seed, config.negatives_per_query)
    total_steps = min(len(plan), config.stop_after_n_steps or len(plan))
    if len(plan) == 0:
        raise TrainingError(f"no full global batch of {global_batch} rows in {data.folder}: lower the batch size")
    if rank == 0:
        (output_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
        (output_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        (output_dir / "batch_plan.json").write_text(json.dumps(
            {"global_batch": global_batch, "batches": len(plan), "dropped_rows": plan.dropped}, indent=2))
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    log.info("rank %d/%d: %d trainable parameters, %d planned batches, training %d steps",
             rank, world, sum(p.numel() for p in trainable), len(plan), total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=encoder, model_parameters=trainable, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config, len(plan))))
    # from_pretrained returns a model in eval mode: without this, gradient checkpointing never recomputes
    # (transformers checks self.training) and LoRA dropout is off whatever the config says
    engine.train()
    ckpt_dir = output_dir / "checkpoints"
    step, next_batch = 0, 0
    if config.resume_from_checkpoint:
        step, next_batch = checkpoint.load(engine, ckpt_dir, config.resume_from_checkpoint)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = RankLoader(data, plan, rank, world, pad_id, config.negatives_per_query)
    monitor = Monitor(output_dir, enabled=rank == 0)
    try:
        _loop(config, engine, scheduler, loader, monitor, ckpt_dir, step, next_batch, total_steps)
    finally:
        monitor.close()  # a run that stops early keeps the curves that explain why
    _check_ranks_agree(engine.module, output_dir, engine.device)
    if rank == 0:
        save_encoder(engine.module, tokenizer, output_dir / "adapter", config.model_name_or_path, config.pooling_mode,
                     config.trust_remote_code)
        log.info("adapter exported to %s", output_dir / "adapter")
    distributed.barrier()
    return output_dir


def _check_ranks_agree(module: torch.nn.Module, output_dir: Path, device: torch.device) -> None:
    """Every rank must end with bit-identical trainable weights (ZeRO-2 gathers them after each step).

    Rank 0 records each rank's digest in ``weights_by_rank.json``; a mismatch stops the run.
    """
    mine = checkpoint.weights_digest({n: p for n, p in module.named_parameters() if p.requires_grad})
    words = torch.frombuffer(bytearray.fromhex(mine), dtype=torch.int64).to(device)
    digests = [row.cpu().numpy().tobytes().hex() for row in distributed.gather_values(words).view(-1, words.numel())]
    if distributed.rank() == 0:
        (output_dir / WEIGHTS_BY_RANK).write_text(json.dumps({"sha256": digests}, indent=2))
    if len(set(digests)) > 1:
        raise TrainingError(f"ranks ended with different weights (sha256 per rank in {output_dir / WEIGHTS_BY_RANK}): "
                            "check that every node runs the same code and library versions")


def _loop(config, engine, scheduler, loader, monitor, ckpt_dir, step, next_batch, total_steps) -> None:
    rank, world = distributed.rank(), distributed.world_size()
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=rank != 0)
    window = {"tokens": 0.0, "slots": 0.0, "samples": 0, "start": time.perf_counter()}
    sums: dict[str, float] = {}
    best_views = []
    while step < total_steps:
        batch = {k: v.to(engine.device) for k, v in loader.batch(next_batch).items()}
        queries, views = engine(**batch)
        local = queries.shape[0]
        positives, negatives = views[:local], views[local:]
        candidates = torch.cat([distributed.gather_with_grad(positives), distributed.gather_with_grad(negatives)])
        labels = torch.arange(local, device=queries.device) + rank * local
        parts = debater_loss(queries, candidates, labels, config.loss_variant, config.scale,
                             config.cod_loss_weight, config.sd_loss_weight)
        engine.backward(parts.total)
        real = (batch["query_mask"].sum() + batch["doc_mask"].sum()).float()
        slots = real.new_tensor(batch["query_mask"].numel() + batch["doc_mask"].numel())
        # one all-reduce per step for everything logged: loss parts, top-1, real and padded token counts
        stats = distributed.mean_over_ranks(torch.stack(
            [parts.total.detach(), parts.contrastive.detach(), parts.distillation.detach(), parts.accuracy,
             real, slots])).tolist()
        if not math.isfinite(stats[0]):
            raise TrainingError(f"non-finite loss ({stats[0]}) at step {step + 1}: stopping; the last good "
                                f"checkpoint stays 'latest' in {ckpt_dir}")
        engine.step()
        grad_norm = float(engine.get_global_grad_norm() or 0.0)
        if not math.isfinite(grad_norm) and not engine.fp16_enabled():  # fp16's loss scaler skips overflows by design
            raise TrainingError(
                f"non-finite gradient norm ({grad_norm}) at step {step + 1} while the loss is finite: DeepSpeed "
                f"skipped the update, so training would go on without learning; stopping (the last good checkpoint "
                f"stays 'latest' in {ckpt_dir}). If this happens on a GPU with attn_implementation="
                f"{config.attn_implementation}, rerun with attn_implementation=eager to tell an attention-kernel bug "
                "from a model problem")
        step, next_batch = step + 1, next_batch + 1
        bar.update(1)
        for name, value in zip(LOGGED_MEANS, stats):
            sums[name] = sums.get(name, 0.0) + value
        best_views.append(distributed.gather_values(parts.best_view))
        window["tokens"] += stats[4] * world
        window["slots"] += stats[5] * world
        window["samples"] += local * world
        if step % config.logging_steps == 0 or step == total_steps:
            elapsed = time.perf_counter() - window["start"]
            count = len(best_views)
            values = {name: total / count for name, total in sums.items()}
            values.update({"train/learning_rate": scheduler.get_last_lr()[0],
                           "train/grad_norm": grad_norm,
                           "speed/tokens_per_s": window["tokens"] / elapsed,
                           "speed/samples_per_s": window["samples"] / elapsed,
                           "data/padding_fraction": 1.0 - window["tokens"] / window["slots"],
                           "memory/peak_mb": peak_memory_mb(engine.device)})
            monitor.scalars(step, values)
            monitor.histogram(step, "train/best_step_for_positive", torch.cat(best_views), views.shape[1])
            bar.set_postfix(loss=f"{values['loss/total']:.3f}", acc=f"{values['train/in_batch_top1']:.2f}")
            sums, best_views = {}, []
            window = {"tokens": 0.0, "slots": 0.0, "samples": 0, "start": time.perf_counter()}
        if step % config.save_steps == 0 or step == total_steps:
            checkpoint.save(engine, ckpt_dir, step, next_batch, config.save_total_limit)
    bar.close()
