"""The whole spine on CPU: deepspeed launcher, 2 ranks, ZeRO-2, raw echo-data folder
(preprocessed on first use), export, then MTEB evaluation of the exported adapter."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import launch_training, training_env

pytestmark = pytest.mark.launcher

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def trained_run(tiny_model, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("e2e")
    data = work / "echo"
    shutil.copytree(FIXTURES / "echo", data)
    config = {
        "model_name_or_path": str(tiny_model), "dataset_file_path": str(data), "output_dir": str(work / "run"),
        "learning_rate": 1e-3, "warmup_steps": 1, "per_device_train_batch_size": 4, "max_seq_length": 32,
        "stop_after_n_steps": 3, "logging_steps": 1, "save_steps": 2, "lora_r": 4, "cod_steps": 4,
        "torch_dtype": "float32", "seed": 7, "do_train": True,
    }
    done = launch_training(config, work / "config.json", port=29617, launcher="deepspeed")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (work / "launch.log").write_text(done.stdout + done.stderr)
    return work / "run"


def test_training_writes_everything(trained_run):
    assert (trained_run / "adapter" / "debater.json").exists()
    assert (trained_run / "adapter" / "adapter_model.safetensors").exists()
    assert (trained_run / "checkpoints" / "latest").read_text().strip() == "step-3"
    assert json.loads((trained_run / "batch_plan.json").read_text())["global_batch"] == 8
    assert json.loads((trained_run / "train_config.json").read_text())["stop_after_n_steps"] == 3
    manifest = json.loads((trained_run / "preprocessed" / "manifest.json").read_text())
    assert manifest["files"][0]["written"] == 24
    assert list((trained_run / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_has_the_training_signals(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("loss/total", "loss/contrastive", "loss/distillation", "train/learning_rate", "train/grad_norm",
                "train/in_batch_top1", "speed/tokens_per_s", "data/padding_fraction", "memory/peak_mb",
                "diag/doc_view_cosine", "diag/query_view_cosine", "diag/positive_margin", "diag/score_std",
                "diag/lora_b_norm"):
        assert tag in tags
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2, 3]
    assert "train/best_step_for_positive" in events.Tags()["histograms"]


def test_exported_adapter_changes_embeddings_and_evaluates(trained_run, tiny_model, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "debater", "eval", "--model", str(tiny_model), "--model", str(trained_run),
         "--tasks", str(FIXTURES / "beir"), "--out", str(tmp_path)],
        cwd=ROOT, env=training_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    base, trained = results[str(tiny_model)], results[str(trained_run)]
    for entry in (base, trained):
        scores = entry["scores"]["fixtures-beir"]
        assert 0.0 <= scores["ndcg_at_10"] <= 1.0 and scores["recall_at_100"] == 1.0
    assert "| nDCG@10 |" in (tmp_path / "results.md").read_text()


def test_exported_adapter_loads_trained_weights(trained_run, tiny_model):
    import torch
    from transformers import AutoModel

    from debater.model import load_encoder

    encoder, tokenizer, pooling = load_encoder(str(trained_run))
    assert encoder.settings.cod_steps == 4 and encoder.settings.step_tokens == [f"<step_{i}>" for i in range(1, 5)]
    assert pooling == "last_step"
    base = AutoModel.from_pretrained(tiny_model).state_dict()
    merged = encoder.backbone.state_dict()
    name = "layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(base[name], merged[name]), "LoRA update missing from the exported adapter"
    assert merged["embed_tokens.weight"].shape[0] == base["embed_tokens.weight"].shape[0] + 4


def test_a_launched_run_says_each_thing_once(trained_run):
    """Two ranks, one copy of each message: the config's note (its do_train key) and the run's set-up come from rank
    0 alone; DeepSpeed's line about its communication op, printed by every rank on every run, is not shown."""
    log = (trained_run.parent / "launch.log").read_text()
    assert log.count("keys with no effect in this trainer") == 1, log[-3000:]
    assert log.count("trainable parameters") == 1 and log.count("adapter exported") == 1
    assert "built successfully" not in log and "PyTorch extensions root" not in log and "[rank 1]" not in log


def _train_again(trained_run: Path, work: Path, **changes) -> subprocess.CompletedProcess:
    """``python -m debater train`` (no launcher: one process) with the trained run's own config, changed."""
    config = json.loads((trained_run / "train_config.json").read_text())
    config.pop("ignored_keys")
    (work / "again.json").write_text(json.dumps({**config, **changes}))
    return subprocess.run([sys.executable, "-m", "debater", "train", str(work / "again.json"), "--deepspeed",
                           str(ROOT / "ds_configs" / "zero2_cpu.json")], cwd=ROOT, env=training_env(),
                          capture_output=True, text=True, timeout=300)


