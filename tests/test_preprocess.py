"""Stage 1 (data_pipeline.stage_tokenize.preprocess): counts, the never-cut suffix, caching, atomicity, errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from conftest import FIXTURES, ROOT
from data_pipeline import stage_tokenize
from data_pipeline.registry import ECHO_INSTRUCTIONS, RegistryError
from data_pipeline.stage_tokenize import MANIFEST_NAME, PreprocessError, preprocess
from debater.core.prompts import EncodingSettings

DOC_MAX, QUERY_MAX, K = 24, 16, 4
FIXTURE_ROWS = 24  # rows in tests/fixtures/echo/tiny_retrieval.jsonl


def settings(**overrides) -> EncodingSettings:
    values = dict(doc_max_length=DOC_MAX, query_max_length=QUERY_MAX, cod_steps=K)
    values.update(overrides)
    return EncodingSettings(**values)


def run(data: Path, out: Path, model: Path, **kwargs) -> dict:
    kwargs.setdefault("workers", 1)
    return preprocess(data, out, str(model), kwargs.pop("settings", None) or settings(), **kwargs)


def row(query: str, positive: str, negative) -> str:
    return json.dumps({"query": query, "positive": positive, "negative": negative})


def read_shard(out: Path, entry: dict) -> list[dict]:
    with pa.memory_map(str(out / "shards" / entry["shard"]), "r") as source:
        return ipc.open_file(source).read_all().to_pylist()


def entry_for(manifest: dict, name: str) -> dict:
    matches = [e for e in manifest["files"] if e["file"] == name]
    assert len(matches) == 1, manifest["files"]
    return matches[0]


def shard_state(out: Path) -> dict[str, int]:
    """Every file under shards/ (temp files included) -> mtime_ns."""
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "shards").iterdir())}


def output_tokenizer(out: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out / "tokenizer")


@pytest.fixture
def echo_dir(tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(FIXTURES / "echo", data)
    return data


NQ_GOOD = [
    row("small web browser engine", "This package provides a web browser engine .", "a font collection"),
    row("small audio player", "This package provides a audio player for music .", ["x y", "z"]),
    row("chess game", "game of chess strategy", "spell checker"),
]


@pytest.fixture
def two_files(echo_dir) -> Path:
    """The fixture file plus a clean nq.jsonl (an echo-data name, so no datasets entry needed)."""
    (echo_dir / "nq.jsonl").write_text("\n".join(NQ_GOOD) + "\n")
    return echo_dir


class Recorder:
    """Wraps tokenize_piece to record which files were tokenized (in-process runs, workers=1)."""

    def __init__(self, monkeypatch):
        self.names: list[str] = []
        original = stage_tokenize.tokenize_piece

        def wrapped(job, *args, **kwargs):
            if job.path.name not in self.names:
                self.names.append(job.path.name)
            return original(job, *args, **kwargs)

        monkeypatch.setattr(stage_tokenize, "tokenize_piece", wrapped)


# --------------------------------------------------------------------------- manifest accounting


def test_manifest_counts_read_written_skipped(echo_dir, tiny_model, tmp_path):
    lines = [
        NQ_GOOD[0],                                  # 1 ok
        "{not json",                                 # 2 malformed_json
        "",                                          # blank, not counted
        row("q", "", "n"),                           # 4 positive_empty
        NQ_GOOD[1],                                  # 5 ok
        row("q", "p", []),                           # 6 negative_empty
        json.dumps({"query": "q", "positive": "p"}),  # 7 negative_missing
        NQ_GOOD[2],                                  # 8 ok
        "[1, 2]",                                    # 9 not_an_object
    ]
    (echo_dir / "nq.jsonl").write_text("\n".join(lines) + "\n")
    (echo_dir / "notes.txt").write_text("not a jsonl file, ignored")
    out = tmp_path / "out"
    manifest = run(echo_dir, out, tiny_model)

    assert [e["file"] for e in manifest["files"]] == ["nq.jsonl", "tiny_retrieval.jsonl"]
    nq = entry_for(manifest, "nq.jsonl")
    assert nq["read"] == 8
    assert nq["written"] == 3
    assert nq["skipped"] == {"malformed_json": 1, "negative_empty": 1, "negative_missing": 1,
                             "not_an_object": 1, "positive_empty": 1}
    tiny = entry_for(manifest, "tiny_retrieval.jsonl")
    assert (tiny["read"], tiny["written"], tiny["skipped"]) == (FIXTURE_ROWS, FIXTURE_ROWS, {})
    for entry in manifest["files"]:
        assert entry["read"] == entry["written"] + sum(entry["skipped"].values()), entry
        assert len(read_shard(out, entry)) == entry["written"]
    assert [r["line"] for r in read_shard(out, nq)] == [1, 5, 8]
    assert [len(r["negatives"]) for r in read_shard(out, nq)] == [1, 2, 1]
    on_disk = json.loads((out / MANIFEST_NAME).read_text())
    assert on_disk == manifest
    assert on_disk["settings"]["doc_max_length"] == DOC_MAX
    assert on_disk["settings"]["step_tokens"] and len(on_disk["settings"]["step_tokens"]) == K


# --------------------------------------------------------------------------- invariant 1: the suffix


LONG_BODY = " ".join(["This package provides a compression archive tool ."] * 60)
LONG_QUERY = " ".join(["small web browser engine"] * 30)


def test_every_document_ends_with_the_step_tokens_and_fits(echo_dir, tiny_model, tmp_path):
    (echo_dir / "nq.jsonl").write_text("\n".join([
        row(LONG_QUERY, LONG_BODY, [LONG_BODY, "short", LONG_BODY + " tail", "two words"]),
        row("tiny", "x", LONG_BODY),
        row("small audio player", LONG_BODY, ["a", "b"]),
    ]) + "\n")
    out = tmp_path / "out"
    manifest = run(echo_dir, out, tiny_model)
    tokenizer = output_tokenizer(out)
    step_tokens = manifest["settings"]["step_tokens"]
    step_ids = tokenizer.convert_tokens_to_ids(step_tokens)
    assert len(step_ids) == K and len(set(step_ids)) == K
    assert tokenizer.unk_token_id not in step_ids
    prompt_ids = tokenizer(" " + settings().prompt_text(), add_special_tokens=False).input_ids
    suffix = prompt_ids + step_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    docs, queries = 0, 0
    for entry in manifest["files"]:
        for r in read_shard(out, entry):
            for doc in [r["positive"], *r["negatives"]]:
                docs += 1
                assert len(doc) <= DOC_MAX, doc
                assert doc[-K:] == step_ids, doc
                assert doc[-len(suffix):] == suffix, doc  # the prompt is never cut either
                assert doc[0] == bos
                assert not set(doc[:-K]) & set(step_ids)
            q = r["query"]
            queries += 1
            assert len(q) <= QUERY_MAX and q[-1] == eos and q[0] == bos, q
            assert eos not in q[:-1]

    nq_rows = read_shard(out, entry_for(manifest, "nq.jsonl"))
    assert docs == FIXTURE_ROWS * 2 + 5 + 2 + 3 and queries == FIXTURE_ROWS + 3
    first = nq_rows[0]
    assert len(first["query"]) == QUERY_MAX  # a long query is truncated to the limit, EOS kept
    assert len(first["positive"]) == DOC_MAX  # a long body is truncated, suffix kept
    assert [len(n) for n in first["negatives"]][0] == DOC_MAX and len(first["negatives"]) == 4
    assert len(first["negatives"][1]) == 1 + 1 + len(suffix)  # BOS + "short" + suffix: no padding
    assert len(nq_rows[1]["negatives"][0]) == DOC_MAX


@pytest.mark.parametrize("doc_mode", ["last_token", "last_k_tokens"])
def test_ablation_documents_end_with_eos(echo_dir, tiny_model, tmp_path, doc_mode):
    (echo_dir / "nq.jsonl").write_text(row("q", LONG_BODY, [LONG_BODY, "short"]) + "\n")
    out = tmp_path / "out"
    manifest = run(echo_dir, out, tiny_model, settings=settings(doc_mode=doc_mode, doc_max_length=12))
    assert manifest["settings"]["step_tokens"] == []
    eos = output_tokenizer(out).eos_token_id
    for entry in manifest["files"]:
        for r in read_shard(out, entry):
            for doc in [r["positive"], *r["negatives"]]:
                assert len(doc) <= 12 and doc[-1] == eos, doc
    nq = read_shard(out, entry_for(manifest, "nq.jsonl"))[0]
    assert len(nq["positive"]) == 12


@pytest.mark.parametrize("side", ["right", "left"])
def test_formatter_backend_ids_equal_the_tokenizer_call(tiny_model, side):
    """The direct Rust-backend path gives tokenizer(...)'s ids, and leaves later tokenizer calls unchanged."""
    from transformers import AutoTokenizer

    from debater.core.prompts import TextFormatter, resolve_step_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.truncation_side = side
    lines = (FIXTURES / "echo" / "tiny_retrieval.jsonl").read_text().splitlines()
    texts = [json.loads(x)["positive"] for x in lines if x.strip()] + ["", "unknownword", "This package"]
    encoding = settings()
    resolve_step_tokens(tokenizer, encoding)
    formatter = TextFormatter(tokenizer, encoding)
    untruncated = tokenizer(texts).input_ids
    for budget in (1, 3, 8, 100):
        assert formatter._encode(texts, budget) == tokenizer(texts, truncation=True, max_length=budget).input_ids
    assert tokenizer(texts).input_ids == untruncated
    assert max(len(ids) for ids in untruncated) > 8  # truncation was exercised


