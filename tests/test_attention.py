"""flash-attn is a GPU extra: asking for it without the package or a GPU falls back to sdpa, saying so once."""
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
