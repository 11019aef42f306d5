"""Training tokens/s: our trainer against a Hugging Face Trainer shaped like the original code.

The baseline is what the released code does each step: its data collator
tokenizes the batch's raw strings (plus one more tokenizer call per text to
find where the instruction ends), and its ``compute_loss`` runs the encoder
three times (queries, positives, negatives). Ours reads pre-tokenized rows
and encodes positives and negatives in one pass, through ``debater.train``
and its DeepSpeed engine, here in this process with world size 1 so that it
meets the one-process Trainer on equal terms. Same model, LoRA, loss, rows,
batch, dtype (fp32), threads and machine; the baseline runs first, before
this process joins a (one-rank) process group.

Both sides count the non-pad tokens each step processes and time whole steps
(data included) after ``--warmup`` steps.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import benchmark_parser, write_result
from data_pipeline.reader import ReadCounts, read_rows
from data_pipeline.registry import DATASETS_FILE_NAME, instructions_for, load_extra_instructions
from debater.core.config import TrainConfig
from debater.core.padding import left_pad, pad_token_id
from debater.core.prompts import TextFormatter
from debater.losses import debater_loss

SEPARATOR = "!@#$%^&*()"  # the original marks the instruction's end inside the query text
CPU_DS_CONFIG = Path(__file__).resolve().parents[2] / "ds_configs" / "zero2_cpu.json"


def subset(data: Path, rows: int, work: Path) -> tuple[Path, list[dict]]:
    """The first ``rows`` valid rows of the folder's first jsonl file, as an echo-data folder both sides read."""
    files = sorted(data.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{data} holds no .jsonl training file")
    options = instructions_for(files[0].stem, load_extra_instructions(data / DATASETS_FILE_NAME))
    taken = []
    for row in read_rows(files[0], ReadCounts()):
        taken.append({"query": row.query, "positive": row.positive, "negative": row.negatives[0],
                      "instruction": options[len(taken) % len(options)]})
        if len(taken) == rows:
            break
    if len(taken) < rows:
        raise ValueError(f"{files[0]} has {len(taken)} usable rows; the benchmark needs {rows}")
    folder = work / "data"
    folder.mkdir()
    lines = (json.dumps({k: r[k] for k in ("query", "positive", "negative")}) for r in taken)
    (folder / files[0].name).write_text("\n".join(lines) + "\n")
    (folder / DATASETS_FILE_NAME).write_text(json.dumps({files[0].stem: options}))
    return folder, taken


class RawTextCollator:
    """The original's collator: raw strings in, padded tensors out, every batch."""

    def __init__(self, tokenizer, settings):
        self.tokenizer = tokenizer
        self.formatter = TextFormatter(tokenizer, settings)
        self.pad_id = pad_token_id(tokenizer)

    def _embedded_lengths(self, marked: list[str]) -> torch.Tensor:
        """The original's extra tokenizer call per text: the length of the part after the instruction
        (its mean-pooling mask; last-token pooling never reads it, the cost stays)."""
        return torch.tensor([len(self.tokenizer(t.split(SEPARATOR)[1], add_special_tokens=False).input_ids)
                             for t in marked])

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        for name in ("query", "positive", "negative"):
            instructions = [r["instruction"] if name == "query" else "" for r in rows]
            marked = [f"{inst}{SEPARATOR}{r[name]}" for inst, r in zip(instructions, rows)]
            batch[f"{name}_embedded_tokens"] = self._embedded_lengths(marked)
            texts = [t.split(SEPARATOR)[1] for t in marked]
            ids = self.formatter.queries(texts, instructions) if name == "query" else self.formatter.documents(texts)
            batch[f"{name}_ids"], batch[f"{name}_mask"] = left_pad(ids, self.pad_id)
        return batch


def run_baseline(config: TrainConfig, rows: list[dict], warmup: int, work: Path) -> float:
    """Tokens/s of a transformers.Trainer with the original's collator and three encoder passes."""
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from debater.model import build_training_encoder

    tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path)
    torch.manual_seed(config.seed)
    encoder = build_training_encoder(config, tokenizer)
    step_tokens: list[float] = []
    step_ends: list[float] = []

    class ThreePassTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            queries = model.encode_queries(inputs["query_ids"], inputs["query_mask"])
            positives = model.encode_documents(inputs["positive_ids"], inputs["positive_mask"])
            negatives = model.encode_documents(inputs["negative_ids"], inputs["negative_mask"])
            labels = torch.arange(queries.shape[0], device=queries.device)
            parts = debater_loss(queries, torch.cat([positives, negatives]), labels, config.loss_variant,
                                 config.scale, config.cod_loss_weight, config.sd_loss_weight)
            step_tokens.append(float(sum(inputs[f"{n}_mask"].sum() for n in ("query", "positive", "negative"))))
            return parts.total

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(work / "baseline"), per_device_train_batch_size=config.per_device_train_batch_size,
        max_steps=config.stop_after_n_steps, learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
        lr_scheduler_type="cosine", max_grad_norm=config.max_grad_norm, optim="adamw_torch", seed=config.seed,
        save_strategy="no", report_to=[], disable_tqdm=True, remove_unused_columns=False,
        dataloader_pin_memory=False, use_cpu=not torch.cuda.is_available())
    collator = RawTextCollator(tokenizer, encoder.settings)
    trainer = ThreePassTrainer(model=encoder, args=args, train_dataset=rows, data_collator=collator,
                               callbacks=[StepClock()])
    trainer.train()
    return sum(step_tokens[warmup:]) / (step_ends[-1] - step_ends[warmup - 1])


