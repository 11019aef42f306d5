"""``python -m debater mine``: the filters against a brute-force loop over the whole score matrix, the
exclusions, the shortfall policies and the manifest's arithmetic through the command, bad input, an
interrupted run, and the mined folder preprocessed by the command users run."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from debater.cli import main as debater_main
from debater.mine_command import mine
from debater.mining import MiningSettings, normalise_text, search_in_chunks, select
from debater.search import Index

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "echo"
INSTRUCTION = "Given a query, retrieve the matching document:"


# ---------------------------------------------------------------- the reference: a plain loop over every score
def reference(score_matrix: np.ndarray, own: list[set[int]], positive_scores: list[float], s: MiningSettings):
    """Per query (chosen documents, drops by filter), from the full [queries, pool] score matrix."""
    out = []
    for q, row in enumerate(score_matrix):
        ranked = sorted((d for d in range(len(row)) if d not in own[q]), key=lambda d: -row[d])
        survivors, drops = [], {}
        for rank, d in enumerate(ranked[:s.rank_window[1]], start=1):
            p, score = positive_scores[q], row[d]
            reason = ("rank_window" if rank < s.rank_window[0]
                      else "max_score" if s.max_score is not None and score > s.max_score
                      else "absolute_margin" if s.absolute_margin is not None and score > p - s.absolute_margin
                      else "relative_margin" if s.relative_margin is not None and score > s.relative_margin * p
                      else None)
            if reason:
                drops[reason] = drops.get(reason, 0) + 1
            else:
                survivors.append(d)
        out.append((survivors[:s.k], survivors, drops))
    return out


def full_scores(queries: np.ndarray, documents: np.ndarray) -> np.ndarray:
    """Every query against every document, one dot product at a time (best view of a multi-view document)."""
    matrix = np.zeros((len(queries), len(documents)))
    for q in range(len(queries)):
        for d in range(len(documents)):
            views = documents[d] if documents.ndim == 3 else documents[d][None]
            matrix[q, d] = max(float(np.dot(queries[q], view)) for view in views)
    return matrix


def unit(rng, *shape):
    vectors = rng.standard_normal(shape).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


FILTER_CASES = {
    "relative_margin": MiningSettings(k=5, relative_margin=0.95),
    "absolute_margin": MiningSettings(k=5, relative_margin=None, absolute_margin=0.05),
    "max_score": MiningSettings(k=5, relative_margin=None, max_score=0.3),
    "rank_window": MiningSettings(k=5, relative_margin=None, rank_window=(4, 12)),
    "all": MiningSettings(k=5, relative_margin=0.5, absolute_margin=0.3, max_score=0.75, rank_window=(2, 20)),
}


@pytest.mark.parametrize("views", [1, 3])
@pytest.mark.parametrize("case", FILTER_CASES)
def test_each_filter_matches_brute_force(case, views):
    rng = np.random.default_rng(len(case) + views)
    queries = unit(rng, 40, 8)
    documents = unit(rng, 90, views, 8) if views > 1 else unit(rng, 90, 8)
    positives = rng.integers(0, 90, size=40)
    # a query's positive sits near it, so the margins have something to bite on
    documents[positives] = documents[positives] * 0.3 + 0.7 * (queries[:, None] if views > 1 else queries)
    documents /= np.linalg.norm(documents, axis=-1, keepdims=True)
    own = [{int(p), int((p + 1) % 90)} for p in positives]  # two own positives each
    matrix = full_scores(queries, documents)
    positive_scores = [float(matrix[q, p]) for q, p in enumerate(positives)]
    settings = FILTER_CASES[case]
    expected = reference(matrix, own, positive_scores, settings)

    index = Index.in_memory(list(range(90)), documents, "test")
    depth = settings.rank_window[1] + 2
    dropped = {}
    for q, hits in search_in_chunks(index, queries, depth, chunk=7, desc="test"):  # chunks cut the queries
        chosen = select(hits, own[q], positive_scores[q], settings, np.random.default_rng(0))
        assert [d for d, _, _ in chosen.chosen] == expected[q][0], f"query {q}"
        assert dict(chosen.drops) == expected[q][2], f"query {q}"
        for reason, n in chosen.drops.items():
            dropped[reason] = dropped.get(reason, 0) + n
    wanted = set(FILTER_CASES) - {"all"} if case == "all" else {case}
    assert wanted <= {reason for reason, n in dropped.items() if n}, dropped  # the filter did drop candidates


def test_in_memory_index_searches_the_vectors_in_place():
    """Mining holds the pool once: the index reads the caller's array (the brute-force tests above check what
    it finds)."""
    documents = unit(np.random.default_rng(3), 30, 2, 8)
    assert np.shares_memory(Index.in_memory(list(range(30)), documents, "test").vectors, documents)


class FakeQueryEncoder:
    """Query vectors that name their (instruction, text); records every call."""

    def __init__(self):
        self.calls = []

    def queries(self, texts, instruction):
        self.calls.append((instruction, list(texts)))
        self.last = np.array([[sum(map(ord, instruction + text)), len(text)] for text in texts], dtype=np.float32)
        return self.last


def test_query_vectors_encode_each_pair_once_and_follow_the_rows():
    from collections import namedtuple

    from debater.mine_command import _query_vectors

    Row = namedtuple("Row", "line query")
    rows = [Row(line, query) for line, query in enumerate(["a", "b", "a", "c", "a", "b"], start=1)]
    encoder = FakeQueryEncoder()
    vectors = _query_vectors(rows, ["odd:", "even:"], encoder)  # line 1 -> "odd:", line 2 -> "even:", ...
    naive = [FakeQueryEncoder().queries([row.query], ["odd:", "even:"][(row.line - 1) % 2])[0] for row in rows]
    assert np.array_equal(vectors, np.stack(naive))
    assert sorted(encoder.calls) == [("even:", ["b", "c"]), ("odd:", ["a"])]  # rows 1/3/5 ask "a" once
    distinct = [Row(line, query) for line, query in enumerate(["x", "y", "z"], start=1)]
    encoder = FakeQueryEncoder()
    vectors = _query_vectors(distinct, ["one:"], encoder)  # the usual file: the encoded array itself
    assert encoder.calls == [("one:", ["x", "y", "z"])] and vectors is encoder.last


def test_random_sample_draws_seeded_from_the_survivors():
    rng = np.random.default_rng(5)
    queries, documents = unit(rng, 20, 8), unit(rng, 60, 8)
    matrix = full_scores(queries, documents)
    settings = MiningSettings(k=3, relative_margin=None, rank_window=(1, 30), sample="random", seed=1)
    expected = reference(matrix, [set()] * 20, [1.0] * 20, settings)
    index = Index.in_memory(list(range(60)), documents, "test")
    draws = []
    for seed in (1, 1, 2):
        picked = [[d for d, _, _ in select(hits, set(), 1.0, settings, np.random.default_rng([seed, q])).chosen]
                  for q, hits in search_in_chunks(index, queries, 30, chunk=8, desc="test")]
        draws.append(picked)
        for q, chosen in enumerate(picked):
            assert len(chosen) == 3 and set(chosen) <= set(expected[q][1])
    assert draws[0] == draws[1] and draws[0] != draws[2]
    assert draws[0] != [e[0] for e in expected]  # not the top 3


def test_normalised_text_ignores_case_punctuation_and_spacing():
    assert normalise_text("This  package, provides: a TOOL.") == normalise_text("this package provides a tool")
    assert normalise_text("a tool") != normalise_text("a tools")


# ---------------------------------------------------------------- through the command, with the tiny model
def echo_folder(folder: Path, extra_lines: list[str], name: str = "tiny_retrieval.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURE / "datasets.json", folder / "datasets.json")
    (folder / name).write_text((FIXTURE / "tiny_retrieval.jsonl").read_text() + "".join(extra_lines))
    return folder


def fixture_rows() -> list[dict]:
    return [json.loads(line) for line in (FIXTURE / "tiny_retrieval.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mined(tiny_model, tmp_path_factory):
    """The fixture rows plus a row without a positive, a malformed line, a second row for the first query (another
    positive) and a near-copy of row 3's positive as a given negative; mined with each shortfall policy."""
    work = tmp_path_factory.mktemp("mine")
    rows = fixture_rows()
    extra = [json.dumps({"query": "lonely query", "negative": "some text"}) + "\n", "{oops\n",
             json.dumps({"query": rows[0]["query"], "positive": rows[1]["positive"], "negative": "a b"}) + "\n",
             json.dumps({"query": "web tool", "positive": "a web tool .",
                         "negative": rows[2]["positive"].upper().replace(" .", "!")}) + "\n"]
    data = echo_folder(work / "data", extra)
    outs = {}
    for policy in ("keep", "fill", "drop"):
        outs[policy] = work / policy
        assert debater_main(["mine", "--model", str(tiny_model), "--data", str(data), "--out", str(outs[policy]),
                             "-k", "3", "--rank-window", "2", "5", "--max-score", "0.3", "--relative-margin", "1.3",
                             "--shortfall", policy,
                             "--cache", str(work / "cache")]) == 0
    return data, outs


