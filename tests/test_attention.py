"""flash-attn is a GPU extra: asking for it without the package or a GPU falls back to sdpa, saying so once.
Training on CUDA turns off SDPA's cuDNN backend (NaN gradients measured on an H100); on CPU nothing changes."""
from __future__ import annotations

import logging

import torch

from debater import model


def test_flash_attention_falls_back_to_sdpa_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="debater.model"):
        assert model.choose_attention("flash_attention_2") == "sdpa"
    assert len(caplog.records) == 1 and "using sdpa" in caplog.records[0].getMessage()


def test_other_attention_choices_are_kept(caplog):
    with caplog.at_level(logging.WARNING, logger="debater.model"):
        assert model.choose_attention("sdpa") == "sdpa"
        assert model.choose_attention("eager") == "eager"
    assert not caplog.records


def test_training_on_cuda_turns_off_cudnn_attention(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model.avoid_cudnn_attention_backward()
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model.avoid_cudnn_attention_backward()
    assert calls == [False]


def test_cli_help_lists_the_jobs(capsys):
    from data_pipeline.cli import main as pipeline_main
    from debater.cli import main as debater_main

    for main, jobs in ((debater_main, ("train", "eval", "convert-model")),
                       (pipeline_main, ("preprocess", "build-debian"))):
        try:
            main(["--help"])
        except SystemExit as done:
            assert done.code == 0
        text = capsys.readouterr().out
        assert all(job in text for job in jobs)


def _broken_flash_attn(site) -> None:
    """flash-attn as pip leaves it when its build does not fit this torch: metadata that says 2.8.3 (all that
    transformers' own check reads) and a package whose compiled part cannot load."""
    (site / "flash_attn").mkdir()
    (site / "flash_attn" / "__init__.py").write_text(
        'raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")\n')
    info = site / "flash_attn-2.8.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flash_attn\nVersion: 2.8.3\n")
    (info / "top_level.txt").write_text("flash_attn\n")


def test_a_broken_flash_attn_falls_back_to_sdpa_naming_the_cause(tmp_path, monkeypatch, caplog):
    from transformers.utils import import_utils

    _broken_flash_attn(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cached = (import_utils.is_flash_attn_2_available, import_utils.is_torch_cuda_available,
              import_utils._package_distribution_mapping)
    for function in cached:
        function.cache_clear()
    try:
        assert import_utils.is_flash_attn_2_available()  # transformers' check passes a build that cannot load
        with caplog.at_level(logging.WARNING, logger="debater.model"):
            assert model.choose_attention("flash_attention_2") == "sdpa"
    finally:
        for function in cached:
            function.cache_clear()
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "does not import (ImportError: flash_attn_2_cuda.so: undefined symbol" in message and "using sdpa" in message