def _error_line(done: subprocess.CompletedProcess) -> str:
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(errors) == 1, done.stderr[-3000:]
    return errors[0]


def test_training_again_into_the_run_refuses_with_the_choices(trained_run, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file()}
    line = _error_line(_train_again(trained_run, tmp_path, stop_after_n_steps=1))
    assert "already holds a run (checkpoints up to step 3)" in line
    assert all(choice in line for choice in ("resume_from_checkpoint=latest", "new output_dir",
                                             "overwrite_output_dir=true"))
    assert {p: p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file()} == before


def test_resuming_the_finished_run_says_it_is_finished(trained_run, tmp_path):
    # one process at the run's global batch (2 ranks x 4)
    done = _train_again(trained_run, tmp_path, resume_from_checkpoint="latest", per_device_train_batch_size=8)
    assert done.returncode == 0 and "holds a finished run (step 3 of 3" in done.stderr, done.stderr[-3000:]
    assert "trainable parameters" not in done.stderr  # said before anything was loaded


def test_overwrite_removes_the_earlier_run_before_anything_else(trained_run, tmp_path):
    """The run then stops at its plan: asking for 3 negatives per query of data with one each names the key."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    done = _train_again(trained_run, tmp_path, output_dir=str(copy), overwrite_output_dir=True,
                        negatives_per_query=3)
    line = _error_line(done)
    assert "negatives_per_query=3 but no row" in line and "more than 1 hard negative" in line
    assert not any((copy / name).exists() for name in ("checkpoints", "tensorboard", "adapter", "batch_plan.json"))
    assert (copy / "preprocessed" / "manifest.json").exists()  # the cache, keyed by its inputs, stays


def test_a_preprocessed_folder_with_other_settings_names_the_keys(trained_run, tmp_path):
    line = _error_line(_train_again(trained_run, tmp_path, output_dir=str(tmp_path / "run"), max_seq_length=48,
                                    dataset_file_path=str(trained_run / "preprocessed")))
    assert "max_seq_length 32 there, 48 here" in line and "doc_max_length" not in line and "{" not in line


def test_lora_plus_moves_the_b_matrices_at_their_own_learning_rate(trained_run, tmp_path):
    """LoRA+ through ``python -m debater train``: one step of Adam from B = 0 moves each B entry by about the
    learning rate (Adam's first update is +-lr wherever the gradient is not tiny), so the saved B entries sit
    near 16 x learning_rate (plain LoRA would put them near 1 x). The run then resumes from its checkpoint,
    which needs both groups' optimizer state."""
    from safetensors.torch import load_file

    lr = 1e-3
    settings = dict(output_dir=str(tmp_path / "run"), dataset_file_path=str(trained_run / "preprocessed"),
                    per_device_train_batch_size=8, learning_rate=lr, warmup_steps=0, lr_scheduler_type="constant",
                    lora_dropout=0.0, lora_b_lr_ratio=16)
    done = _train_again(trained_run, tmp_path, stop_after_n_steps=1, **settings)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    resumed = _train_again(trained_run, tmp_path, stop_after_n_steps=2, resume_from_checkpoint="latest", **settings)
    assert resumed.returncode == 0 and "at step 1" in resumed.stderr, resumed.stderr[-3000:]  # both groups' state
    b_entries = torch.cat([w.flatten().abs() for name, w in weights.items() if "lora_B" in name])
    moved = b_entries[b_entries > 0]
    assert len(moved) > 0.9 * len(b_entries)
    assert 0.9 * 16 * lr < float(moved.median()) <= 16 * lr * 1.001, float(moved.median())


def test_start_boost_raises_the_first_steps_learning_rate_then_fades(trained_run, tmp_path):
    """``lr_start_boost`` through ``python -m debater train``: the learning rates the run logs are the constant
    rate times 1 + (boost - 1) x the cosine fade over ``lr_start_boost_steps``, then the plain rate."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lr, boost, fade = 1e-3, 10.0, 2
    done = _train_again(trained_run, tmp_path, output_dir=str(tmp_path / "run"), stop_after_n_steps=3,
                        dataset_file_path=str(trained_run / "preprocessed"), per_device_train_batch_size=8,
                        learning_rate=lr, warmup_steps=0, lr_scheduler_type="constant", logging_steps=1,
                        lr_start_boost=boost, lr_start_boost_steps=fade)
    assert done.returncode == 0, done.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    logged = [e.value for e in events.Scalars("train/learning_rate")]
    expected = [lr * (1 + (boost - 1) * 0.5 * (1 + math.cos(math.pi * min(step, fade) / fade))) for step in range(3)]
    assert logged == pytest.approx(expected, rel=1e-5), logged
