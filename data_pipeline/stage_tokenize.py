"""Stage 1: echo-format jsonl files -> Arrow shards of token ids, cached per file.

One shard per input file, named by a key over (file name, size, mtime,
encoding settings, tokenizer fingerprint, instructions). A re-run with the
same inputs does no work; changing one file re-tokenizes that file only.
Such a re-run does not even load the tokenizer: the one saved beside the
shards is reused while the model folder's files, the tokenizer libraries'
versions and the settings are those it was saved from (``TOKENIZER_SOURCE``).
Files are cut into line-aligned pieces that worker processes (one per core)
tokenize in parallel; each file's parts are then joined into its shard.
Shards and the manifest are written to a temporary name and renamed, so an
interrupted run never leaves a file that a later run trusts.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.ipc as ipc
from tqdm import tqdm

from data_pipeline.mine import MineCounts, mine_bm25, mined_for_lines
from data_pipeline.pieces import Piece, split_lines
from data_pipeline.reader import ReadCounts, Row, read_rows
from data_pipeline.registry import DATASETS_FILE_NAME, instructions_for, load_extra_instructions
from debater.core.errors import UserError
from debater.core.prompts import EncodingSettings, TextFormatter, resolve_step_tokens

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
TOKENIZER_SOURCE = "source.json"  # in OUT/tokenizer/: what the saved tokenizer was made from
CHUNK_ROWS = 2048  # rows per Arrow record batch
PIECES_PER_WORKER = 4  # enough pieces to keep every worker busy to the end
MIN_PIECE_BYTES, MAX_PIECE_BYTES = 1 << 18, 1 << 24  # not too small to pay off, not too big to balance
PARTS_PREFIX = ".parts-"
SHARD_SCHEMA = pa.schema([
    ("line", pa.int64()),
    ("query", pa.list_(pa.int32())),
    ("positive", pa.list_(pa.int32())),
    ("negatives", pa.list_(pa.list_(pa.int32()))),
])


class PreprocessError(UserError):
    """Input that cannot be preprocessed; the message says what to fix."""


@dataclass
class PieceJob:
    """Tokenize one piece of one input file into a part shard."""

    path: Path
    piece: Piece
    instructions: list[str]
    part: Path
    strict: bool
    mined: Path | None = None  # this file's mined negatives, when mining is on


@dataclass
class FileWork:
    """An input file whose shard must be (re)built from its pieces' parts."""

    path: Path
    shard: Path
    jobs: list[PieceJob]
    mined: MineCounts | None = None


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the ids a text maps to could change."""
    state = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer)
    return hashlib.sha1(state.encode()).hexdigest()[:16]


def write_atomic(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path`` (same folder, so the rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def tokenizer_source(model: str, settings: EncodingSettings) -> str | None:
    """A key over everything the prepared tokenizer depends on: the model folder's files (name, size, mtime, as
    the shard keys judge input files), the versions of transformers and tokenizers, and the settings before
    step tokens are resolved. None for a hub name, which has no files to check."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    try:
        versions = [importlib.metadata.version(name) for name in ("transformers", "tokenizers")]
    except importlib.metadata.PackageNotFoundError:
        return None
    key = json.dumps([FORMAT_VERSION, files, versions, settings.to_dict()], sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()


def saved_tokenizer(tokenizer_dir: Path, source: str | None) -> dict | None:
    """The record of the tokenizer saved in ``tokenizer_dir`` (its fingerprint and step tokens) when it was
    made from ``source`` and is still there whole; else None, and the tokenizer must be loaded."""
    record_path, marker = tokenizer_dir / TOKENIZER_SOURCE, tokenizer_dir / "fingerprint.txt"
    if source is None or not record_path.exists() or not marker.exists():
        return None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("source") != source or record.get("fingerprint") != marker.read_text():
        return None
    return record


def prepare_tokenizer(model: str, settings: EncodingSettings, tokenizer_dir: Path) -> str:
    """Save the model's tokenizer, with its step tokens, into ``tokenizer_dir`` (the workers load it from there)
    and resolve ``settings.step_tokens``; return the tokenizer's fingerprint. When the saved one was made from
    the same model files, library versions and settings, nothing is loaded: its record gives both."""
    source = tokenizer_source(model, settings)
    record = saved_tokenizer(tokenizer_dir, source)
    if record is not None:
        settings.step_tokens = record["step_tokens"]
        return record["fingerprint"]
    tokenizer = load_tokenizer(model, settings)
    tokenizer_dir.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = tokenizer_fingerprint(tokenizer)
    marker = tokenizer_dir / "fingerprint.txt"
    if not marker.exists() or marker.read_text() != fingerprint:
        tokenizer.save_pretrained(tokenizer_dir)
        write_atomic(marker, lambda tmp: tmp.write_text(fingerprint))
    if source is not None:
        record = {"source": source, "fingerprint": fingerprint, "step_tokens": settings.step_tokens}
        write_atomic(tokenizer_dir / TOKENIZER_SOURCE, lambda tmp: tmp.write_text(json.dumps(record)))
    return fingerprint


def load_tokenizer(model: str, settings: EncodingSettings):
    """The model's tokenizer with the step tokens resolved (added if it lacks them)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise PreprocessError(f"cannot load a tokenizer from '{model}': {str(err).splitlines()[0]}") from None
    resolve_step_tokens(tokenizer, settings)
    return tokenizer


def _tokenize_chunk(formatter: TextFormatter, rows: list[Row], instructions: list[str]) -> pa.RecordBatch:
    queries = formatter.queries([r.query for r in rows],
                                [instructions[(r.line - 1) % len(instructions)] for r in rows])
    counts = [len(r.negatives) for r in rows]
    docs = formatter.documents([r.positive for r in rows] + [n for r in rows for n in r.negatives])
    positives, flat_negatives = docs[:len(rows)], docs[len(rows):]
    negatives, start = [], 0
    for n in counts:
        negatives.append(flat_negatives[start:start + n])
        start += n
    return pa.RecordBatch.from_arrays(
        [pa.array([r.line for r in rows], pa.int64()), pa.array(queries, pa.list_(pa.int32())),
         pa.array(positives, pa.list_(pa.int32())), pa.array(negatives, pa.list_(pa.list_(pa.int32())))],
        schema=SHARD_SCHEMA)


_formatter: TextFormatter | None = None  # one per worker process


def start_worker(tokenizer_dir: str, settings: dict, parallel_tokenizer: bool) -> None:
    """Load the saved tokenizer once per worker; with one worker per core, one thread each."""
    global _formatter
    if not parallel_tokenizer:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    _formatter = TextFormatter(AutoTokenizer.from_pretrained(tokenizer_dir), EncodingSettings(**settings))


def tokenize_piece(job: PieceJob) -> ReadCounts:
    """Stream one piece's rows into ``job.part`` in record batches of CHUNK_ROWS rows."""
    counts = ReadCounts()
    last_line = job.piece.first_line + job.piece.lines - 1
    mined = mined_for_lines(job.mined, job.piece.first_line, last_line) if job.mined else {}

    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, SHARD_SCHEMA) as writer:
            chunk: list[Row] = []
            for row in read_rows(job.path, counts, strict=job.strict, piece=job.piece):
                row.negatives += mined.get(row.line, [])
                chunk.append(row)
                if len(chunk) == CHUNK_ROWS:
                    writer.write_batch(_tokenize_chunk(_formatter, chunk, job.instructions))
                    counts.written += len(chunk)
                    chunk = []
            if chunk:
                writer.write_batch(_tokenize_chunk(_formatter, chunk, job.instructions))
                counts.written += len(chunk)

    write_atomic(job.part, write)
    return counts