def reload(out: Path):
    rows = [json.loads(line) for line in (out / "tiny_retrieval.jsonl").read_text().splitlines()]
    side = [json.loads(line) for line in (out / "mining" / "tiny_retrieval.scores.jsonl").read_text().splitlines()]
    return rows, side, json.loads((out / "mining" / "manifest.json").read_text())


def valid_rows(data: Path) -> tuple[list[dict], list[str], dict[str, set[str]]]:
    """The rows of the data with a positive, their pool (positives and negatives) and each query's positives."""
    valid = [json.loads(line) for line in (data / "tiny_retrieval.jsonl").read_text().splitlines()
             if line.startswith("{\"") and "positive" in line]
    positives_of: dict[str, set[str]] = {}
    for row in valid:
        positives_of.setdefault(row["query"], set()).add(row["positive"])
    return valid, list(dict.fromkeys(t for r in valid for t in [r["positive"], r["negative"]])), positives_of


def model_scores(tiny_model, rows: list[dict], pool: list[str]) -> np.ndarray:
    from debater.retriever import Retriever

    retriever = Retriever.load(tiny_model)
    return retriever.encode_queries([r["query"] for r in rows], INSTRUCTION) @ retriever.encode_documents(pool).T


def test_scores_are_the_models_own_and_own_positives_never_come_back(mined, tiny_model):
    data, outs = mined
    rows, side, manifest = reload(outs["keep"])
    valid, pool, positives_of = valid_rows(data)
    matrix = model_scores(tiny_model, rows, pool)
    for r, (row, record) in enumerate(zip(rows, side)):
        assert record["positive_score"] == pytest.approx(matrix[r, pool.index(row["positive"])], abs=1e-5)
        for text, negative in zip(row["negative"], record["negatives"]):
            if negative["how"] == "mined":  # the score search found is the model's as the Python API gives it
                assert negative["score"] == pytest.approx(matrix[r, pool.index(text)], abs=1e-5)
            assert normalise_text(text) not in {normalise_text(p) for p in positives_of[row["query"]]}
    # own positives by identity: one per row, two for each of the two rows of the repeated query
    file = manifest["files"][0]
    assert file["excluded"] == {"own_positive": len(valid) + 2, "own_positive_text": 1}
    first = rows[0]["negative"]
    assert valid[1]["positive"] not in first  # the other row's positive of the same query


