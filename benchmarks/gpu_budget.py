"""The GPU check's time budget as data: each part's limit (when it is stopped) and reserve (what the budget sets
aside for it: the limit plus the time to stop its processes and write the report).

A GPU is lent for minutes, so the numbers must add up: the parts run one after another, each is stopped at its
limit, and every reserve covers its limit, so no part can eat another's share and the outer timeout (the total
of the reserves, set-up included, plus a margin) never cuts a part. The limits are estimates until a GPU run
measures the parts (the report gives each part's seconds next to its limit). Standard library only: the GPU
machine's set-up script reads it before anything is installed.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    limit: int  # seconds: the part is stopped at this point
    reserve: int  # seconds set aside for it: the limit, stopping its processes and writing the report


@dataclass(frozen=True)
class TrainingShare:
    """How the training part's limit is spent: the arms train, then a deadline stop, then the exports."""
    stop: int  # stopping every process under the launches
    export: int  # exporting one stopped arm's last checkpoint
    first_checkpoint: int  # an arm without a checkpoint at the deadline may run this much longer to publish one


# In the order the check runs them: the most valuable evidence first. `setup` is the set-up script's
# (launch/gpu_check.sh: the wheelhouse joined, checked and installed); the rest are benchmarks/gpu_check.py's.
GPU_PARTS = {
    "setup": Part(limit=45, reserve=50),
    "preflight": Part(limit=30, reserve=35),
    "model": Part(limit=50, reserve=55),  # the GGUF conversion and its special-token check
    "attention": Part(limit=45, reserve=50),
    "timing": Part(limit=50, reserve=55),
    "training": Part(limit=130, reserve=140),
    "evaluation": Part(limit=75, reserve=80),
    "throughput": Part(limit=90, reserve=95),
}
GPU_TRAINING = TrainingShare(stop=10, export=10, first_checkpoint=15)
GPU_CHECKPOINT_EVERY = 5  # steps: a run stopped at the deadline is judged on its last checkpoint
MARGIN = 20  # seconds of the outer timeout beyond every reserve (the interpreter's start, the last report)

# the smoke run on a shared 2-core CPU machine: generous, so a busy machine slows it down instead of failing it
SMOKE_PARTS = {**{name: Part(limit=300, reserve=300) for name in GPU_PARTS}, "training": Part(limit=450, reserve=450)}
SMOKE_TRAINING = TrainingShare(stop=30, export=30, first_checkpoint=60)
SMOKE_CHECKPOINT_EVERY = 1


def total(parts: dict[str, Part]) -> int:
    return sum(part.reserve for part in parts.values())


def outer_timeout(parts: dict[str, Part] = GPU_PARTS) -> int:
    """The seconds to give the whole `make gpu-check` (set-up included) from outside."""
    return total(parts) + MARGIN


def training_deadline(limit: float, share: TrainingShare, arms: int) -> float:
    """Seconds after the training part starts at which running arms are stopped (once each has a checkpoint): what
    is left of its limit after the last arm's wait for a first checkpoint, stopping, and every arm's export."""
    return limit - share.first_checkpoint - share.stop - arms * share.export


def table(parts: dict[str, Part] = GPU_PARTS) -> str:
    """The budget as a Markdown table (docs/gpu-check.md carries it; a test keeps the two equal)."""
    lines = ["| part | limit (s) | reserve (s) |", "|---|---|---|"]
    lines += [f"| {name} | {part.limit} | {part.reserve} |" for name, part in parts.items()]
    lines += [f"| **total** | {sum(p.limit for p in parts.values())} | {total(parts)} |",
              f"| **outer timeout** (total + {MARGIN} s margin) | | {outer_timeout(parts)} |"]
    return "\n".join(lines)


if __name__ == "__main__":  # launch/gpu_check.sh: `python3 -m benchmarks.gpu_budget unpack` prints that limit
    print(GPU_PARTS[sys.argv[1]].limit if len(sys.argv) > 1 else table())
