"""Stage 2 and the loader: homogeneous, deterministic global batches; rank slices that add up (invariant 5)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch

from data_pipeline.loader import PreprocessedData, RankLoader
from data_pipeline.stage_plan import BatchPlan, plan_batches
from data_pipeline.stage_tokenize import MANIFEST_NAME, SHARD_SCHEMA
from debater.core.padding import left_pad, pad_token_id

PAD = 0
Q, P, N = 100_000, 200_000, 300_000  # id ranges that encode the global row id in each sequence

# file name -> (rows, negatives per row as a function of the global row id)
FILES = {
    "a.jsonl": 37,
    "b.jsonl": 21,
    "empty.jsonl": 0,   # a file whose rows were all skipped
    "c.jsonl": 16,
}


def negatives_count(gid: int) -> int:
    return 1 if gid % 7 == 3 else 2  # some rows have too few negatives for k=2


def make_row(gid: int, line: int) -> dict:
    return {
        "line": line,
        "query": [Q + gid] * (1 + gid % 4),
        "positive": [P + gid] * (1 + gid % 3) + [7],
        "negatives": [[N + 10 * gid + j] * (1 + (gid + j) % 5) for j in range(negatives_count(gid))],
    }


def write_preprocessed(folder: Path, files: dict[str, int] = FILES) -> Path:
    """A preprocessed folder (manifest + Arrow shards) in the layout stage 1 writes, with known ids."""
    (folder / "shards").mkdir(parents=True)
    entries, gid = [], 0
    for name, count in files.items():
        rows = [make_row(gid + i, i + 1) for i in range(count)]
        gid += count
        shard = f"{Path(name).stem}-0123456789abcdef.arrow"
        table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
        with pa.OSFile(str(folder / "shards" / shard), "wb") as sink, ipc.new_file(sink, SHARD_SCHEMA) as writer:
            writer.write_table(table)
        entries.append({"file": name, "shard": shard, "read": count, "written": count, "skipped": {}})
    (folder / MANIFEST_NAME).write_text(json.dumps({"format_version": 1, "files": entries}))
    return folder


@pytest.fixture
def data(tmp_path) -> PreprocessedData:
    return PreprocessedData(write_preprocessed(tmp_path / "pre"))


def file_of(gid: int) -> str:
    start = 0
    for name, count in FILES.items():
        if gid < start + count:
            return name
        start += count
    raise AssertionError(gid)


def unpad(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    assert ids.shape == mask.shape and ids.dtype == torch.long
    assert set(mask.unique().tolist()) <= {0, 1}
    assert torch.all(ids[mask == 0] == PAD)
    rows = []
    for row_ids, row_mask in zip(ids, mask):
        n = int(row_mask.sum())
        assert row_mask[len(row_mask) - n:].all() and not row_mask[:len(row_mask) - n].any()  # left padding
        rows.append(row_ids[len(row_ids) - n:].tolist())
    return rows


def split(batch: dict, k: int) -> dict[str, list[list[int]]]:
    queries = unpad(batch["query_ids"], batch["query_mask"])
    docs = unpad(batch["doc_ids"], batch["doc_mask"])
    n = len(queries)
    assert len(docs) == n * (1 + k)
    return {"queries": queries, "positives": docs[:n], "negatives": docs[n:]}


# --------------------------------------------------------------------------- plan_batches


def ranges(sizes: list[int]) -> tuple[list[str], list[np.ndarray]]:
    names = [f"f{i}.jsonl" for i in range(len(sizes))]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return names, [np.arange(offsets[i], offsets[i + 1]) for i in range(len(sizes))]


def test_every_global_batch_comes_from_one_file():
    sizes = [13, 7, 4, 30, 3, 9]
    names, eligible = ranges(sizes)
    plan = plan_batches(names, eligible, 4, seed=1, total_rows=sizes)
    assert plan.batches.shape == (len(plan), 4)
    assert plan.batches.dtype == np.int64
    for batch, owner in zip(plan.batches, plan.batch_file):
        owners = {i for i, rows in enumerate(eligible) if np.isin(batch, rows).any()}
        assert owners == {int(owner)}
        assert np.isin(batch, eligible[owner]).all()
    # the plan mixes files across batches (not all of one file first) for this seed
    assert len(set(plan.batch_file.tolist())) > 1


def test_remainder_is_dropped_and_counted():
    sizes = [13, 7, 4, 3, 0]
    names, eligible = ranges(sizes)
    plan = plan_batches(names, eligible, 4, seed=0, total_rows=sizes)
    assert plan.dropped == {"f0.jsonl": 1, "f1.jsonl": 3, "f2.jsonl": 0, "f3.jsonl": 3, "f4.jsonl": 0}
    assert len(plan) == 3 + 1 + 1
    assert sorted(np.bincount(plan.batch_file, minlength=5).tolist()) == sorted([3, 1, 1, 0, 0])
    used = plan.batches.ravel()
    assert len(set(used.tolist())) == len(used)  # no row twice
    assert len(used) + sum(plan.dropped.values()) == sum(sizes)


def test_ineligible_rows_are_counted_as_dropped():
    names = ["x.jsonl", "y.jsonl"]
    eligible = [np.array([0, 2, 3, 5, 6]), np.array([10, 11, 12, 13])]  # x has 8 rows, 3 ineligible
    plan = plan_batches(names, eligible, 2, seed=3, total_rows=[8, 6])
    assert plan.dropped == {"x.jsonl": 8 - 4, "y.jsonl": 6 - 4}
    used = set(plan.batches.ravel().tolist())
    assert used <= {0, 2, 3, 5, 6, 10, 11, 12, 13}
    assert len(used) == 8


def test_no_full_batch_gives_an_empty_plan():
    names, eligible = ranges([3, 2])
    plan = plan_batches(names, eligible, 4, seed=0, total_rows=[3, 2])
    assert len(plan) == 0 and plan.batches.shape == (0, 4) and len(plan.batch_file) == 0
    assert plan.dropped == {"f0.jsonl": 3, "f1.jsonl": 2}


def test_plan_is_deterministic_for_batch_and_seed():
    sizes = [50, 33, 18]
    names, eligible = ranges(sizes)
    first = plan_batches(names, eligible, 8, seed=42, total_rows=sizes)
    second = plan_batches(names, [e.copy() for e in eligible], 8, seed=42, total_rows=sizes)
    assert np.array_equal(first.batches, second.batches)
    assert np.array_equal(first.batch_file, second.batch_file)
    assert first.dropped == second.dropped


def test_a_different_seed_gives_a_different_order():
    sizes = [50, 33, 18]
    names, eligible = ranges(sizes)
    a = plan_batches(names, eligible, 8, seed=1, total_rows=sizes)
    b = plan_batches(names, eligible, 8, seed=2, total_rows=sizes)
    assert a.batches.shape == b.batches.shape
    assert not np.array_equal(a.batches, b.batches)
    # same number of batches per file whatever the seed
    assert np.array_equal(np.bincount(a.batch_file), np.bincount(b.batch_file))


# --------------------------------------------------------------------------- PreprocessedData.plan


def test_preprocessed_plan_batches_are_homogeneous_and_respect_negatives(data):
    plan = data.plan(global_batch=4, seed=5, negatives_per_query=2)
    assert data.file_names == list(FILES)
    assert len(plan) > 0
    for batch, owner in zip(plan.batches, plan.batch_file):
        files = {file_of(int(g)) for g in batch}
        assert files == {data.file_names[owner]}
        assert all(negatives_count(int(g)) >= 2 for g in batch)
    used = plan.batches.ravel().tolist()
    assert len(set(used)) == len(used)
    assert len(used) + sum(plan.dropped.values()) == sum(FILES.values())
    assert plan.dropped["empty.jsonl"] == 0
    ineligible = {name: 0 for name in FILES}
    for gid in range(sum(FILES.values())):
        ineligible[file_of(gid)] += negatives_count(gid) < 2
    for name in FILES:
        assert plan.dropped[name] >= ineligible[name]

    one = data.plan(global_batch=4, seed=5, negatives_per_query=1)
    assert sum(one.dropped.values()) == sum(n % 4 for n in FILES.values())


def test_preprocessed_plan_is_deterministic_across_loads(data, tmp_path):
    again = PreprocessedData(tmp_path / "pre")
    a, b = data.plan(8, seed=11, negatives_per_query=2), again.plan(8, seed=11, negatives_per_query=2)
    assert np.array_equal(a.batches, b.batches) and np.array_equal(a.batch_file, b.batch_file)
    assert a.dropped == b.dropped
    c = data.plan(8, seed=12, negatives_per_query=2)
    assert not np.array_equal(a.batches, c.batches)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=MANIFEST_NAME):
        PreprocessedData(tmp_path)


def test_rows_maps_global_ids_to_the_right_file(data):
    total = sum(FILES.values())
    ids = np.array([total - 1, 0, 37, 36, 58, 57, 40], dtype=np.int64)  # 58 = first row of c, after empty
    rows = data.rows(ids)
    for gid, r in zip(ids.tolist(), rows):
        assert r == make_row(gid, r["line"])
        assert r["query"][0] == Q + gid


# --------------------------------------------------------------------------- RankLoader


@pytest.mark.parametrize("global_batch", [4, 8])
def test_rank_slices_concatenate_to_the_single_rank_batch(data, global_batch):
    k = 2
    plan = data.plan(global_batch, seed=3, negatives_per_query=k)
    assert len(plan) >= 4
    single = RankLoader(data, plan, rank=0, world_size=1, pad_id=PAD, negatives_per_query=k)
    assert len(single) == len(plan)
    for world in (1, 2, 4):
        loaders = [RankLoader(data, plan, rank=r, world_size=world, pad_id=PAD, negatives_per_query=k)
                   for r in range(world)]
        for index in range(len(plan)):
            whole = split(single.batch(index), k)
            parts = [split(loader.batch(index), k) for loader in loaders]
            for key in ("queries", "positives", "negatives"):
                joined = [seq for part in parts for seq in part[key]]
                assert joined == whole[key], (world, index, key)
            for part in parts:
                assert len(part["queries"]) == global_batch // world
            # the rows are exactly the planned rows, in plan order
            assert [q[0] - Q for q in whole["queries"]] == plan.batches[index].tolist()
            assert [p[0] - P for p in whole["positives"]] == plan.batches[index].tolist()
            expected_neg = [N + 10 * g + j for g in plan.batches[index].tolist() for j in range(k)]
            assert [n[0] for n in whole["negatives"]] == expected_neg


def test_rank_batches_match_stored_rows(data):
    plan = data.plan(4, seed=0, negatives_per_query=2)
    loader = RankLoader(data, plan, rank=1, world_size=2, pad_id=PAD, negatives_per_query=2)
    parts = split(loader.batch(0), 2)
    gids = plan.batches[0, 2:4].tolist()
    assert parts["queries"] == [make_row(g, 0)["query"] for g in gids]
    assert parts["positives"] == [make_row(g, 0)["positive"] for g in gids]
    assert parts["negatives"] == [make_row(g, 0)["negatives"][j] for g in gids for j in range(2)]


@pytest.mark.parametrize("world, rank", [(1, 0), (2, 1), (4, 2)])
def test_starting_at_any_index_gives_the_same_batches(data, tmp_path, world, rank):
    plan = data.plan(8, seed=9, negatives_per_query=2)
    loader = RankLoader(data, plan, rank=rank, world_size=world, pad_id=PAD, negatives_per_query=2)
    from_zero = list(loader.batches())
    assert [i for i, _ in from_zero] == list(range(len(plan)))
    # a resumed run: fresh data, fresh plan from the same seed, starting mid-way
    resumed_data = PreprocessedData(tmp_path / "pre")
    resumed = RankLoader(resumed_data, resumed_data.plan(8, seed=9, negatives_per_query=2), rank=rank,
                         world_size=world, pad_id=PAD, negatives_per_query=2)
    for start in (0, 1, len(plan) // 2, len(plan) - 1):
        tail = list(resumed.batches(start))
        assert [i for i, _ in tail] == list(range(start, len(plan)))
        for (i, got), (j, want) in zip(tail, from_zero[start:]):
            assert i == j
            assert got.keys() == want.keys()
            for key in want:
                assert torch.equal(got[key], want[key]), (start, i, key)
    assert list(loader.batches(len(plan))) == []


def test_world_size_must_divide_the_global_batch(data):
    plan = data.plan(8, seed=0, negatives_per_query=2)
    with pytest.raises(ValueError, match="not divisible"):
        RankLoader(data, plan, rank=0, world_size=3, pad_id=PAD)


def test_rank_loader_pads_with_the_given_id(data):
    plan = data.plan(4, seed=0, negatives_per_query=1)
    batch = RankLoader(data, plan, rank=0, world_size=1, pad_id=-5, negatives_per_query=1).batch(0)
    for ids_key, mask_key in (("query_ids", "query_mask"), ("doc_ids", "doc_mask")):
        ids, mask = batch[ids_key], batch[mask_key]
        assert torch.all(ids[mask == 0] == -5)
        assert torch.all(mask[:, -1] == 1)  # every sequence ends at the last position
    assert batch["doc_ids"].shape[0] == 4 * 2


# --------------------------------------------------------------------------- left_pad


def test_left_pad_pads_on_the_left_with_id_and_mask():
    ids, mask = left_pad([[5, 6, 7], [8], [9, 10]], pad_id=99)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [99, 99, 8], [99, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_left_pad_equal_lengths_and_empty_sequence():
    ids, mask = left_pad([[1, 2], [3, 4]], pad_id=0)
    assert ids.tolist() == [[1, 2], [3, 4]] and mask.tolist() == [[1, 1], [1, 1]]
    ids, mask = left_pad([[4, 4], []], pad_id=2)
    assert ids.tolist() == [[4, 4], [2, 2]] and mask.tolist() == [[1, 1], [0, 0]]


def test_pad_id_is_the_pad_token_else_eos():
    assert pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2


def test_batch_plan_len():
    plan = BatchPlan(np.zeros((3, 2), np.int64), np.zeros(3, np.int64), {})
    assert len(plan) == 3