def test_shortfall_policies_and_manifest_arithmetic(mined, tiny_model):
    data, outs = mined
    keep_rows, keep_side, _ = reload(outs["keep"])
    valid, pool, positives_of = valid_rows(data)
    matrix = model_scores(tiny_model, valid, pool)
    settings = MiningSettings(k=3, relative_margin=1.3, max_score=0.3, rank_window=(2, 5))
    own = [{d for d, text in enumerate(pool) if normalise_text(text) in {normalise_text(p) for p in
                                                                          positives_of[r["query"]]}} for r in valid]
    expected = reference(matrix, own, [matrix[i, pool.index(r["positive"])] for i, r in enumerate(valid)], settings)
    short = sum(len(chosen) < 3 for chosen, _, _ in expected)
    assert 0 < short < len(valid)  # the settings leave some rows short, not all
    outranked = sum(max(matrix[i, d] for d in range(len(pool)) if d not in own[i]) > matrix[i, pool.index(r["positive"])]
                    for i, r in enumerate(valid))
    assert all(sum(e[2].get(f, 0) for e in expected) for f in ("rank_window", "max_score", "relative_margin"))

    for policy, out in outs.items():
        rows, side, manifest = reload(out)
        file = manifest["files"][0]
        assert file["read"] == len(valid) + 2 and manifest["totals"]["read"] == file["read"]
        assert file["read"] == file["written"] + sum(file["skipped"].values())
        assert file["skipped"].get("positive_missing") == 1 and file["skipped"].get("malformed_json") == 1
        assert file["short"] == short
        assert file["positive_outranked"] == outranked
        assert file["dropped"] == {f: sum(e[2].get(f, 0) for e in expected)
                                   for f in ("rank_window", "max_score", "absolute_margin", "relative_margin")}
        assert file["scores"]["kept"]["count"] == sum(len(r["negative"]) for r in rows) - file["shortfall"].get("kept_given", 0)
        if policy == "drop":
            assert file["written"] == len(valid) - short and file["skipped"]["short_of_k"] == short
            assert all(len(r["negative"]) == 3 for r in rows)
        elif policy == "keep":
            assert file["written"] == len(valid)
            assert file["shortfall"]["kept_given"] == sum(len(chosen) < 3 for chosen, _, _ in expected)
            for row, (chosen, _, _), given in zip(rows, expected, valid):
                assert row["negative"] == [pool[d] for d in chosen] + ([given["negative"]] if len(chosen) < 3
                                                                       and given["negative"] not in
                                                                       [pool[d] for d in chosen] else [])
        else:
            filled = [n for record in side for n in record["negatives"] if n["how"] == "filled"]
            assert file["shortfall"]["filled"] == len(filled) > 0
            assert all(n["score"] <= 0.3 for n in filled)
    assert keep_side[0]["line"] == 1 and len(keep_side) == len(keep_rows)


