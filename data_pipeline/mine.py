"""Optional stage: mine k extra hard negatives per query with BM25 (bm25s).

Candidates are the positives of the same file, so a homogeneous batch keeps
its negatives from its own source. A query never gets its own positive (or a
document with the same text), nor one of its given negatives twice. The
result is written to an Arrow file that the tokenizing workers read by line
number; the counts go in the manifest.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from data_pipeline.reader import ReadCounts, read_rows

log = logging.getLogger(__name__)
MINED_SCHEMA = pa.schema([("line", pa.int64()), ("negatives", pa.list_(pa.string()))])
EXTRA_CANDIDATES = 4  # retrieved beyond k, to replace hits that are excluded


@dataclass
class MineCounts:
    method: str
    k: int
    queries: int = 0
    added: int = 0
    short: int = 0  # queries that got fewer than k (no lexical overlap, or a small file)
    own_positive_excluded: int = 0

    def as_dict(self) -> dict:
        return dict(vars(self))


def mine_bm25(path: Path, k: int, out: Path, threads: int = 1) -> MineCounts:
    """Write ``out`` (line -> mined negative texts) for every valid row of ``path``."""
    import bm25s
    from bm25s.tokenization import Tokenizer

    logging.getLogger("bm25s").setLevel(logging.NOTSET)  # its import sets DEBUG: follow the command's level instead
    rows = list(read_rows(path, ReadCounts()))
    counts = MineCounts("bm25", k, queries=len(rows))
    corpus = list(dict.fromkeys(row.positive for row in rows))
    lines, mined = [], []
    if rows:
        tokenizer = Tokenizer(stopwords="en")
        retriever = bm25s.BM25()
        retriever.index(tokenizer.tokenize(corpus, return_as="ids", show_progress=False), show_progress=False)
        query_ids = tokenizer.tokenize([row.query for row in rows], update_vocab=False, return_as="ids",
                                       show_progress=False)
        wanted = min(len(corpus), k + EXTRA_CANDIDATES + max(len(row.negatives) for row in rows))
        hits, scores = retriever.retrieve(query_ids, k=wanted, show_progress=False, n_threads=threads)
        for row, row_hits, row_scores in zip(rows, np.asarray(hits), np.asarray(scores)):
            chosen = _choose(row.positive, row.negatives, [corpus[h] for h, s in zip(row_hits, row_scores) if s > 0],
                             k, counts)
            lines.append(row.line)
            mined.append(chosen)
    table = pa.table([pa.array(lines, pa.int64()), pa.array(mined, pa.list_(pa.string()))], schema=MINED_SCHEMA)
    with pa.OSFile(str(out), "wb") as sink, ipc.new_file(sink, MINED_SCHEMA) as writer:
        writer.write_table(table)
    log.info("%s: mined %d negatives for %d queries (%d short of %d)", path.name, counts.added, counts.queries,
             counts.short, k)
    return counts


def _choose(positive: str, given: list[str], candidates: list[str], k: int, counts: MineCounts) -> list[str]:
    """The first k candidates that are neither the positive nor already a negative of the row."""
    chosen: list[str] = []
    for text in candidates:
        if text == positive:
            counts.own_positive_excluded += 1
        elif text not in given and text not in chosen:
            chosen.append(text)
        if len(chosen) == k:
            break
    counts.added += len(chosen)
    counts.short += len(chosen) < k
    return chosen


def mined_for_lines(path: Path, first_line: int, last_line: int) -> dict[int, list[str]]:
    """The mined negatives of the rows in [first_line, last_line] (one piece's worth)."""
    with pa.memory_map(str(path), "r") as source:
        table = ipc.open_file(source).read_all()
    line = table.column("line").to_numpy()
    start, stop = np.searchsorted(line, [first_line, last_line + 1])
    part = table.slice(start, stop - start).to_pydict()
    return dict(zip(part["line"], part["negatives"]))
