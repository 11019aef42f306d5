"""``python -m debater mine``: hard negatives mined by a model itself, from echo-data to echo-data.

Every query and candidate is encoded as the model retrieves (``inference_encoder``: a query after its file's
instruction, a document with the model's suffix and pooling), so any model the other commands load mines: a
trained output, a base model, a sentence-transformers folder used as a teacher. Each file's pool is, by
default, its own positives and given negatives (batches stay homogeneous); ``--corpus`` names one pool for
every file. The choice itself is ``mining.py``'s.

OUT receives each input file with the same rows and fields, ``negative`` now the mined list, plus the
``datasets.json`` of DATA; ``OUT/mining/`` holds one ``FILE.scores.jsonl`` per file (per written row: the
positive's score, and each negative's score, rank and how it was found) and ``manifest.json``. Everything is
written into a hidden folder beside OUT and renamed to OUT at the end, so an interrupted run leaves no OUT.
Embeddings are cached under ``--cache`` by (model files, settings, texts).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zlib
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipeline.reader import ReadCounts, read_rows
from data_pipeline.registry import DATASETS_FILE_NAME, instructions_for, load_extra_instructions
from data_pipeline.stage_tokenize import input_files, write_atomic
from debater.core.errors import UserError
from debater.mining import (FILTERS, MiningSettings, fill_at_random, normalise_text, score_summary, scores,
                            search_in_chunks, select)
from debater.search import Index

log = logging.getLogger(__name__)
MINING_DIR = "mining"
MANIFEST_NAME = "manifest.json"
CACHE_VERSION = 1


class MiningError(UserError, ValueError):
    """Input or output folders that mining cannot use as given; the message says what to do."""


def model_fingerprint(model: str) -> list:
    """What identifies a model's weights without loading them: its folder's files (and those of a training
    output_dir's adapter/), by name, size and modification time; a hub name stands for itself."""
    folder = Path(model)
    if not folder.is_dir():
        return [model]
    files = [p for p in (*folder.iterdir(), *(folder / "adapter").glob("*")) if p.is_file()]
    return [str(folder.resolve()), sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                                          for p in files)]