def test_mined_folder_preprocesses_unchanged(mined, tiny_model, tmp_path):
    from data_pipeline.cli import main as pipeline_main

    _, outs = mined
    rows, _, _ = reload(outs["keep"])
    assert set(rows[0]) == {"query", "positive", "negative"} and isinstance(rows[0]["negative"], list)
    assert pipeline_main(["preprocess", "--data", str(outs["keep"]), "--out", str(tmp_path / "pre"),
                          "--model", str(tiny_model), "--workers", "1", "--cod-steps", "2",
                          "--max-seq-length", "48"]) == 0
    manifest = json.loads((tmp_path / "pre" / "manifest.json").read_text())
    assert manifest["files"][0]["written"] == len(rows) and not manifest["files"][0]["skipped"]
    table = pa.ipc.open_file(pa.memory_map(str(tmp_path / "pre" / "shards" / manifest["files"][0]["shard"])))
    assert [len(n) for n in table.read_all().column("negatives").to_pylist()] == [len(r["negative"]) for r in rows]


def test_separate_corpus_and_fields_kept(tiny_model, tmp_path):
    rows = fixture_rows()
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FIXTURE / "datasets.json", data)
    (data / "tiny_retrieval.jsonl").write_text("".join(
        json.dumps({"query": r["query"], "positive": r["positive"], "source": n}) + "\n" for n, r in enumerate(rows)))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{n}", "text": r["negative"]}) + "\n" for n, r in enumerate(rows)))
    assert debater_main(["mine", "--model", str(tiny_model), "--data", str(data), "--out", str(tmp_path / "out"),
                         "--corpus", str(corpus), "-k", "2", "--relative-margin", "off", "--cache", str(tmp_path / "c")]) == 0
    mined_rows, side, _ = reload(tmp_path / "out")
    texts = {f"d{n}": r["negative"] for n, r in enumerate(rows)}
    assert [r["source"] for r in mined_rows] == list(range(len(rows)))  # a field the data had is kept
    for row, record in zip(mined_rows, side):
        assert row["negative"] == [texts[n["id"]] for n in record["negatives"]] and len(row["negative"]) == 2


