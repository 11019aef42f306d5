"""Positive-aware hard-negative selection over dense embeddings (the core of ``python -m debater mine``).

For each query the pool is ranked by score (a multi_view document scores by its best view, as in search and
evaluation). The query's own positives are never candidates: by identity (the same text) and by normalised
text (case, punctuation and spacing aside). The rest are ranked 1, 2, ...; the ranks up to the window's end
are examined, and each examined candidate is dropped by the first filter it fails, in this order:

- ``rank_window``: ranked before the window's start (the very top is where false negatives gather);
- ``max_score``: scores above a fixed ceiling;
- ``absolute_margin``: scores above the positive's score minus a margin;
- ``relative_margin``: scores above a fraction of the positive's score (NV-Retriever's TopK-PercPos, 0.95).

The survivors are sampled (the top ``k``, or ``k`` at random, seeded per row) and a row left with fewer than
``k`` is short. Only the top of each ranking is searched (exact faiss inner products, a chunk of queries at a
time), so memory grows with the pool and the chunk, never with pool x queries.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from tqdm import tqdm

from debater.search import Index

FILTERS = ("rank_window", "max_score", "absolute_margin", "relative_margin")
SAMPLES = ("top", "random")
SHORTFALLS = ("keep", "fill", "drop")


@dataclass
class MiningSettings:
    """How negatives are chosen; recorded in the manifest. A margin or ceiling of None is off."""

    k: int = 4
    relative_margin: float | None = 0.95
    absolute_margin: float | None = None
    max_score: float | None = None
    rank_window: tuple[int, int] = (1, 100)
    sample: str = "top"
    shortfall: str = "keep"
    seed: int = 0

    def __post_init__(self) -> None:
        first, last = self.rank_window
        if self.k < 1:
            raise ValueError(f"the number of negatives must be at least 1, got {self.k}")
        if not 1 <= first <= last:
            raise ValueError(f"the rank window must satisfy 1 <= FIRST <= LAST, got {first} {last}")
        if last - first + 1 < self.k:
            raise ValueError(f"the rank window {first}..{last} holds fewer than the {self.k} negatives asked for: "
                             "widen it or ask for fewer")
        if self.sample not in SAMPLES:
            raise ValueError(f"sample must be one of {SAMPLES}, got {self.sample!r}")
        if self.shortfall not in SHORTFALLS:
            raise ValueError(f"shortfall must be one of {SHORTFALLS}, got {self.shortfall!r}")

    def failed_filter(self, rank: int, score: float, positive_score: float) -> str | None:
        """The first filter that drops a candidate of this rank and score (None: it survives)."""
        if rank < self.rank_window[0]:
            return "rank_window"
        return self.failed_score_filter(score, positive_score)

    def failed_score_filter(self, score: float, positive_score: float) -> str | None:
        """The first of the score filters that drops a candidate of this score (None: it survives)."""
        if self.max_score is not None and score > self.max_score:
            return "max_score"
        if self.absolute_margin is not None and score > positive_score - self.absolute_margin:
            return "absolute_margin"
        if self.relative_margin is not None and score > self.relative_margin * positive_score:
            return "relative_margin"
        return None


def normalise_text(text: str) -> str:
    """The text with case, punctuation, accents' forms and spacing ignored: near-copies compare equal."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[\W_]+", " ", folded).split())


def scores(query: np.ndarray, documents: np.ndarray) -> np.ndarray:
    """[n] inner products of one query with ``documents`` ([n, D], or [n, V, D]: each document's best view)."""
    products = documents @ query
    return products.max(-1) if documents.ndim == 3 else products


def search_in_chunks(index: Index, queries: np.ndarray, depth: int, chunk: int,
                     desc: str) -> Iterator[tuple[int, list[tuple[int, float]]]]:
    """(row, its top ``depth`` (document, score) pairs, best first) for every query, ``chunk`` queries per faiss
    search, with a progress bar: only one chunk's scores are held, and one query's hits become Python objects
    at a time."""
    with tqdm(total=len(queries), desc=desc, unit=" queries", mininterval=2.0) as bar:
        for first in range(0, len(queries), chunk):
            scores, rows = index.top_rows(queries[first:first + chunk], depth)
            for offset in range(len(rows)):
                yield first + offset, index.documents(scores[offset], rows[offset], depth)
            bar.update(len(rows))


@dataclass
class Selection:
    """One query's outcome: chosen (document, score, rank), drops by filter and the dropped scores."""

    chosen: list[tuple[int, float, int]]
    survivors: int
    drops: Counter = field(default_factory=Counter)
    dropped_scores: list[float] = field(default_factory=list)
    examined: set[int] = field(default_factory=set)


def select(hits: list[tuple[int, float]], excluded: set[int], positive_score: float, settings: MiningSettings,
           rng: np.random.Generator) -> Selection:
    """Filter one query's ranked hits (which must reach rank ``rank_window[1]`` after ``excluded`` is removed,
    or the whole pool) and sample up to ``k`` of the survivors, in rank order."""
    survivors: list[tuple[int, float, int]] = []
    selection = Selection([], 0)
    rank = 0
    for document, score in hits:
        if document in excluded:
            continue
        rank += 1
        if rank > settings.rank_window[1]:
            break
        selection.examined.add(document)
        reason = settings.failed_filter(rank, score, positive_score)
        if reason is None:
            survivors.append((document, score, rank))
        else:
            selection.drops[reason] += 1
            selection.dropped_scores.append(score)
    selection.survivors = len(survivors)
    if settings.sample == "top" or len(survivors) <= settings.k:
        selection.chosen = survivors[:settings.k]
    else:
        picked = np.sort(rng.choice(len(survivors), size=settings.k, replace=False))
        selection.chosen = [survivors[i] for i in picked]
    return selection


def fill_at_random(query: np.ndarray, documents: np.ndarray, avoid: set[int], wanted: int, positive_score: float,
                   settings: MiningSettings, rng: np.random.Generator) -> list[tuple[int, float]]:
    """Up to ``wanted`` (document, score) pairs drawn at random from the pool outside ``avoid`` (the own
    positives and every examined candidate), each passing the score filters."""
    filled: list[tuple[int, float]] = []
    for document in rng.permutation(len(documents)):
        if len(filled) == wanted:
            break
        if int(document) in avoid:
            continue
        score = float(scores(query, documents[document:document + 1])[0])
        if settings.failed_score_filter(score, positive_score) is None:
            filled.append((int(document), score))
    return filled


def score_summary(values: list[float]) -> dict:
    """count, mean, min, median and max, rounded for the manifest (the count alone when there are none)."""
    if not values:
        return {"count": 0}
    array = np.asarray(values, dtype=np.float64)
    return {"count": int(array.size), "mean": round(float(array.mean()), 6), "min": round(float(array.min()), 6),
            "median": round(float(np.median(array)), 6), "max": round(float(array.max()), 6)}
