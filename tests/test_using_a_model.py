"""A trained model is a folder that works anywhere (invariant 11): it loads from another working directory and
after moving, a lost base model is a one-line error with the fix, the Python API gives the command line's
embeddings, and the instruction the model was trained with is the default of search and of the API."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FIXTURES, ROOT, training_env

from debater import Retriever
from debater.beir import DEFAULT_INSTRUCTION, read_texts
from debater.cli import main
from debater.core.config import TrainConfig
from debater.encode_command import load_embeddings
from debater.model import build_training_encoder, save_encoder

CORPUS = FIXTURES / "beir" / "corpus.jsonl"
TRAINED_INSTRUCTION = json.loads((FIXTURES / "echo" / "datasets.json").read_text())["tiny_retrieval"]
QUERIES = ["small web browser engine", "small python library for plotting", "tool"]


@pytest.fixture(scope="module")
def layout(tiny_model, tmp_path_factory):
    """``root/models/base`` (a copy of the tiny model) and ``root/runs/x/adapter`` (its adapter, LoRA and step
    rows moved away from their start so that a wrong base model shows), saved from inside ``root``."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(tiny_model, root / "models" / "base")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    config = TrainConfig(model_name_or_path="models/base", dataset_file_path="unused", output_dir="unused", lora_r=4,
                         lora_alpha=8, lora_dropout=0.0, torch_dtype="float32", train_step_rows=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the base model is named relative to the working directory, as `make train` does
        encoder = build_training_encoder(config, tokenizer)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in (p for p in encoder.parameters() if p.requires_grad):
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
        save_encoder(encoder, tokenizer, root / "runs" / "x" / "adapter", config.model_name_or_path, "last_step",
                     instructions={"tiny_retrieval": [TRAINED_INSTRUCTION]})
    return root


@pytest.fixture(scope="module")
def reference(layout):
    """The adapter's embeddings, loaded where it was saved."""
    _, texts = read_texts(CORPUS)
    retriever = Retriever.load(layout / "runs" / "x")
    return retriever.encode_queries(QUERIES), retriever.encode_documents(texts)


def test_the_api_and_the_cli_load_a_moved_model_from_another_directory_with_the_same_embeddings(
        layout, reference, tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(layout / "runs" / "x" / "adapter", moved)  # the base model stays where it was
    _, texts = read_texts(CORPUS)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["encode", "--model", "../elsewhere/model", "--corpus", str(CORPUS), "--out", "encoded"]) == 0
    ids, cli_vectors, _ = load_embeddings(tmp_path / "elsewhere" / "encoded")
    api = Retriever.load(moved)
    assert ids == read_texts(CORPUS)[0]
    assert np.array_equal(api.encode_documents(texts), cli_vectors)
    np.testing.assert_allclose(cli_vectors, reference[1], rtol=0, atol=1e-6)


def test_a_checkout_moved_whole_finds_its_base_model_relative_to_the_adapter(layout, reference, tmp_path,
                                                                             monkeypatch, caplog):
    moved_root = tmp_path / "moved-checkout"
    shutil.copytree(layout, moved_root)
    shutil.move(layout / "models", tmp_path / "models-gone")  # the recorded absolute path no longer exists
    try:
        monkeypatch.chdir(tmp_path)
        queries, _ = reference
        np.testing.assert_allclose(Retriever.load(moved_root / "runs" / "x").encode_queries(QUERIES), queries,
                                   rtol=0, atol=1e-6)
        # alone, the adapter has lost its base model: one line naming the places tried and the fix
        alone = tmp_path / "alone"
        shutil.copytree(moved_root / "runs" / "x" / "adapter", alone)
        assert main(["encode", "--model", str(alone), "--corpus", str(CORPUS), "--out", str(tmp_path / "o")]) == 2
        message = caplog.records[-1].getMessage()
        assert "base model" in message and str(layout / "models" / "base") in message
        assert "--base-model" in message and "debater.json" in message and "\n" not in message
        assert main(["encode", "--model", str(alone), "--corpus", str(CORPUS), "--out", str(tmp_path / "o"),
                     "--base-model", str(moved_root / "models" / "base")]) == 0
        np.testing.assert_allclose(load_embeddings(tmp_path / "o")[1], reference[1], rtol=0, atol=1e-6)
    finally:
        shutil.move(tmp_path / "models-gone", layout / "models")


