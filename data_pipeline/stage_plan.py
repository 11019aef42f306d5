"""Stage 2: homogeneous global batches, deterministic for (global batch size, seed).

Each file's rows are shuffled and cut into global-batch chunks (the remainder
is dropped and counted), then the order of all chunks is shuffled. The plan
never looks at the number of ranks: rank r later takes its slice of each batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BatchPlan:
    batches: np.ndarray        # [num_batches, global_batch] global row ids
    batch_file: np.ndarray     # [num_batches] index of the source file of each batch
    dropped: dict[str, int]    # file name -> rows left out (remainder, too few negatives)

    def __len__(self) -> int:
        return len(self.batches)


def plan_batches(file_names: list[str], eligible_rows: list[np.ndarray], global_batch: int,
                 seed: int, total_rows: list[int]) -> BatchPlan:
    """``eligible_rows[f]`` holds the global row ids of file f that may be used."""
    rng = np.random.default_rng(seed)
    chunks, owners, dropped = [], [], {}
    for index, (name, rows) in enumerate(zip(file_names, eligible_rows)):
        shuffled = rng.permutation(rows)
        usable = len(shuffled) - len(shuffled) % global_batch
        dropped[name] = int(total_rows[index] - usable)
        if usable:
            chunks.append(shuffled[:usable].reshape(-1, global_batch))
            owners.append(np.full(usable // global_batch, index))
    if not chunks:
        return BatchPlan(np.zeros((0, global_batch), np.int64), np.zeros(0, np.int64), dropped)
    batches, batch_file = np.concatenate(chunks), np.concatenate(owners)
    order = rng.permutation(len(batches))
    return BatchPlan(batches[order].astype(np.int64), batch_file[order], dropped)