class CachedEncoder:
    """The model's query and document embeddings, kept on disk by (model files, settings, texts); the model is
    loaded on the first text that is not cached."""

    def __init__(self, model: str, cache: Path | None, batch_size: int = 32, max_length: int | None = None,
                 base_model: str | None = None):
        self.model, self.cache = model, cache
        self.options = {"batch_size": batch_size, "max_length": max_length, "base_model": base_model}
        self.identity = [CACHE_VERSION, model_fingerprint(model), max_length, base_model]
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None:
            from debater.inference_encoder import load_text_encoder

            self._encoder = load_text_encoder(self.model, **self.options)
        return self._encoder

    def _cached(self, kind: str, texts: list[str], instruction: str | None, compute) -> np.ndarray:
        if self.cache is None:
            return compute()
        digest = hashlib.sha1(json.dumps([*self.identity, kind, instruction]).encode())
        for text in texts:
            digest.update(text.encode("utf-8") + b"\0")
        path = self.cache / f"{kind}-{digest.hexdigest()}.npy"
        if path.exists():
            log.info("embeddings of %d %s from the cache (%s)", len(texts), kind, path.name)
            return np.load(path)
        vectors = compute()
        def save(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.save(handle, vectors)

        write_atomic(path, save)
        return vectors

    def queries(self, texts: list[str], instruction: str) -> np.ndarray:
        return self._cached("queries", texts, instruction, lambda: self.encoder.queries(texts, instruction))

    def documents(self, texts: list[str]) -> np.ndarray:
        return self._cached("documents", texts, None, lambda: self.encoder.documents(texts))


def _query_vectors(rows, instructions: list[str], encoder: CachedEncoder) -> np.ndarray:
    """[rows, D]: each row's query after its line's instruction, each distinct (instruction, query) encoded once.
    When every row is such a distinct pair under one instruction (the usual file), the encoded array is the
    result itself, so the queries are never held twice."""
    keys = [(instructions[(row.line - 1) % len(instructions)], row.query) for row in rows]
    by_instruction: dict[str, list[str]] = defaultdict(list)
    for instruction, text in dict.fromkeys(keys):
        by_instruction[instruction].append(text)
    if len(by_instruction) == 1 and sum(map(len, by_instruction.values())) == len(keys):
        (instruction, texts), = by_instruction.items()
        return encoder.queries(texts, instruction)
    vectors = None
    for instruction, texts in by_instruction.items():
        encoded = encoder.queries(texts, instruction)
        if vectors is None:
            vectors = np.empty((len(keys), encoded.shape[-1]), dtype=encoded.dtype)
        where = {text: i for i, text in enumerate(texts)}
        for r, (row_instruction, text) in enumerate(keys):
            if row_instruction == instruction:
                vectors[r] = encoded[where[text]]
    return vectors


def _own_positives(rows, position: dict[str, int], normalised: dict[str, list[int]],
                   pool_size: int) -> list[tuple[set[int], set[int]]]:
    """Per row, the pool entries that are a positive of its query (any row with the same query text): by
    identity (the same text), and by normalised text only."""
    positives: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        positives[row.query].add(row.positive)
    found = {}
    for query, texts in positives.items():
        same = {position[t] for t in texts if position.get(t, pool_size) < pool_size}
        alike = {i for t in texts for i in normalised.get(normalise_text(t), [])} - same
        found[query] = (same, alike)
    return [found[row.query] for row in rows]


@dataclass
class EncodedFile:
    """One echo file's valid rows, its pool, and their embeddings as the model retrieves."""

    rows: list
    counts: ReadCounts
    pool: list[str]
    pool_ids: list[str] | None
    position: dict[str, int]  # text -> its row in ``documents`` (the pool first, then other positives)
    own: list[tuple[set[int], set[int]]]  # per row: own positives in the pool, by identity and by normalised text
    documents: np.ndarray | None = None
    queries: np.ndarray | None = None

    @property
    def pool_vectors(self) -> np.ndarray:
        return self.documents[:len(self.pool)]

    def depth(self, settings: MiningSettings) -> int:
        """How far each ranking must be searched to reach the window's end once own positives are removed."""
        return min(len(self.pool), settings.rank_window[1] + max(len(a) + len(b) for a, b in self.own))


def encode_file(path: Path, instructions: list[str], corpus: tuple[list[str], list[str]] | None,
                encoder: CachedEncoder) -> EncodedFile:
    """Read one echo file and embed its queries and pool (nothing is encoded when it has no valid row)."""
    counts = ReadCounts()
    rows = list(read_rows(path, counts, negative_required=False))
    if corpus is None:
        pool_ids, pool = None, list(dict.fromkeys(t for row in rows for t in (row.positive, *row.negatives)))
    else:
        pool_ids, pool = corpus
    texts = list(dict.fromkeys([*pool, *(row.positive for row in rows)]))
    position = {text: i for i, text in enumerate(texts)}
    normalised: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(pool):
        normalised[normalise_text(text)].append(i)
    encoded = EncodedFile(rows, counts, pool, pool_ids, position, _own_positives(rows, position, normalised, len(pool)))
    if rows:
        encoded.documents = encoder.documents(texts)
        encoded.queries = _query_vectors(rows, instructions, encoder)
    return encoded


def mine_file(path: Path, instructions: list[str], corpus: tuple[list[str], list[str]] | None,
              encoder: CachedEncoder, settings: MiningSettings, chunk: int, work: Path) -> dict:
    """Mine one echo file into ``work`` (its rows, and its scores sidecar); return its manifest entry."""
    encoded = encode_file(path, instructions, corpus, encoder)
    rows, counts, pool, pool_ids, own = encoded.rows, encoded.counts, encoded.pool, encoded.pool_ids, encoded.own
    entry = {"excluded": Counter(own_positive=0, own_positive_text=0), "dropped": Counter({f: 0 for f in FILTERS}),
             "short": 0, "shortfall": Counter(), "positive_outranked": 0}
    stats: dict[str, list[float]] = {"positive": [], "kept": [], "dropped": []}
    results: dict[int, tuple[list[str], dict]] = {}
    if rows:
        queries, pool_vectors = encoded.queries, encoded.pool_vectors
        index = Index.in_memory(list(range(len(pool))), pool_vectors, encoder.model)
        for r, hits in search_in_chunks(index, queries, encoded.depth(settings), chunk, f"mining {path.name}"):
            row, (same, alike) = rows[r], own[r]
            entry["excluded"]["own_positive"] += len(same)
            entry["excluded"]["own_positive_text"] += len(alike)
            positive_score = float(scores(queries[r], encoded.documents[encoded.position[row.positive]][None])[0])
            rng = np.random.default_rng([settings.seed, zlib.crc32(path.name.encode()), row.line])
            best = next((score for d, score in hits if d not in same | alike), None)
            entry["positive_outranked"] += best is not None and best > positive_score
            chosen = select(hits, same | alike, positive_score, settings, rng)
            entry["dropped"].update(chosen.drops)
            stats["positive"].append(positive_score)
            stats["dropped"] += chosen.dropped_scores
            results[row.line] = _apply_shortfall(row, chosen, queries[r], pool, pool_ids, pool_vectors, same | alike,
                                                 positive_score, settings, rng, entry, stats)
    else:
        log.warning("%s: no valid rows to mine for", path.name)
    written = _write_file(path, work / path.name, work / MINING_DIR / f"{path.stem}.scores.jsonl", results)
    skipped = Counter(counts.skipped)
    for reason in ("short_of_k", "empty_pool"):
        skipped[reason] += entry["shortfall"].pop(f"skipped_{reason}", 0)
    entry = {"file": path.name, "read": counts.read, "written": written,
             "skipped": dict(sorted((k, v) for k, v in skipped.items() if v)), "pool": len(pool),
             "excluded": dict(entry["excluded"]), "dropped": dict(entry["dropped"]), "short": entry["short"],
             "shortfall": dict(entry["shortfall"]), "positive_outranked": entry["positive_outranked"],
             "scores": {name: score_summary(v) for name, v in stats.items()}}
    log.info("%s: read %d, written %d, skipped %s; %d short of %d", path.name, entry["read"], written,
             entry["skipped"] or "none", entry["short"], settings.k)
    if entry["positive_outranked"] > len(rows) / 2:
        log.warning("%s: for %d of %d rows the model scores a candidate above the positive: it does not retrieve "
                    "this data well yet, so its top candidates are mostly its own errors and a positive-aware "
                    "filter drops most of them (%d rows short here); mine with a stronger model (docs/mining.md)",
                    path.name, entry["positive_outranked"], len(rows), entry["short"])
    return entry


def _apply_shortfall(row, chosen, query, pool, pool_ids, pool_vectors, own: set[int], positive_score: float,
                     settings: MiningSettings, rng, entry: dict, stats: dict) -> tuple[list[str], str] | None:
    """The row's negatives and sidecar line (JSON) after the shortfall policy (None: the row is skipped)."""
    picked = [{"text": pool[d], "id": None if pool_ids is None else pool_ids[d], "score": round(s, 6), "rank": rank,
               "how": "mined"} for d, s, rank in chosen.chosen]
    if len(picked) < settings.k:
        entry["short"] += 1
        reason = "empty_pool" if len(own) == len(pool) else "short_of_k"  # empty: nothing but its positives
        if settings.shortfall == "drop":
            entry["shortfall"][f"skipped_{reason}"] += 1
            return None
        if settings.shortfall == "fill":
            avoid = own | chosen.examined
            for d, s in fill_at_random(query, pool_vectors, avoid, settings.k - len(picked), positive_score,
                                       settings, rng):
                picked.append({"text": pool[d], "id": None if pool_ids is None else pool_ids[d],
                               "score": round(s, 6), "rank": None, "how": "filled"})
                entry["shortfall"]["filled"] += 1
        else:  # keep: topped up with the row's given negatives
            for text in row.negatives:
                if len(picked) < settings.k and text not in {p["text"] for p in picked}:
                    picked.append({"text": text, "id": None, "score": None, "rank": None, "how": "given"})
                    entry["shortfall"]["kept_given"] += 1
        if not picked:
            entry["shortfall"][f"skipped_{reason}"] += 1
            return None
    stats["kept"] += [p["score"] for p in picked if p["score"] is not None]
    record = {"line": row.line, "positive_score": round(positive_score, 6),
              "negatives": [{k: v for k, v in p.items() if k != "text"} for p in picked]}
    return [p["text"] for p in picked], json.dumps(record)  # one string per row held until written, not dicts


def _write_file(source: Path, target: Path, sidecar: Path, results: dict[int, tuple[list[str], str] | None]) -> int:
    """Copy the rows that have negatives, every field kept and ``negative`` replaced; write their sidecar."""
    written = 0
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as lines, open(target, "w", encoding="utf-8") as out, \
            open(sidecar, "w", encoding="utf-8") as side:
        for number, raw in enumerate(lines, start=1):
            result = results.get(number)
            if result is None:
                continue
            negatives, record = result
            row = json.loads(raw)
            row["negative"] = negatives
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            side.write(record + "\n")
            written += 1
    return written


def _check_out(data: Path, out: Path, overwrite: bool) -> None:
    if out.resolve() == data.resolve():
        raise MiningError(f"--out {out} is the input folder: write the mined data to a new folder")
    if out.exists() and not overwrite:
        raise MiningError(f"{out} already exists: pass --overwrite to replace it, or another --out")
    if out.exists() and not (out / MINING_DIR / MANIFEST_NAME).exists():
        raise MiningError(f"{out} exists and is not a folder this command wrote (no {MINING_DIR}/{MANIFEST_NAME}): "
                          "pass another --out")


@contextmanager
def published(folder: Path) -> Iterator[Path]:
    """A hidden folder beside ``folder`` to write into; when the block ends without an error it takes
    ``folder``'s place (an earlier one moved aside first) with renames only, so ``folder`` is whole or absent,
    never half-written. On an error nothing is left."""
    work = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
        old = folder.parent / f".{folder.name}.old-{os.getpid()}"
        if folder.exists():
            os.replace(folder, old)
        os.replace(work, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def mine(data: Path, out: Path, model: str, settings: MiningSettings, corpus: Path | None = None,
         cache: Path | None = None, batch_size: int = 32, max_length: int | None = None,
         base_model: str | None = None, chunk: int = 1024, overwrite: bool = False,
         command: str | None = None) -> dict:
    """Mine every echo file of ``data`` into ``out``; return the manifest (also in OUT/mining/manifest.json)."""
    from debater.beir import read_texts

    files = input_files(data)
    extra = load_extra_instructions(data / DATASETS_FILE_NAME)
    instructions = {p.stem: instructions_for(p.stem, extra) for p in files}  # errors before any work
    _check_out(data, out, overwrite)
    if chunk < 1:
        raise MiningError(f"--chunk must be at least 1, got {chunk}")
    pool = read_texts(corpus) if corpus is not None else None
    encoder = CachedEncoder(model, cache, batch_size, max_length, base_model)
    with published(out) as work:
        (work / MINING_DIR).mkdir()
        entries = [mine_file(path, instructions[path.stem], pool, encoder, settings, chunk, work) for path in files]
        if (data / DATASETS_FILE_NAME).exists():
            shutil.copy(data / DATASETS_FILE_NAME, work / DATASETS_FILE_NAME)
        totals = {"read": sum(e["read"] for e in entries), "written": sum(e["written"] for e in entries),
                  "skipped": dict(sum((Counter(e["skipped"]) for e in entries), Counter()))}
        manifest = {"command": command, "model": model, "model_files": model_fingerprint(model),
                    "data": str(data.resolve()), "pool": str(corpus) if corpus else "each file's own positives "
                    "and given negatives", "settings": asdict(settings), "totals": totals,
                    "files": entries}
        (work / MINING_DIR / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
