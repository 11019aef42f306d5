"""The training configuration (debater.core.config): the seed README config keeps working; mistakes are clear errors."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from debater.core.config import (IGNORED_SEED_KEYS, KEY_TABLE_END, KEY_TABLE_START, ConfigError, TrainConfig,
                                 config_from_dict, config_reference, config_reference_markdown, load_config)
from debater.core.prompts import DEFAULT_PROMPT, EncodingSettings

# The training config of the original DEBATER README (paths replaced).
SEED_CONFIG = {
    "model_name_or_path": "openbmb/MiniCPM-2B-dpo-bf16",
    "peft_model_name_or_path": None,
    "pooling_mode": "last_token",
    "dataset_name": "E5",
    "dataset_file_path": "/data/echo-data",
    "remove_unused_columns": False,
    "learning_rate": 2e-4,
    "num_train_epochs": 1,
    "warmup_steps": 300,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 64,
    "gradient_accumulation_steps": 1,
    "do_train": True,
    "disable_tqdm": False,
    "max_seq_length": 512,
    "overwrite_output_dir": True,
    "output_dir": "/runs/debater",
    "logging_steps": 50,
    "save_steps": 200,
    "save_only_model": True,
    "stop_after_n_steps": 1000,
    "lora_r": 16,
    "gradient_checkpointing": True,
    "torch_dtype": "bfloat16",
    "attn_implementation": "flash_attention_2",
    "seed": 42,
}


def write(tmp_path, content, name="train.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    return path


def test_seed_readme_config_loads(tmp_path):
    config = load_config(write(tmp_path, SEED_CONFIG))
    assert isinstance(config, TrainConfig)
    assert config.model_name_or_path == "openbmb/MiniCPM-2B-dpo-bf16"
    assert config.peft_model_name_or_path is None
    assert config.dataset_file_path == "/data/echo-data"
    assert config.output_dir == "/runs/debater"
    assert config.learning_rate == pytest.approx(2e-4) and isinstance(config.learning_rate, float)
    assert config.warmup_steps == 300
    assert config.per_device_train_batch_size == 64
    assert config.gradient_accumulation_steps == 1
    assert config.max_seq_length == 512
    assert config.logging_steps == 50 and config.save_steps == 200
    assert config.stop_after_n_steps == 1000
    assert config.lora_r == 16
    assert config.gradient_checkpointing is True
    assert config.torch_dtype == "bfloat16"
    assert config.attn_implementation == "flash_attention_2"
    assert config.seed == 42
    # the seed's "last_token" pooling means the last (step) token of the full DEBATER model
    assert config.loss_variant == "full" and config.pooling_mode == "last_step"
    # HF-Trainer-only keys, and dataset_name (E5 is the only format), are accepted and recorded as ignored
    assert set(config.ignored_keys) == {"remove_unused_columns", "num_train_epochs", "per_device_eval_batch_size",
                                        "do_train", "disable_tqdm", "save_only_model", "dataset_name"}
    # overwrite_output_dir means what the HF Trainer meant: an earlier run in output_dir is replaced
    assert config.overwrite_output_dir is True
    assert set(config.ignored_keys) <= IGNORED_SEED_KEYS
    json.dumps(config.to_dict())  # round-trips to JSON


def test_seed_config_settings(tmp_path):
    settings = load_config(write(tmp_path, SEED_CONFIG)).encoding_settings()
    assert isinstance(settings, EncodingSettings)
    assert settings.doc_mode == "step_tokens"
    assert settings.doc_max_length == 512 and settings.query_max_length == 512
    assert settings.cod_steps == 8 and settings.deliberation_prompt == DEFAULT_PROMPT
    assert settings.step_tokens == []


def test_vanilla_keeps_last_token_pooling():
    config = config_from_dict({**SEED_CONFIG, "loss_variant": "vanilla"})
    assert config.pooling_mode == "last_token"


def test_overrides_win(tmp_path):
    config = load_config(write(tmp_path, SEED_CONFIG), {"model_name_or_path": "local/model", "lora_r": 8})
    assert config.model_name_or_path == "local/model" and config.lora_r == 8


@pytest.mark.parametrize("key, closest", [
    ("learnig_rate", "learning_rate"),
    ("lora_rank", "lora_r"),
    ("pooling", "pooling_mode"),
    ("warmup", "warmup_steps"),
    ("num_train_epoch", "num_train_epochs"),
])
def test_unknown_key_names_it_and_the_closest_valid_key(tmp_path, key, closest):
    path = write(tmp_path, {**SEED_CONFIG, key: 1})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"'{key}'" in message
    assert f"'{closest}'" in message
    assert str(path) in message


def test_unknown_key_without_a_close_match(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'zzzzqqqq'") as info:
        load_config(write(tmp_path, {**SEED_CONFIG, "zzzzqqqq": 1}))
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("key, value", [
    ("learning_rate", "2e-4"),
    ("learning_rate", True),
    ("warmup_steps", 1.5),
    ("warmup_steps", "300"),
    ("per_device_train_batch_size", True),
    ("max_seq_length", 512.0),
    ("gradient_checkpointing", "true"),
    ("gradient_checkpointing", 1),
    ("model_name_or_path", None),
    ("model_name_or_path", 5),
    ("output_dir", ["a"]),
    ("stop_after_n_steps", "1000"),
    ("lora_target_modules", "q_proj"),
    ("step_tokens", "<step>"),
    ("seed", None),
])
def test_wrong_types_raise_naming_the_key(tmp_path, key, value):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {**SEED_CONFIG, key: value}))
    assert f"'{key}'" in str(info.value)


@pytest.mark.parametrize("key, value", [
    ("lora_target_modules", ["q_proj", 3]),
    ("step_tokens", [1, 2, 3, 4, 5, 6, 7, 8]),
])
def test_list_items_must_be_strings(tmp_path, key, value):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {**SEED_CONFIG, key: value}))
    assert f"'{key}'" in str(info.value)


def test_accepted_types():
    config = config_from_dict({**SEED_CONFIG, "learning_rate": 1, "stop_after_n_steps": None,
                               "lora_target_modules": ["q_proj", "v_proj"], "query_max_length": 128})
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.stop_after_n_steps is None
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    assert config.encoding_settings().query_max_length == 128


@pytest.mark.parametrize("key, value, fragment", [
    ("gradient_accumulation_steps", 2, "gradient_accumulation_steps"),
    ("loss_variant", "bogus", "loss_variant"),
    ("pooling_mode", "mean", "pooling_mode"),
    ("torch_dtype", "int8", "torch_dtype"),
    ("lr_scheduler_type", "step", "lr_scheduler_type"),
    ("lr_start_boost", 0, "lr_start_boost"),
    ("lr_start_boost", 10, "lr_start_boost_steps >= 1"),
    ("per_device_train_batch_size", 0, "per_device_train_batch_size"),
    ("max_seq_length", -1, "max_seq_length"),
    ("negatives_per_query", 0, "negatives_per_query"),
])
def test_invalid_values_raise_with_the_source(tmp_path, key, value, fragment):
    path = write(tmp_path, {**SEED_CONFIG, key: value})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_missing_required_keys(tmp_path):
    raw = {k: v for k, v in SEED_CONFIG.items() if k not in ("dataset_file_path", "output_dir")}
    with pytest.raises(ConfigError, match="missing required key") as info:
        load_config(write(tmp_path, raw))
    assert "dataset_file_path" in str(info.value) and "output_dir" in str(info.value)


def test_invalid_json_names_the_line(tmp_path):
    path = write(tmp_path, '{\n  "model_name_or_path": "m",\n  "output_dir": "o"\n  "seed": 1\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:4" in str(info.value)
    assert "not valid JSON" in str(info.value)


def test_not_an_object_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_config(write(tmp_path, "[1, 2]"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.json")


@pytest.mark.parametrize("variant, doc_mode, views", [
    ("vanilla", "last_token", 1),
    ("sd_only", "last_k_tokens", 4),
    ("cod_only", "step_tokens", 4),
    ("full", "step_tokens", 4),
])
def test_encoding_settings_maps_loss_variant_to_doc_mode(variant, doc_mode, views):
    config = config_from_dict({**SEED_CONFIG, "loss_variant": variant, "cod_steps": 4, "max_seq_length": 64,
                               "step_tokens": ["<a>", "<b>", "<c>", "<d>"], "deliberation_prompt": "Think {k}:"})
    settings = config.encoding_settings()
    assert settings.doc_mode == doc_mode
    assert settings.num_views == views
    assert settings.cod_steps == 4
    assert settings.doc_max_length == 64 and settings.query_max_length == 64
    assert settings.step_tokens == ["<a>", "<b>", "<c>", "<d>"]
    assert settings.step_tokens is not config.step_tokens  # a copy: resolving tokens must not edit the config
    assert settings.prompt_text() == "Think four:"


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "launch" / "configs").glob("*.json")),
                         ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.gradient_accumulation_steps == 1 and config.grad_cache_chunk_size >= 0


def test_gradient_cache_chunk_is_a_count_of_texts():
    assert config_from_dict({**SEED_CONFIG, "grad_cache_chunk_size": 16}).grad_cache_chunk_size == 16
    with pytest.raises(ConfigError, match="grad_cache_chunk_size must be >= 0"):
        config_from_dict({**SEED_CONFIG, "grad_cache_chunk_size": -1})


def test_every_key_has_help_and_the_documented_table_is_generated_from_it():
    reference = config_reference()
    assert {name for name, *_ in reference} == {f.name for f in dataclasses.fields(TrainConfig)} - {"ignored_keys"}
    assert all(text for *_, text in reference)
    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    start, end = page.index(KEY_TABLE_START) + len(KEY_TABLE_START), page.index(KEY_TABLE_END)
    assert page[start:end].strip() == config_reference_markdown().strip(), \
        "docs/configuration.md's key table is stale: paste `python -m debater train --help-config --markdown` there"


def test_help_config_lists_every_key_with_its_default(capsys):
    from debater.cli import main

    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    for name, kind, default, _ in config_reference():
        assert name in out and default in out


@pytest.mark.parametrize("key, value", [("lora_target_modules", ["q_proj", 3]), ("seed", 1.5), ("seed", True),
                                        ("learning_rate", "high"), ("gradient_checkpointing", 1)])
def test_types_are_checked_from_the_annotations(key, value):
    with pytest.raises(ConfigError, match=f"key '{key}' should be"):
        config_from_dict({**SEED_CONFIG, key: value})