def test_allnli_and_quora_alternate_instructions_by_line(tmp_path, tiny_model):
    data = tmp_path / "data"
    data.mkdir()
    same = row("small web browser engine", "web browser engine", "font collection")
    (data / "allnli.jsonl").write_text("\n".join([same, same, same]) + "\n")
    (data / "quora_duplicates.jsonl").write_text("\n".join([same, "", same]) + "\n")  # line 3 after a blank
    out = tmp_path / "out"
    manifest = run(data, out, tiny_model, settings=settings(query_max_length=64))
    tokenizer = output_tokenizer(out)

    def expected(instruction: str) -> list[int]:
        return tokenizer(f"{instruction} small web browser engine").input_ids + [tokenizer.eos_token_id]

    allnli = read_shard(out, entry_for(manifest, "allnli.jsonl"))
    options = ECHO_INSTRUCTIONS["allnli"]
    assert [r["query"] for r in allnli] == [expected(options[0]), expected(options[1]), expected(options[0])]
    assert allnli[0]["query"] != allnli[1]["query"]
    quora = read_shard(out, entry_for(manifest, "quora_duplicates.jsonl"))
    options = ECHO_INSTRUCTIONS["quora_duplicates"]
    assert [r["line"] for r in quora] == [1, 3]
    assert [r["query"] for r in quora] == [expected(options[0]), expected(options[0])]


