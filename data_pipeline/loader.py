"""Read preprocessed shards and hand each rank its slice of each planned batch.

Shards are memory-mapped Arrow files, so any number of ranks on any number of
nodes read them without copying. Sequences are left-padded (the embedding
positions are the last ones) with the tokenizer's pad id.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import torch

from data_pipeline.registry import DATASETS_FILE_NAME, RegistryError, instructions_for, load_extra_instructions
from data_pipeline.stage_plan import BatchPlan, plan_batches
from data_pipeline.stage_tokenize import MANIFEST_NAME
from debater.core.padding import left_pad


class PreprocessedData:
    """The shards of one preprocessed folder, addressed by global row id."""

    def __init__(self, folder: Path):
        manifest_path = folder / MANIFEST_NAME
        if not manifest_path.exists():
            raise FileNotFoundError(f"{folder} holds no {MANIFEST_NAME}: run `make preprocess` first")
        self.folder = folder
        self.manifest = json.loads(manifest_path.read_text())
        self.file_names = [e["file"] for e in self.manifest["files"]]
        self.tables: list[pa.Table] = []
        for entry in self.manifest["files"]:
            source = pa.memory_map(str(folder / "shards" / entry["shard"]), "r")
            self.tables.append(ipc.open_file(source).read_all())
        sizes = [t.num_rows for t in self.tables]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def instructions(self) -> dict[str, list[str]]:
        """File stem -> the query instruction(s) its rows were tokenized with, which a trained model records.
        A manifest of an older version lacks them: then the registry of the source folder, if it is still
        there, else none."""
        if "instructions" in self.manifest:
            return self.manifest["instructions"]
        source = Path(self.manifest["source"])
        try:
            extra = load_extra_instructions(source / DATASETS_FILE_NAME)
            return {Path(name).stem: instructions_for(Path(name).stem, extra) for name in self.file_names}
        except RegistryError:
            return {}

    def negative_counts(self, index: int) -> np.ndarray:
        """Hard negatives per row of file ``index``."""
        return pc.list_value_length(self.tables[index].column("negatives")).to_numpy(zero_copy_only=False)

    def most_negatives(self) -> int:
        """The largest number of hard negatives any row has."""
        return max((int(self.negative_counts(i).max(initial=0)) for i in range(len(self.tables))), default=0)

    def plan(self, global_batch: int, seed: int, negatives_per_query: int = 1) -> BatchPlan:
        eligible = []
        for index in range(len(self.tables)):
            counts = self.negative_counts(index)
            eligible.append(self.offsets[index] + np.flatnonzero(counts >= negatives_per_query))
        return plan_batches(self.file_names, eligible, global_batch, seed, [t.num_rows for t in self.tables])

    def rows(self, row_ids: np.ndarray) -> list[dict]:
        """The tokenized rows for global ids (all from one file in a planned batch)."""
        file_index = np.searchsorted(self.offsets, row_ids, side="right") - 1
        result: list[dict] = [{}] * len(row_ids)
        for f in np.unique(file_index):
            positions = np.flatnonzero(file_index == f)
            local = pa.array(row_ids[positions] - self.offsets[f])
            for position, row in zip(positions, self.tables[f].take(local).to_pylist()):
                result[position] = row
        return result


class RankLoader:
    """Batches for one rank: its contiguous slice of each global batch, from any start index."""

    def __init__(self, data: PreprocessedData, plan: BatchPlan, rank: int, world_size: int,
                 pad_id: int, negatives_per_query: int = 1):
        global_batch = plan.batches.shape[1]
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        self.data, self.plan, self.pad_id, self.k = data, plan, pad_id, negatives_per_query
        self.per_rank = global_batch // world_size
        self.global_batch = global_batch
        self.rank = rank

    def __len__(self) -> int:
        return len(self.plan)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """This rank's queries [b, Lq] and documents [b * (1 + k), Ld] (all positives, then each row's k
        negatives), with ids, masks and one key per text (see ``text_keys``)."""
        ids = self.plan.batches[index, self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        rows = self.data.rows(ids)
        query_ids, query_mask = left_pad([r["query"] for r in rows], self.pad_id)
        docs = [r["positive"] for r in rows] + [r["negatives"][j] for r in rows for j in range(self.k)]
        doc_ids, doc_mask = left_pad(docs, self.pad_id)
        query_keys, doc_keys = self.text_keys(index)
        return {"query_ids": query_ids, "query_mask": query_mask, "doc_ids": doc_ids, "doc_mask": doc_mask,
                "query_keys": query_keys, "doc_keys": doc_keys}

    def text_keys(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A number per text that names it whatever the world size: (batch, global row, role), role 0 for
        the query, 1 the positive, 2 + j the j-th negative. LoRA dropout masks are drawn from it."""
        roles = 2 + self.k
        rows = index * self.plan.batches.shape[1] + self.rank * self.per_rank + torch.arange(self.per_rank)
        negatives = (rows[:, None] * roles + 2 + torch.arange(self.k)).reshape(-1)
        return rows * roles, torch.cat([rows * roles + 1, negatives])

    def batches(self, start: int = 0):
        for index in range(start, len(self)):
            yield index, self.batch(index)
