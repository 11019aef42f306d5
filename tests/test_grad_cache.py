"""Gradient caching computes the gradient of the uncached step, exactly (issue 14).

In one process, on the tiny Llama with LoRA: the same batch (6 queries, 2 hard negatives each, so 18
documents) goes through ``TrainingStep`` once without caching and once with chunks that divide neither
side, and the trainable parameters' gradients must agree to fp32 tolerance, for every loss variant, with
LoRA dropout on, trained or frozen step rows and gradient checkpointing. The launched, 2-rank ZeRO-2
comparison is in ``test_grad_cache_launched.py``.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FIXTURES, assert_close_to_scale

from data_pipeline.loader import PreprocessedData, RankLoader
from data_pipeline.stage_tokenize import preprocess
from debater.core.config import TrainConfig
from debater.core.prompts import resolve_step_tokens
from debater.losses import VARIANTS
from debater.model import build_training_encoder
from debater.training_step import TrainingStep, split_side

NEGATIVES, QUERIES = 2, 6
RELATIVE_TOL = 1e-5  # of each tensor's largest entry: fp32 sums in another order differ by ~1e-7 of it


def assert_equal_gradients(got: dict, expected: dict, context: str) -> None:
    assert_close_to_scale(got, expected, RELATIVE_TOL, context)


def two_negative_rows() -> list[dict]:
    """The echo fixture with a second hard negative per row (another row's positive)."""
    rows = [json.loads(line) for line in (FIXTURES / "echo" / "tiny_retrieval.jsonl").read_text().splitlines()]
    return [{**row, "negative": [row["negative"], rows[(i + 5) % len(rows)]["positive"]]}
            for i, row in enumerate(rows)]


def write_two_negative_echo(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny_retrieval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in two_negative_rows()))
    shutil.copy(FIXTURES / "echo" / "datasets.json", folder / "datasets.json")


class PlainEngine:
    """The three things TrainingStep asks of a DeepSpeed engine, done by plain autograd in one process."""

    def __init__(self, module):
        self.module, self.device = module, torch.device("cpu")

    def __call__(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss):
        loss.backward()


def _config(tiny_model, tmp_path, **extra) -> TrainConfig:
    values = dict(model_name_or_path=str(tiny_model), dataset_file_path=str(tmp_path / "echo"),
                  output_dir=str(tmp_path / "out"), lora_r=4, lora_alpha=8, lora_dropout=0.3, torch_dtype="float32",
                  per_device_train_batch_size=QUERIES, negatives_per_query=NEGATIVES, max_seq_length=32, cod_steps=4,
                  seed=11)
    return TrainConfig(**{**values, **extra})


def _preprocessed(config: TrainConfig, tmp_path) -> PreprocessedData:
    """The two-negative echo data, preprocessed for ``config`` (the encoder's tokenizer is left untouched)."""
    write_two_negative_echo(tmp_path / "echo")
    settings = config.encoding_settings()
    resolve_step_tokens(_tokenizer(config.model_name_or_path), settings)
    folder = tmp_path / f"pre-{config.loss_variant}"
    if not folder.exists():
        preprocess(tmp_path / "echo", folder, config.model_name_or_path, settings)
    return PreprocessedData(folder)