def _assemble(parts: list[Path], shard: Path) -> None:
    """Concatenate the parts' record batches, in piece order, into the file's one shard."""
    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, SHARD_SCHEMA) as writer:
            for part in parts:
                with pa.memory_map(str(part), "r") as source:
                    reader = ipc.open_file(source)
                    for index in range(reader.num_record_batches):
                        writer.write_batch(reader.get_batch(index))

    write_atomic(shard, write)


def _tokenized(jobs: list[PieceJob], tokenizer_dir: str, settings: dict,
               workers: int) -> Iterator[tuple[int, ReadCounts]]:
    """Tokenize every piece, over worker processes, yielding (job index, counts) as each finishes."""
    with tqdm(total=sum(j.piece.lines for j in jobs), desc="tokenizing", unit=" rows", unit_scale=True,
              mininterval=1.0) as bar:
        if workers == 1:
            start_worker(tokenizer_dir, settings, parallel_tokenizer=True)
            for index, job in enumerate(jobs):
                counts = tokenize_piece(job)
                bar.update(job.piece.lines)
                yield index, counts
            return
        pool = ProcessPoolExecutor(workers, initializer=start_worker, initargs=(tokenizer_dir, settings, False))
        try:
            futures = {pool.submit(tokenize_piece, job): index for index, job in enumerate(jobs)}
            for future in as_completed(futures):
                index = futures[future]
                bar.update(jobs[index].piece.lines)
                yield index, future.result()
        finally:
            pool.shutdown(cancel_futures=True)