# ---------------------------------------------------------------- bad input and interruptions
def test_empty_pool_is_a_counted_skip(tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "datasets.json").write_text(json.dumps({"lonely": INSTRUCTION}))
    (data / "lonely.jsonl").write_text(json.dumps({"query": "a tool", "positive": "a tool ."}) + "\n")
    manifest = mine(data, tmp_path / "out", str(tiny_model), MiningSettings(k=1), cache=None)
    assert manifest["files"][0]["skipped"] == {"empty_pool": 1} and manifest["files"][0]["written"] == 0


def test_bad_input_is_one_line(tiny_model, tmp_path, caplog):
    data = echo_folder(tmp_path / "data", [])
    (tmp_path / "c").mkdir()  # the cache folder: a folder this command did not write
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_model, folder)
    settings = {"doc_mode": "step_tokens", "cod_steps": 2, "step_tokens": ["<step_1>", "<step_2>"]}
    (folder / "debater.json").write_text(json.dumps({"base_model": str(tiny_model), "pooling": "last_step",
                                                     "merged": True, "settings": settings}))
    cases = {
        "mixed model": (["--model", str(folder), "--out", str(tmp_path / "o1")], "are not single tokens"),
        "missing corpus": (["--model", str(tiny_model), "--out", str(tmp_path / "o2"), "--corpus",
                            str(tmp_path / "none.jsonl")], "none.jsonl does not exist"),
        "out is the data": (["--model", str(tiny_model), "--out", str(data)], "is the input folder"),
        "out exists": (["--model", str(tiny_model), "--out", str(tmp_path / "c")], "already exists"),
        "out not ours": (["--model", str(tiny_model), "--out", str(tmp_path / "c"), "--overwrite"],
                         "not a folder this command wrote"),
        "window": (["--model", str(tiny_model), "--out", str(tmp_path / "o3"), "--rank-window", "5", "2"],
                   "rank window"),
    }
    for name, (args, words) in cases.items():
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="debater"):
            assert debater_main(["mine", "--data", str(data), "--cache", str(tmp_path / "c"), *args]) == 2, name
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and words in errors[0] and "\n" not in errors[0], (name, errors)
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir())


def test_interrupted_run_leaves_no_half_written_output(tiny_model, tmp_path, monkeypatch):
    import debater.mine_command as command

    data = echo_folder(tmp_path / "data", [])
    shutil.copy(data / "tiny_retrieval.jsonl", data / "tiny_retrieval_b.jsonl")
    (data / "datasets.json").write_text(json.dumps({"tiny_retrieval": INSTRUCTION, "tiny_retrieval_b": INSTRUCTION}))
    out, cache = tmp_path / "out", tmp_path / "cache"
    settings = MiningSettings(k=1)
    mine(data, out, str(tiny_model), settings, cache=cache)
    before = (out / "mining" / "manifest.json").read_text()
    written = command._write_file

    def stop_in_second_file(source, *rest):
        count = written(source, *rest)
        if source.name == "tiny_retrieval_b.jsonl":
            raise KeyboardInterrupt  # as Ctrl-C after the last file's rows were written
        return count

    monkeypatch.setattr(command, "_write_file", stop_in_second_file)
    for target in (out, tmp_path / "fresh"):
        with pytest.raises(KeyboardInterrupt):
            mine(data, target, str(tiny_model), MiningSettings(k=2), cache=cache, overwrite=True)
    assert not (tmp_path / "fresh").exists()
    assert (out / "mining" / "manifest.json").read_text() == before  # the earlier output, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data", "out"]  # no partial folder left
