"""Hand large freed blocks back to the system at once, so an encoding command's peak memory stays flat.

glibc serves a block above its mmap threshold (128 KB at start) with mmap and unmaps it when freed, but each
such free raises the threshold to that block's size (up to 32 MB). Afterwards the encoder's batch tensors come
from the heap, and freed heap memory stays with the process. Measured on MiniLM encoding Debian documents of
256 tokens (docs/mining.md): the peak then varies from run to run and grows with the number of batches;
with the threshold fixed it is flat, and no slower."""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
LARGE_BLOCK_BYTES = 1 << 20


def c_mallopt():
    """The C library's ``mallopt``, or None where it has none (macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return None


def release_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (which also stops its adjustment) for this process.
    Returns whether it applied: False where the C library has no such setting (macOS, musl), left as it is."""
    mallopt = c_mallopt()
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold) == 1