def test_datasets_json_instruction_is_used(echo_dir, tiny_model, tmp_path):
    out = tmp_path / "out"
    manifest = run(echo_dir, out, tiny_model, settings=settings(query_max_length=64))
    tokenizer = output_tokenizer(out)
    instruction = json.loads((echo_dir / "datasets.json").read_text())["tiny_retrieval"]
    source = [json.loads(x) for x in (echo_dir / "tiny_retrieval.jsonl").read_text().splitlines() if x.strip()]
    shard = read_shard(out, entry_for(manifest, "tiny_retrieval.jsonl"))
    for src, r in zip(source, shard, strict=True):
        assert r["query"] == tokenizer(f"{instruction} {src['query']}").input_ids + [tokenizer.eos_token_id]


# --------------------------------------------------------------------------- caching


def test_second_run_does_no_work(two_files, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = run(two_files, out, tiny_model)
    before = shard_state(out)
    tokenizer_before = {p.name: p.stat().st_mtime_ns for p in (out / "tokenizer").iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("tokenize_piece called on a cached run")

    monkeypatch.setattr(stage_tokenize, "tokenize_piece", fail)
    second = run(two_files, out, tiny_model)
    assert second == first
    assert shard_state(out) == before
    assert {p.name: p.stat().st_mtime_ns for p in (out / "tokenizer").iterdir()} == tokenizer_before


def test_a_cached_run_loads_no_tokenizer_until_the_model_or_settings_change(two_files, tiny_model, tmp_path,
                                                                            monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    out = tmp_path / "out"
    first = run(two_files, out, model)
    loads, original = [], stage_tokenize.load_tokenizer
    monkeypatch.setattr(stage_tokenize, "load_tokenizer", lambda *args: loads.append(args[0]) or original(*args))
    assert run(two_files, out, model) == first and loads == []  # the saved tokenizer's record is enough
    config = model / "tokenizer_config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 5_000_000_000))
    assert run(two_files, out, model) == first and loads == [str(model)]  # loaded again: same ids, same shards
    assert run(two_files, out, model) == first and len(loads) == 1
    changed = run(two_files, out, model, settings=settings(cod_steps=K + 1))
    assert len(loads) == 2 and changed["settings"]["cod_steps"] == K + 1


def test_a_cached_cli_run_imports_no_torch_or_transformers(echo_dir, tiny_model, tmp_path):
    """What makes ``make preprocess`` with nothing to do return at once: the heavy libraries stay unloaded. The
    first run mines BM25 negatives without bm25s's DEBUG lines (its import turns them on)."""
    check = ("import sys; from data_pipeline.cli import main; code = main(sys.argv[1:]); "
             "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules)); sys.exit(code)")
    command = [sys.executable, "-c", check, "preprocess", "--data", str(echo_dir), "--out", str(tmp_path / "out"),
               "--model", str(tiny_model), "--max-seq-length", str(DOC_MAX), "--workers", "1", "--mine-bm25", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=True)
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=True)
    assert first.stdout.splitlines()[-1] != "[]"  # the first run tokenized
    assert "mining 1 BM25 negatives" in first.stderr and "DEBUG" not in first.stderr, first.stderr
    assert "cached" in second.stderr and second.stdout.splitlines()[-1] == "[]"



def test_touching_one_file_retokenizes_only_that_file(two_files, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = run(two_files, out, tiny_model)
    before = shard_state(out)
    old_nq = entry_for(first, "nq.jsonl")["shard"]
    old_nq_rows = read_shard(out, entry_for(first, "nq.jsonl"))
    tiny_shard = entry_for(first, "tiny_retrieval.jsonl")["shard"]

    nq = two_files / "nq.jsonl"
    stat = nq.stat()
    os.utime(nq, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    calls = Recorder(monkeypatch)
    second = run(two_files, out, tiny_model)
    assert calls.names == ["nq.jsonl"]
    new_nq = entry_for(second, "nq.jsonl")["shard"]
    assert new_nq != old_nq
    after = shard_state(out)
    assert old_nq not in after and Path(old_nq).with_suffix(".json").name not in after  # stale shard removed
    assert after[tiny_shard] == before[tiny_shard]  # untouched file: same shard, not rewritten
    assert entry_for(second, "tiny_retrieval.jsonl") == entry_for(first, "tiny_retrieval.jsonl")
    assert read_shard(out, entry_for(second, "nq.jsonl")) == old_nq_rows  # same content, same ids

    # changing the content of the other file re-tokenizes only that one
    calls.names.clear()
    with open(two_files / "tiny_retrieval.jsonl", "a") as handle:
        handle.write(row("extra query", "extra positive", "extra negative") + "\n")
    third = run(two_files, out, tiny_model)
    assert calls.names == ["tiny_retrieval.jsonl"]
    assert entry_for(third, "tiny_retrieval.jsonl")["written"] == FIXTURE_ROWS + 1
    assert entry_for(third, "nq.jsonl") == entry_for(second, "nq.jsonl")
    assert sorted(p.name for p in (out / "shards").glob("*.arrow")) == sorted(e["shard"] for e in third["files"])


def test_changing_encoding_settings_retokenizes_every_file(two_files, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = run(two_files, out, tiny_model)
    calls = Recorder(monkeypatch)
    second = run(two_files, out, tiny_model, settings=settings(doc_max_length=DOC_MAX + 8))
    assert sorted(calls.names) == ["nq.jsonl", "tiny_retrieval.jsonl"]
    assert {e["shard"] for e in first["files"]}.isdisjoint(e["shard"] for e in second["files"])
    assert sorted(p.name for p in (out / "shards").glob("*.arrow")) == sorted(e["shard"] for e in second["files"])
    for entry in second["files"]:
        assert all(len(r["positive"]) <= DOC_MAX + 8 for r in read_shard(out, entry))


def test_parallel_workers_give_the_same_shards(two_files, tiny_model, tmp_path):
    serial = run(two_files, tmp_path / "serial", tiny_model, workers=1)
    parallel = run(two_files, tmp_path / "parallel", tiny_model, workers=2)
    assert serial["files"] == parallel["files"]
    for entry in serial["files"]:
        assert read_shard(tmp_path / "serial", entry) == read_shard(tmp_path / "parallel", entry)


def test_one_file_split_into_pieces_over_workers_gives_the_same_shard(two_files, tiny_model, tmp_path,
                                                                     monkeypatch):
    """Parallelism inside one file: pieces of ~300 bytes over 2 processes join into the serial shard."""
    whole = run(two_files, tmp_path / "whole", tiny_model, workers=1)
    monkeypatch.setattr(stage_tokenize, "MIN_PIECE_BYTES", 1)
    monkeypatch.setattr(stage_tokenize, "MAX_PIECE_BYTES", 300)
    pieces = run(two_files, tmp_path / "pieces", tiny_model, workers=2)
    assert pieces["files"] == whole["files"]
    for entry in whole["files"]:
        assert read_shard(tmp_path / "pieces", entry) == read_shard(tmp_path / "whole", entry)
    assert [p.name for p in (tmp_path / "pieces" / "shards").iterdir() if p.name.startswith(".parts")] == []


def test_strict_over_workers_names_file_and_line(echo_dir, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(stage_tokenize, "MIN_PIECE_BYTES", 1)
    monkeypatch.setattr(stage_tokenize, "MAX_PIECE_BYTES", 100)
    bad = echo_dir / "nq.jsonl"
    bad.write_text("\n".join(NQ_GOOD[:3] + ["{oops"]) + "\n")
    with pytest.raises(ValueError, match=f"{bad}:4: bad row \\(malformed_json\\)"):
        run(echo_dir, tmp_path / "out", tiny_model, workers=2, strict=True)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


# --------------------------------------------------------------------------- atomicity


def test_interrupted_run_keeps_finished_files_and_leaves_no_partial_shard(two_files, tiny_model, tmp_path,
                                                                           monkeypatch):
    out = tmp_path / "out"
    original_chunk = stage_tokenize._tokenize_chunk
    fixture_instruction = [json.loads((two_files / "datasets.json").read_text())["tiny_retrieval"]]

    def crash_on_second_file(formatter, rows, instructions):
        if instructions == fixture_instruction:  # tiny_retrieval.jsonl, tokenized after nq.jsonl
            raise KeyboardInterrupt("simulated kill in the middle of a shard")
        return original_chunk(formatter, rows, instructions)

    monkeypatch.setattr(stage_tokenize, "_tokenize_chunk", crash_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        run(two_files, out, tiny_model)
    left = sorted(p.name for p in (out / "shards").iterdir())
    assert len(left) == 2 and all(name.startswith("nq-") for name in left), left  # nq shard + sidecar only
    assert not (out / MANIFEST_NAME).exists()

    monkeypatch.setattr(stage_tokenize, "_tokenize_chunk", original_chunk)
    calls = Recorder(monkeypatch)
    manifest = run(two_files, out, tiny_model)
    assert calls.names == ["tiny_retrieval.jsonl"]
    assert entry_for(manifest, "tiny_retrieval.jsonl")["written"] == FIXTURE_ROWS
    assert len(read_shard(out, entry_for(manifest, "tiny_retrieval.jsonl"))) == FIXTURE_ROWS


@pytest.mark.parametrize("damage", ["sidecar_missing_shard_truncated", "shard_missing", "leftover_temp_files"])
def test_untrusted_leftovers_are_redone(two_files, tiny_model, tmp_path, monkeypatch, damage):
    out = tmp_path / "out"
    first = run(two_files, out, tiny_model)
    entry = entry_for(first, "tiny_retrieval.jsonl")
    shard = out / "shards" / entry["shard"]
    sidecar = shard.with_suffix(".json")
    good_rows = read_shard(out, entry)
    if damage == "sidecar_missing_shard_truncated":  # killed between the shard rename and the sidecar
        shard.write_bytes(shard.read_bytes()[:100])
        sidecar.unlink()
    elif damage == "shard_missing":
        shard.unlink()
    else:  # killed before the rename: only temp files are left
        temp_shard = shard.parent / f".{shard.name}.abc123.tmp"
        temp_sidecar = shard.parent / f".{sidecar.name}.def456.tmp"
        shutil.move(shard, temp_shard)
        shutil.move(sidecar, temp_sidecar)
        temp_shard.write_bytes(temp_shard.read_bytes()[:50])

    calls = Recorder(monkeypatch)
    second = run(two_files, out, tiny_model)
    assert calls.names == ["tiny_retrieval.jsonl"]
    assert entry_for(second, "tiny_retrieval.jsonl") == entry
    assert read_shard(out, entry) == good_rows
    assert json.loads(sidecar.read_text()) == entry
    from data_pipeline.loader import PreprocessedData

    assert sum(t.num_rows for t in PreprocessedData(out).tables) == FIXTURE_ROWS + len(NQ_GOOD)


def test_failed_tokenization_leaves_no_temp_files(echo_dir, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(stage_tokenize, "_tokenize_chunk", boom)
    with pytest.raises(RuntimeError, match="boom"):
        run(echo_dir, out, tiny_model)
    assert list((out / "shards").iterdir()) == []
    assert not (out / MANIFEST_NAME).exists()


# --------------------------------------------------------------------------- errors


def test_empty_folder_is_an_error(tmp_path, tiny_model):
    data = tmp_path / "empty"
    data.mkdir()
    (data / "readme.txt").write_text("no jsonl here")
    with pytest.raises(PreprocessError, match=r"no \.jsonl files in .*empty"):
        run(data, tmp_path / "out", tiny_model)
    assert not (tmp_path / "out").exists()


def test_missing_folder_is_an_error(tmp_path, tiny_model):
    with pytest.raises(PreprocessError, match="not found") as info:
        run(tmp_path / "does-not-exist", tmp_path / "out", tiny_model)
    assert "does-not-exist" in str(info.value)
    file_instead = tmp_path / "a.jsonl"
    file_instead.write_text(NQ_GOOD[0])
    with pytest.raises(PreprocessError, match="not a folder"):
        run(file_instead, tmp_path / "out", tiny_model)


def test_unknown_file_without_datasets_json_is_an_error_before_any_work(tmp_path, tiny_model):
    data = tmp_path / "data"
    data.mkdir()
    (data / "nq.jsonl").write_text(NQ_GOOD[0] + "\n")
    shutil.copy(FIXTURES / "echo" / "tiny_retrieval.jsonl", data / "mystery_set.jsonl")
    with pytest.raises(RegistryError) as info:
        run(data, tmp_path / "out", tiny_model)
    assert "mystery_set.jsonl" in str(info.value) and "datasets.json" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_malformed_datasets_json_is_an_error(echo_dir, tiny_model, tmp_path):
    (echo_dir / "datasets.json").write_text('{"tiny_retrieval": 5}')
    with pytest.raises(RegistryError, match="tiny_retrieval"):
        run(echo_dir, tmp_path / "out", tiny_model)


def test_explicit_datasets_file(tmp_path, tiny_model):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FIXTURES / "echo" / "tiny_retrieval.jsonl", data / "tiny_retrieval.jsonl")
    elsewhere = tmp_path / "my-datasets.json"
    elsewhere.write_text(json.dumps({"tiny_retrieval": ["A:", "B:"]}))
    manifest = run(data, tmp_path / "out", tiny_model, datasets_file=elsewhere)
    assert entry_for(manifest, "tiny_retrieval.jsonl")["written"] == FIXTURE_ROWS


def test_all_rows_skipped_is_an_error(tmp_path, tiny_model):
    data = tmp_path / "data"
    data.mkdir()
    (data / "nq.jsonl").write_text("{bad\n" + row("", "p", "n") + "\n")
    out = tmp_path / "out"
    with pytest.raises(PreprocessError, match="no valid rows"):
        run(data, out, tiny_model)
    assert not (out / MANIFEST_NAME).exists()


def test_unloadable_model_is_a_preprocess_error(echo_dir, tmp_path):
    with pytest.raises(PreprocessError, match="cannot load a tokenizer"):
        preprocess(echo_dir, tmp_path / "out", str(tmp_path / "no-model-here"), settings(), workers=1)


# --------------------------------------------------------------------------- strict


def test_strict_raises_on_a_bad_row_naming_file_and_line(echo_dir, tiny_model, tmp_path):
    bad = echo_dir / "nq.jsonl"
    bad.write_text("\n".join([NQ_GOOD[0], NQ_GOOD[1], row("q", "p", [])]) + "\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        run(echo_dir, out, tiny_model, strict=True)
    assert f"{bad}:3" in str(info.value) and "negative_empty" in str(info.value)
    assert not list((out / "shards").glob("nq-*"))
    assert not (out / MANIFEST_NAME).exists()


def test_strict_passes_clean_data(two_files, tiny_model, tmp_path):
    manifest = run(two_files, tmp_path / "out", tiny_model, strict=True)
    assert all(not e["skipped"] for e in manifest["files"])


def test_strict_raises_even_when_the_bad_file_is_cached(echo_dir, tiny_model, tmp_path):
    """A non-strict run caches a shard with counted skips; a later strict run must not accept it silently."""
    (echo_dir / "nq.jsonl").write_text("\n".join([NQ_GOOD[0], "{bad"]) + "\n")
    out = tmp_path / "out"
    manifest = run(echo_dir, out, tiny_model)
    assert entry_for(manifest, "nq.jsonl")["skipped"] == {"malformed_json": 1}
    with pytest.raises(ValueError, match="nq.jsonl"):
        run(echo_dir, out, tiny_model, strict=True)


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("make_folder", [True, False], ids=["empty-folder", "missing-folder"])
def test_cli_error_is_one_line_without_traceback(tmp_path, make_folder):
    data = tmp_path / "data"
    if make_folder:
        data.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline", "preprocess", "--data", str(data), "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    lines = [x for x in (result.stdout + result.stderr).splitlines() if x.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in result.stderr
    assert "ERROR" in lines[0] and str(data) in lines[0]
    assert ("no .jsonl files" if make_folder else "not found") in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_all_rows_skipped_names_the_counts_in_one_line(tmp_path, tiny_model):
    data = tmp_path / "data"
    data.mkdir()
    (data / "nq.jsonl").write_text("{bad\n" + row("", "p", "n") + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline", "preprocess", "--data", str(data), "--out", str(tmp_path / "out"),
         "--model", str(tiny_model), "--workers", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    assert "nq.jsonl: read 2, skipped 1 malformed_json, 1 " in errors[0]
    assert "manifest" not in errors[0] and not (tmp_path / "out" / MANIFEST_NAME).exists()


# --------------------------------------------------------------------------- stage 1 -> loader


def test_real_shards_feed_the_rank_loader(echo_dir, tiny_model, tmp_path, monkeypatch):
    """Multi-chunk shards and a file with no valid row still plan and load; rank slices add up."""
    from data_pipeline.loader import PreprocessedData, RankLoader

    monkeypatch.setattr(stage_tokenize, "CHUNK_ROWS", 5)  # several record batches per shard
    (echo_dir / "nq.jsonl").write_text("{bad\n")
    out = tmp_path / "out"
    run(echo_dir, out, tiny_model)
    data = PreprocessedData(out)
    assert [t.num_rows for t in data.tables] == [0, FIXTURE_ROWS]
    plan = data.plan(global_batch=4, seed=0)
    assert len(plan) == FIXTURE_ROWS // 4 and set(plan.batch_file.tolist()) == {1}
    pad = output_tokenizer(out).pad_token_id
    whole = [RankLoader(data, plan, 0, 1, pad).batch(i) for i in range(len(plan))]
    halves = [[RankLoader(data, plan, r, 2, pad).batch(i) for r in range(2)] for i in range(len(plan))]
    shard = read_shard(out, entry_for(data.manifest, "tiny_retrieval.jsonl"))
    for index, (full, parts) in enumerate(zip(whole, halves)):
        def rows(batch, key):
            ids, mask = batch[f"{key}_ids"], batch[f"{key}_mask"]
            return [r[m.bool()].tolist() for r, m in zip(ids, mask)]

        gids = plan.batches[index].tolist()
        assert rows(full, "query") == [shard[g - int(data.offsets[1])]["query"] for g in gids]
        assert rows(parts[0], "query") + rows(parts[1], "query") == rows(full, "query")
        docs = [rows(p, "doc") for p in parts]
        assert docs[0][:2] + docs[1][:2] == rows(full, "doc")[:4]  # positives
        assert docs[0][2:] + docs[1][2:] == rows(full, "doc")[4:]  # negatives


# --------------------------------------------------------------------------- BM25 mining


MINE_ROWS = [
    row("fast web browser", "a fast web browser engine", "a font collection"),
    row("web server daemon", "a small web server daemon", "a web browser engine for kids"),
    row("chess game engine", "a chess game engine", "a game of cards"),
    row("card game", "a game of cards", "a chess game engine"),
    row("web browser engine", "a fast web browser engine", "a spell checker"),  # same positive as line 1
    row("zzz", "qqq nothing shared", "xxx"),  # no lexical overlap with anything
]


def test_bm25_mining_never_returns_the_own_positive(tmp_path):
    from data_pipeline.mine import mine_bm25, mined_for_lines

    path = tmp_path / "mine_me.jsonl"
    path.write_text("\n".join(MINE_ROWS) + "\n")
    counts = mine_bm25(path, 2, tmp_path / "mined.arrow")
    mined = mined_for_lines(tmp_path / "mined.arrow", 1, len(MINE_ROWS))
    sources = [json.loads(r) for r in MINE_ROWS]
    assert sorted(mined) == list(range(1, len(MINE_ROWS) + 1))
    for line, source in enumerate(sources, start=1):
        assert source["positive"] not in mined[line]
        assert source["negative"] not in mined[line] and len(set(mined[line])) == len(mined[line])
        assert all(text in {s["positive"] for s in sources} for text in mined[line])
    assert mined[1][0] == "a small web server daemon"  # the best lexical match after the own positive
    assert mined[6] == []
    assert counts.as_dict() == {"method": "bm25", "k": 2, "queries": 6,
                                "added": sum(len(v) for v in mined.values()),
                                "short": sum(len(v) < 2 for v in mined.values()),
                                "own_positive_excluded": counts.own_positive_excluded}
    assert counts.own_positive_excluded >= 4 and counts.short >= 1
    assert mined_for_lines(tmp_path / "mined.arrow", 2, 3) == {2: mined[2], 3: mined[3]}


def test_preprocess_with_mining_appends_the_mined_negatives(tmp_path, tiny_model, monkeypatch):
    from data_pipeline.mine import mine_bm25, mined_for_lines
    from debater.core.prompts import TextFormatter

    data = tmp_path / "data"
    data.mkdir()
    (data / "nq.jsonl").write_text("\n".join(MINE_ROWS) + "\n")
    monkeypatch.setattr(stage_tokenize, "MIN_PIECE_BYTES", 1)
    monkeypatch.setattr(stage_tokenize, "MAX_PIECE_BYTES", 150)  # pieces read their lines of the mined file
    manifest = run(data, tmp_path / "out", tiny_model, mine_k=2, workers=2)
    entry = entry_for(manifest, "nq.jsonl")
    expected_counts = mine_bm25(data / "nq.jsonl", 2, tmp_path / "mined.arrow")
    mined = mined_for_lines(tmp_path / "mined.arrow", 1, len(MINE_ROWS))
    assert entry["mined"] == expected_counts.as_dict() and manifest["mine_bm25"] == 2
    assert entry["read"] == entry["written"] == len(MINE_ROWS)
    encoding = settings()
    tokenizer = output_tokenizer(tmp_path / "out")
    encoding.step_tokens = manifest["settings"]["step_tokens"]
    formatter = TextFormatter(tokenizer, encoding)
    for shard_row, source in zip(read_shard(tmp_path / "out", entry), MINE_ROWS):
        line = shard_row["line"]
        expected = formatter.documents([json.loads(source)["negative"], *mined[line]])
        assert shard_row["negatives"] == expected
    plain = run(data, tmp_path / "out", tiny_model)  # mining off: a different shard, one negative per row
    assert "mined" not in entry_for(plain, "nq.jsonl")
    assert all(len(r["negatives"]) == 1 for r in read_shard(tmp_path / "out", entry_for(plain, "nq.jsonl")))