def _build_shards(works: list[FileWork], tokenizer_dir: str, settings: dict, workers: int) -> list[dict]:
    """Tokenize all pieces; each file's shard is assembled as soon as its last piece is done."""
    owned = [(w, job) for w, work in enumerate(works) for job in work.jobs]
    totals = [ReadCounts() for _ in works]
    remaining = [len(work.jobs) for work in works]
    # an empty input file has no piece but still gets its (empty) shard and counts
    entries = [None if work.jobs else _finish_file(work, totals[w]) for w, work in enumerate(works)]
    workers = max(1, min(workers, len(owned)))
    log.info("tokenizing %d file(s), %d piece(s), with %d worker(s)", len(works), len(owned), workers)
    for index, piece_counts in _tokenized([job for _, job in owned], tokenizer_dir, settings, workers):
        w = owned[index][0]
        totals[w].add(piece_counts)
        remaining[w] -= 1
        if remaining[w] == 0:
            entries[w] = _finish_file(works[w], totals[w])
    return entries


def _finish_file(work: FileWork, total: ReadCounts) -> dict:
    """Assemble the file's shard from its parts and write its sidecar; return its manifest entry."""
    _assemble([job.part for job in work.jobs], work.shard)
    entry = {"file": work.path.name, "shard": work.shard.name, **total.as_dict()}
    if work.mined:
        entry["mined"] = work.mined.as_dict()
    write_atomic(work.shard.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(entry)))
    return entry