def _batch(config: TrainConfig, tmp_path, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """This rank's part of batch 0 of the plan, as the trainer's loader gives it."""
    data = _preprocessed(config, tmp_path)
    plan = data.plan(QUERIES, config.seed, NEGATIVES)
    pad = _tokenizer(config.model_name_or_path).pad_token_id
    return RankLoader(data, plan, rank, world, pad, NEGATIVES).batch(0)


def _gradients(config: TrainConfig, tokenizer, batch, chunk: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(config.seed)  # LoRA's initial A is drawn from the global RNG
    encoder = build_training_encoder(config, tokenizer).train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero, which would leave A without gradient
        for p in encoder.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    step = TrainingStep(PlainEngine(encoder), TrainConfig(**{**config.to_dict(), "grad_cache_chunk_size": chunk}))
    parts = step.forward_backward(batch)
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.requires_grad}
    return {"loss": parts.total.detach(), **grads}


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_gradients_equal_uncached(tiny_model, tmp_path, variant):
    config = _variant_config(tiny_model, tmp_path, variant)
    tokenizer = _tokenizer(tiny_model)
    batch = _batch(config, tmp_path)
    reference = _gradients(config, tokenizer, batch, chunk=0)
    assert all(g.abs().max() > 0 for n, g in reference.items() if n != "loss"), "every trainable must move"
    for chunk in (4, 5):  # 6 queries and 18 documents: neither divides
        assert_equal_gradients(_gradients(config, tokenizer, batch, chunk), reference, f"{variant}, chunk {chunk}")


@pytest.mark.parametrize("extra", [{"train_step_rows": True}, {"gradient_checkpointing": True}],
                         ids=["trained-step-rows", "checkpointing"])
def test_cached_gradients_equal_uncached_with_step_rows_and_checkpointing(tiny_model, tmp_path, extra):
    config = _config(tiny_model, tmp_path, **extra)
    tokenizer = _tokenizer(tiny_model)
    batch = _batch(config, tmp_path)
    reference = _gradients(config, tokenizer, batch, chunk=0)
    if extra.get("train_step_rows"):
        assert any("trainable_tokens" in n and g.abs().max() > 0 for n, g in reference.items())
    assert_equal_gradients(_gradients(config, tokenizer, batch, chunk=5), reference, str(extra))


def test_dropout_changes_the_gradient_so_the_equality_above_can_fail(tiny_model, tmp_path):
    """The comparison is sensitive to the masks: dropout 0.3 against 0 moves the gradient far past the tolerance."""
    tokenizer = _tokenizer(tiny_model)
    config = _config(tiny_model, tmp_path)
    batch = _batch(config, tmp_path)
    with_dropout = _gradients(config, tokenizer, batch, chunk=5)
    without = _gradients(_config(tiny_model, tmp_path, lora_dropout=0.0), tokenizer, batch, chunk=5)
    gap = max(float((with_dropout[n] - g).abs().max() / g.abs().max()) for n, g in without.items() if n != "loss")
    assert gap > 1e-2


def test_chunks_cover_every_row_once_and_cut_only_shared_padding():
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]])
    batch = {"doc_ids": mask * 7, "doc_mask": mask, "doc_keys": torch.arange(5) * 10}
    chunks = split_side(batch, "doc", 2)
    assert [(c.start, c.stop) for c in chunks] == [(0, 2), (2, 4), (4, 5)]
    assert [c.inputs["doc_mask"].shape[1] for c in chunks] == [2, 3, 2]
    assert torch.cat([c.inputs["doc_keys"] for c in chunks]).tolist() == [0, 10, 20, 30, 40]
    for c in chunks:  # no real token is cut
        assert int(c.inputs["doc_mask"].sum()) == int(mask[c.start:c.stop].sum())


def _two_rank_worker(rank: int, tiny_model: str, tmp: str, out: str) -> None:
    """One of 2 gloo ranks: every variant, uncached and cached, gradients averaged over ranks as DeepSpeed does."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    for variant in VARIANTS:
        config = _variant_config(tiny_model, Path(tmp), variant)
        batch = _batch(config, Path(tmp), rank, 2)
        for chunk in (0, 2):  # 3 queries and 9 documents per rank: 2 divides neither
            grads = _gradients(config, _tokenizer(tiny_model), batch, chunk)
            for value in grads.values():
                dist.all_reduce(value)
                value /= 2
            results[f"{variant}/{chunk}"] = grads
    if rank == 0:
        torch.save(results, os.path.join(out, "two_ranks.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # results are on disk; skip the slow teardown of a torch process


def _variant_config(tiny_model, tmp_path, variant: str) -> TrainConfig:
    return _config(tiny_model, tmp_path, loss_variant=variant,
                   pooling_mode="last_token" if variant == "vanilla" else "last_step")


def test_two_ranks_cached_and_uncached_equal_one_process(tiny_model, tmp_path):
    """W=2 with gathered negatives, cached or not, gives the one-process gradient of the global batch, dropout
    on: the masks are keyed by text, so they do not depend on the world size either."""
    for variant in VARIANTS:  # preprocess once, before the ranks read it
        _preprocessed(_variant_config(tiny_model, tmp_path, variant), tmp_path)
    mp.spawn(_two_rank_worker, args=(str(tiny_model), str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    two_ranks = torch.load(tmp_path / "two_ranks.pt")
    for variant in VARIANTS:
        config = _variant_config(tiny_model, tmp_path, variant)
        reference = _gradients(config, _tokenizer(tiny_model), _batch(config, tmp_path), chunk=0)
        for chunk in (0, 2):
            assert_equal_gradients(two_ranks[f"{variant}/{chunk}"], reference, f"W=2 {variant}, chunk {chunk}")


def test_deepspeeds_wall_clock_breakdown_with_gradient_caching_is_refused_in_one_line(tmp_path):
    """The cached gradients reach DeepSpeed through a surrogate that passes through no engine output, so with
    wall_clock_breakdown on its backward timers would be stopped without having started (an AssertionError in
    the first step): the DeepSpeed config is refused before the model loads, with the fix."""
    from debater.core.config import ConfigError
    from debater.train import build_ds_config

    ds = json.loads((FIXTURES.parent.parent / "ds_configs" / "zero2_cpu.json").read_text())
    path = tmp_path / "timed.json"
    path.write_text(json.dumps({**ds, "wall_clock_breakdown": True}))
    config = TrainConfig(model_name_or_path="m", dataset_file_path="d", output_dir="o", grad_cache_chunk_size=4)
    with pytest.raises(ConfigError) as refused:
        build_ds_config(str(path), config, 2)
    message = str(refused.value)
    assert "\n" not in message and "wall_clock_breakdown" in message and "grad_cache_chunk_size 0" in message
    config.grad_cache_chunk_size = 0  # without caching the engine's own hooks time the backward
    assert build_ds_config(str(path), config, 2)["wall_clock_breakdown"] is True
