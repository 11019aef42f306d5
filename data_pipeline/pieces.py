"""Split a jsonl file into line-aligned byte ranges so one big file is tokenized in parallel.

One sequential scan finds the boundaries (and the line number each piece
starts at, so skips still name file:line); workers then seek straight to
their piece.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Piece:
    start: int  # byte offset of the piece's first line
    stop: int  # byte offset just past its last line
    first_line: int  # 1-based number of its first line in the file
    lines: int


def split_lines(path: Path, bytes_per_piece: int) -> list[Piece]:
    """Consecutive whole-line pieces of about ``bytes_per_piece`` bytes covering the whole file."""
    if bytes_per_piece < 1:
        raise ValueError("bytes_per_piece must be >= 1")
    pieces: list[Piece] = []
    start = offset = lines = 0
    first_line = 1
    with open(path, "rb") as handle:
        for raw in handle:
            offset += len(raw)
            lines += 1
            if offset - start >= bytes_per_piece:
                pieces.append(Piece(start, offset, first_line, lines))
                start, first_line, lines = offset, first_line + lines, 0
    if lines:
        pieces.append(Piece(start, offset, first_line, lines))
    return pieces