def test_search_uses_the_models_instruction_by_default(layout, tmp_path, capsys):
    model = str(layout / "runs" / "x")
    assert main(["encode", "--model", model, "--corpus", str(CORPUS), "--out", str(tmp_path / "index")]) == 0
    capsys.readouterr()

    def search(*instruction: str) -> list[list]:
        query_args = [arg for query in QUERIES for arg in ("--query", query)]
        assert main(["search", "--model", model, "--index", str(tmp_path / "index"), *query_args, *instruction]) == 0
        return [[(hit["id"], hit["score"]) for hit in json.loads(line)["hits"]]
                for line in capsys.readouterr().out.splitlines()]

    by_default = search()
    assert by_default == search("--instruction", TRAINED_INSTRUCTION)
    assert by_default != search("--instruction", DEFAULT_INSTRUCTION)  # so the default was not the generic one
    retriever = Retriever.load(model)
    assert retriever.default_instruction == TRAINED_INSTRUCTION
    assert np.array_equal(retriever.encode_queries(QUERIES), retriever.encode_queries(QUERIES, TRAINED_INSTRUCTION))


def test_api_search_over_texts_ranks_as_the_index_of_their_embeddings(layout):
    retriever = Retriever.load(layout / "runs" / "x")
    _, texts = read_texts(CORPUS)
    hits = retriever.search(QUERIES, texts, top_k=3)
    scores = retriever.encode_queries(QUERIES) @ retriever.encode_documents(texts).T
    for query_hits, query_scores in zip(hits, scores):
        expected = np.argsort(-query_scores, kind="stable")[:3]
        assert [d for d, _ in query_hits] == expected.tolist()
        assert [s for _, s in query_hits] == pytest.approx(query_scores[expected].tolist(), abs=1e-5)
    views = retriever.encode_documents(texts[:2], all_views=True)
    assert views.shape[:2] == (2, 8) and np.allclose(views[:, -1], retriever.encode_documents(texts[:2]), atol=1e-6)


@pytest.mark.parametrize("model, expected", [
    ("runs/nope", "model folder runs/nope does not exist"),
    ("./nope", "model folder ./nope does not exist"),
])
def test_a_model_path_that_does_not_exist_says_so(model, expected, tmp_path, monkeypatch, caplog):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["encode", "--model", model, "--corpus", str(CORPUS), "--out", "o"]) == 2
    message = caplog.records[-1].getMessage()
    assert expected in message and "Repo id" not in message and "\n" not in message


def test_make_export_of_a_folder_that_does_not_exist_says_so():
    done = subprocess.run(["make", "-s", "export", "CKPT=runs/nope-24", "OUT=runs/nope-24-out",
                           f"VENV={sys.prefix}"], cwd=ROOT, env=training_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "checkpoint folder runs/nope-24 does not exist" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_the_instructions_a_run_records_come_from_the_preprocessed_data(tiny_model, tmp_path):
    from data_pipeline.loader import PreprocessedData
    from data_pipeline.stage_tokenize import MANIFEST_NAME, preprocess
    from debater.core.prompts import EncodingSettings

    shutil.copytree(FIXTURES / "echo", tmp_path / "echo")
    preprocess(tmp_path / "echo", tmp_path / "out", str(tiny_model), EncodingSettings(doc_max_length=32), workers=1)
    assert PreprocessedData(tmp_path / "out").instructions() == {"tiny_retrieval": [TRAINED_INSTRUCTION]}
    # a folder preprocessed before manifests held them: the registry of its source folder, while it is there
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    del manifest["instructions"]
    (tmp_path / "out" / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert PreprocessedData(tmp_path / "out").instructions() == {"tiny_retrieval": [TRAINED_INSTRUCTION]}
    shutil.rmtree(tmp_path / "echo")
    assert PreprocessedData(tmp_path / "out").instructions() == {}