def _prepare_jobs(works: list[FileWork], instructions: dict[str, list[str]], parts_dir: Path, strict: bool,
                  mine_k: int, workers: int) -> None:
    """Mine negatives (when asked) and cut every file into pieces sized to keep all workers busy."""
    total = sum(work.path.stat().st_size for work in works)
    piece_bytes = max(MIN_PIECE_BYTES, min(MAX_PIECE_BYTES, total // (workers * PIECES_PER_WORKER) + 1))
    parts_dir.mkdir(parents=True, exist_ok=True)
    for work in works:
        mined = parts_dir / f"{work.shard.stem}.mined.arrow" if mine_k else None
        if mined:
            log.info("%s: mining %d BM25 negatives per query", work.path.name, mine_k)
            work.mined = mine_bm25(work.path, mine_k, mined, threads=workers)
        work.jobs = [PieceJob(work.path, piece, instructions[work.path.stem],
                              parts_dir / f"{work.shard.stem}-{index:05d}.arrow", strict, mined)
                     for index, piece in enumerate(split_lines(work.path, piece_bytes))]


def _shard_key(path: Path, settings: dict, fingerprint: str, instructions: list[str]) -> str:
    stat = path.stat()
    key = json.dumps([FORMAT_VERSION, path.name, stat.st_size, stat.st_mtime_ns, settings, fingerprint,
                      instructions], sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def input_files(data_dir: Path) -> list[Path]:
    if not data_dir.is_dir():
        raise PreprocessError(f"input folder not found or not a folder: {data_dir}")
    try:
        files = sorted(p for p in data_dir.iterdir() if p.suffix == ".jsonl" and p.is_file())
    except PermissionError:
        raise PreprocessError(f"cannot read input folder {data_dir} (permission denied)") from None
    if not files:
        raise PreprocessError(f"no .jsonl files in {data_dir}")
    return files


def preprocess(data_dir: Path, out_dir: Path, model: str, settings: EncodingSettings,
               strict: bool = False, workers: int | None = None,
               datasets_file: Path | None = None, mine_k: int = 0) -> dict:
    """Run stage 1 over every jsonl file of ``data_dir``; return the manifest.

    ``mine_k`` > 0 first adds that many BM25 hard negatives per query (see mine.py).
    """
    files = input_files(data_dir)
    extra = load_extra_instructions(datasets_file or data_dir / DATASETS_FILE_NAME)
    instructions = {p.stem: instructions_for(p.stem, extra) for p in files}  # errors before any work
    tokenizer_dir = out_dir / "tokenizer"
    fingerprint = prepare_tokenizer(model, settings, tokenizer_dir)
    settings_dict = settings.to_dict()

    entries: dict[str, dict] = {}
    works: list[FileWork] = []
    parts_dir = out_dir / "shards" / f"{PARTS_PREFIX}{os.getpid()}"
    for path in files:
        key = _shard_key(path, {**settings_dict, "mine_bm25": mine_k}, fingerprint, instructions[path.stem])
        shard = out_dir / "shards" / f"{path.stem}-{key}.arrow"
        sidecar = shard.with_suffix(".json")
        if shard.exists() and sidecar.exists():
            entries[path.name] = json.loads(sidecar.read_text())
            if strict and entries[path.name]["skipped"]:
                raise ValueError(f"{path}: rows were skipped ({entries[path.name]['skipped']}); "
                                 "--strict turns skips into errors")
            log.info("%s: cached (%d rows)", path.name, entries[path.name]["written"])
            continue
        works.append(FileWork(path, shard, []))
    workers = workers or os.cpu_count() or 1
    if works:
        try:
            _prepare_jobs(works, instructions, parts_dir, strict, mine_k, workers)
            for entry in _build_shards(works, str(tokenizer_dir), settings_dict, workers):
                entries[entry["file"]] = entry
        finally:
            shutil.rmtree(parts_dir, ignore_errors=True)
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": str(data_dir.resolve()),
        "model": model,
        "tokenizer_fingerprint": fingerprint,
        "settings": settings_dict,
        "mine_bm25": mine_k,
        "instructions": {p.stem: instructions[p.stem] for p in files},
        "files": [entries[p.name] for p in files],
    }
    total_written = sum(e["written"] for e in manifest["files"])
    if total_written == 0:  # no manifest is written then: the counts go in the message
        counts = "; ".join(f"{e['file']}: read {e['read']}, skipped "
                           + (", ".join(f"{n} {reason}" for reason, n in e["skipped"].items()) or "none")
                           for e in manifest["files"])
        raise PreprocessError(f"no valid rows in {data_dir}: every row was skipped ({counts}); fix the rows named "
                              "by the reasons (python -m data_pipeline preprocess --strict stops at the first one)")
    write_atomic(out_dir / MANIFEST_NAME, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
    _remove_stale_shards(out_dir / "shards", {e["shard"] for e in manifest["files"]})
    return manifest


def _remove_stale_shards(shard_dir: Path, keep: set[str]) -> None:
    """Drop shards no input maps to any more, and parts left by a run that was killed."""
    for folder in shard_dir.glob(f"{PARTS_PREFIX}*"):
        shutil.rmtree(folder, ignore_errors=True)
    for path in shard_dir.glob("*.arrow"):
        if path.name not in keep:
            path.unlink()
            path.with_suffix(".json").unlink(missing_ok=True)
