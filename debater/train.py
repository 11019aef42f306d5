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
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.loader import PreprocessedData, RankLoader
from data_pipeline.stage_tokenize import MANIFEST_NAME, preprocess, tokenizer_fingerprint
from debater import checkpoint, distributed
from debater.core.config import ConfigError, TrainConfig, settings_differences
from debater.core.padding import pad_token_id
from debater.core.prompts import resolve_step_tokens
from debater.model import avoid_cudnn_attention_backward, build_training_encoder, save_encoder
from debater.model_folder import RUN_INSTRUCTIONS
from debater.monitor import MetricsWindow, Monitor, peak_memory_mb
from debater.run_folder import BATCH_PLAN, WEIGHTS_BY_RANK
from debater.stop_request import StoppedEarly, StopRequest
from debater.training_step import TrainingError, TrainingStep

log = logging.getLogger(__name__)


def lr_lambda(config: TrainConfig, total_steps: int):
    """Linear warm-up, then decay over ``total_steps`` (the planned epoch, as the released code:
    ``stop_after_n_steps`` cuts the run short without compressing the schedule, so a stopped
    and resumed run follows the same learning rates as an uninterrupted one); times the start boost, if any."""
    warmup = min(config.warmup_steps, total_steps)

    def scheduled(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if config.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    def boost(step: int) -> float:
        """lr_start_boost at step 0, down to 1 by lr_start_boost_steps: a large rate only while the run is
        still on the chance plateau (docs/benchmarks.md)."""
        if step >= config.lr_start_boost_steps:
            return 1.0
        fading = 0.5 * (1.0 + math.cos(math.pi * step / config.lr_start_boost_steps))
        return 1.0 + (config.lr_start_boost - 1.0) * fading

    return lambda step: scheduled(step) * boost(step)


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
                            f"({settings_differences(data.manifest['settings'], settings.to_dict())}): preprocess "
                            "it again with this config (`make preprocess DATA=... OUT=... CONFIG=...`), or point "
                            "dataset_file_path at the raw echo-data folder")
    if data.manifest["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise TrainingError(f"{folder} was tokenized with another tokenizer than {config.model_name_or_path}")
    return data


def empty_plan_reason(data: PreprocessedData, global_batch: int, negatives_per_query: int) -> str:
    """Why no global batch could be planned: too few rows in every file, or too few with k negatives."""
    most = data.most_negatives()
    if most < negatives_per_query:
        return (f"negatives_per_query={negatives_per_query} but no row of {data.folder} has more than {most} hard "
                f"negative(s): set negatives_per_query to {max(most, 1)} or less, or add negatives (make preprocess "
                "MINE=K adds K BM25 negatives per query)")
    return (f"no file of {data.folder} has {global_batch} rows with {negatives_per_query} or more negatives (a global "
            f"batch is per_device_train_batch_size x ranks and comes from one file): lower "
            f"per_device_train_batch_size or negatives_per_query, or use fewer ranks")


def optimizer_groups(module: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """The trainable parameters as AdamW groups: with LoRA+ (``lora_b_lr_ratio`` != 1) the B matrices form a
    group of their own at that multiple of the learning rate; the schedule scales every group alike."""
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if config.lora_b_lr_ratio == 1:
        return [{"params": [p for _, p in trainable]}]
    b_matrices = [p for name, p in trainable if "lora_B" in name]
    if not b_matrices:
        raise TrainingError("lora_b_lr_ratio is set but the model trains no LoRA B matrix")
    return [{"params": [p for name, p in trainable if "lora_B" not in name]},
            {"params": b_matrices, "lr": config.learning_rate * config.lora_b_lr_ratio}]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(config: TrainConfig, ds_config_path: str) -> Path:
    """Train; raises ``StoppedEarly`` after checkpointing when a signal or the end time stopped the run."""
    stop = StopRequest(config)
    with stop.handling_signals():  # from the start: a signal during set-up stops the run after its first step
        return _train(config, ds_config_path, stop)


def _train(config: TrainConfig, ds_config_path: str, stop: StopRequest) -> Path:
    import deepspeed
    from transformers import AutoTokenizer

    distributed.init_deepspeed()
    avoid_cudnn_attention_backward()
    rank, world = distributed.rank(), distributed.world_size()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ds_config = build_ds_config(ds_config_path, config, world)
    seed_everything(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    settings = config.encoding_settings()
    resolve_step_tokens(tokenizer, settings)  # the data is checked before the model loads: its errors come fast
    data = open_training_data(config, settings, tokenizer)
    global_batch = config.per_device_train_batch_size * world
    plan = data.plan(global_batch, config.seed, config.negatives_per_query)
    total_steps = min(len(plan), config.stop_after_n_steps or len(plan))
    if len(plan) == 0:
        raise TrainingError(empty_plan_reason(data, global_batch, config.negatives_per_query))
    encoder = build_training_encoder(config, tokenizer)
    if rank == 0:
        (output_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
        (output_dir / RUN_INSTRUCTIONS).write_text(json.dumps(data.instructions(), indent=2))
        (output_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        (output_dir / BATCH_PLAN).write_text(json.dumps(
            {"global_batch": global_batch, "batches": len(plan), "dropped_rows": plan.dropped}, indent=2))
    groups = optimizer_groups(encoder, config)
    log.info("rank %d/%d: %d trainable parameters, %d planned batches, training %d steps",
             rank, world, sum(p.numel() for group in groups for p in group["params"]), len(plan), total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=encoder, model_parameters=groups, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config, len(plan))))
    # from_pretrained returns a model in eval mode: without this, gradient checkpointing never recomputes
    # (transformers checks self.training) and LoRA dropout is off whatever the config says
    engine.train()
    ckpt_dir = output_dir / "checkpoints"
    step, next_batch = 0, 0
    if config.resume_from_checkpoint:
        step, next_batch = checkpoint.load(engine, ckpt_dir, config.resume_from_checkpoint, global_batch)
    else:
        checkpoint.create_adam_state(engine)
    loader = RankLoader(data, plan, rank, world, pad_token_id(tokenizer), config.negatives_per_query)
    monitor = Monitor(output_dir, enabled=rank == 0)
    if rank == 0:
        log.info("%s", stop.describe())
    try:
        _loop(TrainingStep(engine, config, scheduler), loader, monitor, ckpt_dir, step, next_batch, total_steps, stop)
    except StoppedEarly:
        distributed.shutdown()  # every rank has saved: nothing is left to do together
        raise
    finally:
        monitor.close()  # a run that stops early keeps the curves that explain why
    _check_ranks_agree(engine.module, output_dir, engine.device)
    if rank == 0:
        save_encoder(engine.module, tokenizer, output_dir / "adapter", config.model_name_or_path, config.pooling_mode,
                     config.trust_remote_code, data.instructions(),
                     {"run": str(output_dir.resolve()), "checkpoint_step": total_steps})
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
          next_batch: int, total_steps: int, stop: StopRequest) -> None:
    """Drive the step over the planned batches from (step, next_batch); log and checkpoint on schedule, and
    checkpoint and raise ``StoppedEarly`` after the step at which the ranks agreed to stop."""
    config, engine = training_step.config, training_step.engine
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=distributed.rank() != 0)
    window = MetricsWindow()

    def save() -> None:
        began = time.monotonic()
        checkpoint.save(engine, ckpt_dir, step, next_batch, config.save_total_limit, loader.global_batch)
        stop.saved(time.monotonic() - began)

    stop.begin()
    while step < total_steps:
        batch = {k: v.to(engine.device) for k, v in loader.batch(next_batch).items()}
        parts = training_step.forward_backward(batch)
        loss = window.add(batch, parts)
        if not math.isfinite(loss):
            raise TrainingError(f"non-finite loss ({loss}) at step {step + 1}: stopping; the last good "
                                f"checkpoint stays 'latest' in {ckpt_dir}")
        rate = training_step.scheduler.get_last_lr()[0]  # the rate this step uses (update moves to the next)
        grad_norm = training_step.update(step + 1, str(ckpt_dir))
        step, next_batch = step + 1, next_batch + 1
        bar.update(1)
        if step % config.logging_steps == 0 or step == total_steps:
            values = window.values()
            values.update({"train/learning_rate": rate,
                           "train/grad_norm": grad_norm,
                           "train/grad_cache_chunk_size": config.grad_cache_chunk_size,
                           "memory/peak_mb": peak_memory_mb(engine.device),
                           **training_step.logged_diagnostics()})
            monitor.scalars(step, values)
            monitor.histogram(step, "train/best_step_for_positive", torch.cat(window.best_views),
                              engine.module.settings.num_views)
            bar.set_postfix(loss=f"{values['loss/total']:.3f}", acc=f"{values['train/in_batch_top1']:.2f}")
            window = MetricsWindow()
        scheduled = step % config.save_steps == 0 or step == total_steps
        if scheduled:
            save()
        reason = stop.agreed(engine.device)  # after the scheduled save: the margin is then one step and one save
        if reason and step < total_steps:
            if not scheduled:
                save()
            bar.close()
            raise StoppedEarly(step, reason)
    bar.close()

