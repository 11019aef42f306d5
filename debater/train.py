"""The DeepSpeed ZeRO-2 training run: set-up, the loop that drives ``TrainingStep``, the final export.

What one step computes (encode, gather, loss, update, with or without gradient caching) lives in
``debater/training_step.py``; this file only decides which batch comes next, when to log and when to
checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.loader import PreprocessedData, RankLoader
from data_pipeline.stage_tokenize import MANIFEST_NAME, preprocess, tokenizer_fingerprint
from debater import checkpoint, distributed
from debater.core.config import ConfigError, TrainConfig
from debater.core.padding import pad_token_id
from debater.model import avoid_cudnn_attention_backward, build_training_encoder, save_encoder
from debater.monitor import MetricsWindow, Monitor, peak_memory_mb
from debater.training_step import TrainingError, TrainingStep

log = logging.getLogger(__name__)
WEIGHTS_BY_RANK = "weights_by_rank.json"


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
    if config.grad_cache_chunk_size and ds.get("wall_clock_breakdown"):
        # the surrogate that carries the cached gradients is backpropagated without passing through an engine
        # output, so DeepSpeed's backward timers would be stopped without having started (an assertion)
        raise ConfigError(f"{path}: wall_clock_breakdown cannot time gradient caching (grad_cache_chunk_size="
                          f"{config.grad_cache_chunk_size}): set it false there, or grad_cache_chunk_size 0")
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
    distributed.release_cpu_allreduce_buffer()
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
        step, next_batch = checkpoint.load(engine, ckpt_dir, config.resume_from_checkpoint, global_batch)
    loader = RankLoader(data, plan, rank, world, pad_token_id(tokenizer), config.negatives_per_query)
    monitor = Monitor(output_dir, enabled=rank == 0)
    try:
        _loop(TrainingStep(engine, config, scheduler), loader, monitor, ckpt_dir, step, next_batch, total_steps)
    finally:
        monitor.close()  # a run that stops early keeps the curves that explain why
    _check_ranks_agree(engine.module, output_dir, engine.device)
    if rank == 0:
        save_encoder(engine.module, tokenizer, output_dir / "adapter", config.model_name_or_path, config.pooling_mode,
                     config.trust_remote_code)
        log.info("adapter exported to %s", output_dir / "adapter")
    distributed.barrier()
    distributed.shutdown()
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


def _loop(training_step: TrainingStep, loader: RankLoader, monitor: Monitor, ckpt_dir: Path, step: int,
          next_batch: int, total_steps: int) -> None:
    """Drive the step over the planned batches from (step, next_batch); log and checkpoint on schedule."""
    config, engine = training_step.config, training_step.engine
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=distributed.rank() != 0)
    window = MetricsWindow()
    while step < total_steps:
        batch = {k: v.to(engine.device) for k, v in loader.batch(next_batch).items()}
        parts = training_step.forward_backward(batch)
        loss = window.add(batch, parts)
        if not math.isfinite(loss):
            raise TrainingError(f"non-finite loss ({loss}) at step {step + 1}: stopping; the last good "
                                f"checkpoint stays 'latest' in {ckpt_dir}")
        grad_norm = training_step.update(step + 1, str(ckpt_dir))
        step, next_batch = step + 1, next_batch + 1
        bar.update(1)
        if step % config.logging_steps == 0 or step == total_steps:
            values = window.values()
            values.update({"train/learning_rate": training_step.scheduler.get_last_lr()[0],
                           "train/grad_norm": grad_norm,
                           "train/grad_cache_chunk_size": config.grad_cache_chunk_size,
                           "memory/peak_mb": peak_memory_mb(engine.device)})
            monitor.scalars(step, values)
            monitor.histogram(step, "train/best_step_for_positive", torch.cat(window.best_views),
                              engine.module.settings.num_views)
            bar.set_postfix(loss=f"{values['loss/total']:.3f}", acc=f"{values['train/in_batch_top1']:.2f}")
            window = MetricsWindow()
        if step % config.save_steps == 0 or step == total_steps:
            checkpoint.save(engine, ckpt_dir, step, next_batch, config.save_total_limit, loader.global_batch)
    bar.close()