def run_ours(config: TrainConfig, warmup: int) -> float:
    """Tokens/s of debater.train over the same steps, from its own per-step TensorBoard speed scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from debater.train import train

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(config, str(CPU_DS_CONFIG))
    events = EventAccumulator(str(Path(config.output_dir) / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    tokens_per_s = {e.step: e.value for e in events.Scalars("speed/tokens_per_s")}
    samples_per_s = {e.step: e.value for e in events.Scalars("speed/samples_per_s")}
    measured = [s for s in sorted(tokens_per_s) if s > warmup]
    seconds = {s: config.per_device_train_batch_size / samples_per_s[s] for s in measured}  # one step per log
    return sum(tokens_per_s[s] * seconds[s] for s in measured) / sum(seconds.values())


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("trainer", __doc__)
    parser.add_argument("--data", type=Path, default=Path("assets/data/debian/echo-data"))
    parser.add_argument("--steps", type=int, default=5, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="steps run first and not measured")
    parser.add_argument("--batch", type=int, default=8, help="queries per step (each with a positive and a negative)")
    parser.add_argument("--max-length", type=int, default=64, help="document tokens (queries: 3/4 of it)")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    total = args.warmup + args.steps
    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    try:
        data, rows = subset(args.data, args.batch * total, work)
        config = TrainConfig(model_name_or_path=args.model, dataset_file_path=str(data), output_dir=str(work / "ours"),
                             per_device_train_batch_size=args.batch, max_seq_length=args.max_length,
                             query_max_length=args.max_length * 3 // 4, stop_after_n_steps=total, warmup_steps=1,
                             logging_steps=1, save_steps=total, torch_dtype="float32", seed=42)
        baseline = run_baseline(config, rows, args.warmup, work)
        ours = run_ours(config, args.warmup)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result({
        "name": "trainer", "ours_tokens_per_s": round(ours, 1), "baseline_tokens_per_s": round(baseline, 1),
        "ratio": round(ours / baseline, 3), "unit": "non-pad tokens processed per second of training steps",
        "ours": "debater.train in this process, world size 1, DeepSpeed ZeRO-2 (ds_configs/zero2_cpu.json), "
                "pre-tokenized rows, positives and negatives in one encoder pass",
        "baseline": "transformers.Trainer, raw texts tokenized by the collator each batch (+1 tokenizer call per "
                    "text for the instruction boundary), three encoder passes in compute_loss",
        "model": args.model, "rows": len(rows), "batch": args.batch, "max_length": args.max_length,
        "warmup_steps": args.warmup, "measured_steps": args.steps, "dtype": "float32",
        "torch_threads": torch.get_num_threads(),
        "summary": f"trainer: ours {ours:.0f} tokens/s vs Trainer baseline {baseline:.0f} tokens/s "
                   f"= {ours / baseline:.2f}x ({args.steps} steps of {args.batch} after {args.warmup} warm-up)",
    }, args.out, args.model)
    return 0

