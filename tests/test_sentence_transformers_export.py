"""The sentence-transformers export embeds as our encoder does (instruction, suffix, step tokens, body-first
truncation, last-step pooling all done by the folder), loads from another directory after moving, and mteb
through it scores what `make eval` scores."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import FIXTURES, fixture_texts

from benchmarks.tiny_model import build_tiny_model
from debater import Retriever
from debater.cli import main
from debater.core.config import TrainConfig
from debater.export import write_merged
from debater.model import build_training_encoder, save_encoder
from debater.st_export import write_sentence_transformers

INSTRUCTION = json.loads((FIXTURES / "echo" / "datasets.json").read_text())["tiny_retrieval"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An adapter (LoRA and trained step rows moved from their start) in the paper's document format with short
    limits, so that many texts are truncated, and its sentence-transformers folder. The tiny vocabulary gets
    digits: sentence-transformers finds a template's fixed tail by rendering the digits "0" and "1 2 3 4"."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("st-export")
    base = build_tiny_model(root / "base", fixture_texts() + ["0 1 2 3 4"])
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    config = TrainConfig(model_name_or_path=str(base), dataset_file_path="unused", output_dir="unused", lora_r=4,
                         lora_alpha=8, lora_dropout=0.0, torch_dtype="float32", max_seq_length=24,
                         query_max_length=12, train_step_rows=True)
    encoder = build_training_encoder(config, tokenizer)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in (p for p in encoder.parameters() if p.requires_grad):
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    adapter = root / "adapter"
    save_encoder(encoder, tokenizer, adapter, str(base), "last_step", instructions={"tiny_retrieval": [INSTRUCTION]})
    write_merged(adapter, "float32")
    write_sentence_transformers(adapter)
    return adapter


def test_sentence_transformers_gives_our_embeddings_from_another_directory_after_moving(exported, tmp_path,
                                                                                       monkeypatch):
    from sentence_transformers import SentenceTransformer

    texts = fixture_texts()
    ours = Retriever.load(exported)
    formatter = ours.text_encoder.formatter
    assert max(map(len, formatter.documents(texts))) == 24 and max(map(len, formatter.queries(texts, [INSTRUCTION]
                                                                                           * len(texts)))) == 12
    shutil.copytree(exported / "sentence-transformers", tmp_path / "moved" / "st")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    model = SentenceTransformer("../moved/st", device="cpu")
    queries, documents = model.encode_query(texts), model.encode_document(texts)
    assert (queries * ours.encode_queries(texts)).sum(1).min() >= 0.9999
    assert (documents * ours.encode_documents(texts)).sum(1).min() >= 0.9999
    # the comparison can fail: another instruction moves every query
    assert (model.encode_query(texts, prompt="Find: ") * queries).sum(1).min() < 0.9999


def test_mteb_through_sentence_transformers_scores_as_our_evaluation(exported, tmp_path):
    from sentence_transformers import SentenceTransformer

    from debater.evaluate import METRICS, _quiet_offline_mteb, build_tasks, evaluate_model
    from debater.mteb_model import score_with_mteb

    _quiet_offline_mteb()
    shutil.copytree(FIXTURES / "beir", tmp_path / "beir")
    (tmp_path / "beir" / "instruction.txt").write_text(INSTRUCTION + "\n")  # the task's is the model's
    tasks, instructions = build_tasks([str(tmp_path / "beir")], None, None)
    ours = evaluate_model(str(exported), tasks, instructions, 8, None)["scores"]
    model = SentenceTransformer(str(exported / "sentence-transformers"), device="cpu")
    theirs = score_with_mteb(model, tasks, 8, METRICS)
    (task,) = ours
    assert theirs[task]["ndcg_at_10"] == pytest.approx(ours[task]["ndcg_at_10"], abs=1e-4)
    assert np.isfinite(ours[task]["ndcg_at_10"]) and 0 < ours[task]["ndcg_at_10"] < 1


def test_our_commands_refuse_the_sentence_transformers_folder_instead_of_mean_pooling_it(exported, tmp_path,
                                                                                        caplog):
    folder = str(exported / "sentence-transformers")
    assert main(["encode", "--model", folder, "--corpus", str(FIXTURES / "beir" / "corpus.jsonl"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "with lasttoken pooling" in caplog.records[-1].getMessage() and not (tmp_path / "o").exists()
