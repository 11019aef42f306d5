"""Stream echo-format jsonl rows, validating each and counting every skip.

A row is ``{"query": str, "positive": str, "negative": str | [str, ...]}``.
Nothing is dropped silently: each bad row yields a :class:`Skip` with a reason,
so callers can keep ``read == written + skipped``.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data_pipeline.pieces import Piece

log = logging.getLogger(__name__)
MAX_LOGGED_SKIPS = 5


@dataclass
class Row:
    line: int  # 1-based line number in the source file
    query: str
    positive: str
    negatives: list[str]


@dataclass
class Skip:
    line: int
    reason: str


@dataclass
class ReadCounts:
    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)

    def add(self, other: "ReadCounts") -> None:
        self.read += other.read
        self.written += other.written
        self.skipped.update(other.skipped)

    def as_dict(self) -> dict:
        return {"read": self.read, "written": self.written, "skipped": dict(sorted(self.skipped.items()))}


def _text_field(obj: dict, name: str) -> str | None | Skip:
    if name not in obj:
        return None
    value = obj[name]
    if not isinstance(value, str):
        return Skip(0, f"{name}_not_string")
    if not value.strip():
        return Skip(0, f"{name}_empty")
    return value


def parse_line(text: str, line: int, negative_required: bool = True) -> Row | Skip:
    """Validate one jsonl line (``negative_required`` False: a row without a ``negative`` field has none, as
    rows that negatives are mined for may)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return Skip(line, "malformed_json")
    if not isinstance(obj, dict):
        return Skip(line, "not_an_object")
    values = {}
    for name in ("query", "positive"):
        value = _text_field(obj, name)
        if value is None:
            return Skip(line, f"{name}_missing")
        if isinstance(value, Skip):
            return Skip(line, value.reason)
        values[name] = value
    if "negative" not in obj:
        return Row(line, values["query"], values["positive"], []) if not negative_required \
            else Skip(line, "negative_missing")
    negative = obj["negative"]
    negatives = negative if isinstance(negative, list) else [negative]
    if not negatives:
        return Skip(line, "negative_empty")
    for item in negatives:
        if not isinstance(item, str):
            return Skip(line, "negative_not_string")
        if not item.strip():
            return Skip(line, "negative_empty")
    return Row(line, values["query"], values["positive"], negatives)


def _lines(path: Path, piece: Piece | None) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of the whole file or of one piece of it."""
    with open(path, "rb") as handle:
        if piece is None:
            yield from enumerate(handle, start=1)
            return
        handle.seek(piece.start)
        for index in range(piece.lines):
            yield piece.first_line + index, handle.readline()


def read_rows(path: Path, counts: ReadCounts, strict: bool = False, piece: Piece | None = None,
              negative_required: bool = True) -> Iterator[Row]:
    """Yield valid rows of ``path`` (or of one piece of it); update ``counts`` for every line read.

    Blank lines are not rows and are not counted. With ``strict`` the first
    skip raises ``ValueError`` naming file:line.
    """
    logged = 0
    for line_no, raw in _lines(path, piece):
        if not raw.strip():
            continue
        counts.read += 1
        try:
            result = parse_line(raw.decode("utf-8"), line_no, negative_required)
        except UnicodeDecodeError:
            result = Skip(line_no, "not_utf8")
        if isinstance(result, Row):
            yield result
            continue
        counts.skipped[result.reason] += 1
        if strict:
            raise ValueError(f"{path}:{line_no}: bad row ({result.reason}); --strict turns skips into errors")
        if logged < MAX_LOGGED_SKIPS:
            log.warning("skipping %s:%d (%s)", path, line_no, result.reason)
            logged += 1
