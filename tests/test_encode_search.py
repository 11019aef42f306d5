"""encode / search: multi-device encoding equals one device, both storage formats hold the same
vectors, faiss search ranks as brute force does (max-sim for multi-view), and bad inputs fail in one line."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import FIXTURES

from debater.beir import read_texts
from debater.cli import main
from debater.encode_command import encode_corpus, load_embeddings, save_embeddings
from debater.inference_encoder import TextEncoder
from debater.model import load_encoder
from debater.search import INDEX_FILE, Index

CORPUS = FIXTURES / "beir" / "corpus.jsonl"
QUERIES = FIXTURES / "beir" / "queries.jsonl"


@pytest.fixture(scope="module")
def encoded(tiny_model, tmp_path_factory):
    """The fixture corpus encoded by the tiny model in both formats."""
    folder = tmp_path_factory.mktemp("encoded")
    for fmt in ("npy", "arrow"):
        encode_corpus(str(tiny_model), CORPUS, folder / fmt, fmt, batch_size=5)
    return folder


def test_several_devices_give_the_same_embeddings_as_one(tiny_model):
    _, texts = read_texts(CORPUS)
    encoder, tokenizer, pooling = load_encoder(str(tiny_model))
    one = TextEncoder(encoder, tokenizer, pooling, batch_size=3)
    two = TextEncoder(encoder, tokenizer, pooling, batch_size=3, devices=["cpu", "cpu"])
    assert len(two.replicas) == 2 and two.replicas[0] is not two.replicas[1]
    assert np.array_equal(one.document_views(texts), two.document_views(texts))
    assert np.array_equal(one.queries(texts, "Find:"), two.queries(texts, "Find:"))
    assert one.document_views(texts).shape == (len(texts), encoder.settings.num_views, 32)


def test_documents_keep_only_the_pooled_view_unless_the_views_are_remembered(tiny_model):
    _, texts = read_texts(CORPUS)
    encoder, tokenizer, pooling = load_encoder(str(tiny_model))
    plain = TextEncoder(encoder, tokenizer, pooling, batch_size=3)
    views = plain.document_views(texts)
    assert views.shape[1] > 1 and np.array_equal(plain.documents(texts), views[:, -1])
    # a row of its own per document, not a strided window on all K views that would keep them alive
    assert plain.documents(texts).strides[0] == views.shape[-1] * views.itemsize
    remembering = TextEncoder(encoder, tokenizer, pooling, batch_size=3, remember=True)
    assert np.array_equal(remembering.documents(texts), views[:, -1])
    assert remembering.document_views(texts).shape == views.shape  # recalled for the per-step analysis


def test_npy_and_arrow_hold_the_same_vectors_and_ids(encoded):
    ids_npy, vectors_npy, meta_npy = load_embeddings(encoded / "npy")
    ids_arrow, vectors_arrow, meta_arrow = load_embeddings(encoded / "arrow")
    assert ids_npy == ids_arrow == read_texts(CORPUS)[0]
    assert vectors_npy.shape == (24, 32) and np.array_equal(vectors_npy, vectors_arrow)
    assert np.allclose(np.linalg.norm(vectors_npy, axis=1), 1.0, atol=1e-5)
    assert (meta_npy["format"], meta_arrow["format"]) == ("npy", "arrow")


@pytest.mark.parametrize("fmt", ["npy", "arrow"])
def test_each_document_is_its_own_top_hit_and_the_index_is_cached(encoded, fmt):
    folder = encoded / fmt
    ids, vectors, _ = load_embeddings(folder)
    hits = Index(folder).search(np.asarray(vectors), top_k=3)
    assert [found[0][0] for found in hits] == ids
    assert all(found[0][1] == pytest.approx(1.0, abs=1e-5) and len(found) == 3 for found in hits)
    built = (folder / INDEX_FILE).stat().st_mtime_ns
    assert Index(folder).search(np.asarray(vectors), top_k=3) == hits
    assert (folder / INDEX_FILE).stat().st_mtime_ns == built, "the cached index was rebuilt"


def test_multi_view_documents_score_by_their_best_view(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((30, 4, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    ids = [f"doc{i}" for i in range(30)]
    save_embeddings(tmp_path, ids, vectors, "npy", {"model": "random"})
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    hits = Index(tmp_path).search(queries, top_k=7)
    best = np.einsum("qd,nvd->qnv", queries, vectors).max(axis=2)
    for query_hits, query_best in zip(hits, best):
        expected = np.argsort(-query_best, kind="stable")[:7]
        assert [d for d, _ in query_hits] == [ids[i] for i in expected]
        assert [s for _, s in query_hits] == pytest.approx(query_best[expected].tolist(), abs=1e-5)


def test_cli_encodes_and_searches_as_brute_force_ranks(tiny_model, tmp_path):
    index_dir, out = tmp_path / "index", tmp_path / "hits.jsonl"
    assert main(["encode", "--model", str(tiny_model), "--corpus", str(CORPUS), "--out", str(index_dir)]) == 0
    assert main(["search", "--model", str(tiny_model), "--index", str(index_dir), "--queries", str(QUERIES),
                 "--instruction", "Find it:", "--top-k", "5", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    query_ids, query_texts = read_texts(QUERIES)
    assert [r["query_id"] for r in rows] == query_ids and all(len(r["hits"]) == 5 for r in rows)
    encoder, tokenizer, pooling = load_encoder(str(tiny_model))
    queries = TextEncoder(encoder, tokenizer, pooling).queries(query_texts, "Find it:")
    doc_ids, docs, _ = load_embeddings(index_dir)
    for row, scores in zip(rows, queries @ np.asarray(docs).T):
        assert [h["id"] for h in row["hits"]] == [doc_ids[i] for i in np.argsort(-scores, kind="stable")[:5]]


@pytest.mark.parametrize("problem, expected", [
    ("missing", "does not exist"), ("empty", "holds no texts"), ("no_meta", "holds no meta.json"),
    ("dimension", "dimension 32 but the index"), ("model", "no-model does not exist"),
])
def test_bad_inputs_fail_with_one_line(tiny_model, tmp_path, caplog, problem, expected):
    corpus, index_dir, model = tmp_path / "corpus.jsonl", tmp_path / "index", str(tiny_model)
    if problem == "empty":
        corpus.write_text("\n")
    elif problem == "model":
        corpus.write_text(CORPUS.read_text())
        model = str(tmp_path / "no-model")
    elif problem == "dimension":
        save_embeddings(index_dir, ["a", "b"], np.eye(2, 8, dtype=np.float32), "npy", {"model": model})
    if problem in ("missing", "empty", "model"):
        argv = ["encode", "--corpus", str(corpus), "--out", str(index_dir)]
    else:
        argv = ["search", "--index", str(index_dir), "--query", "a web browser"]
    with caplog.at_level(logging.ERROR, logger="debater"):
        assert main([*argv, "--model", model]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and expected in errors[0] and "\n" not in errors[0]
