"""Stage 1: echo-format jsonl files -> Arrow shards of token ids, cached per file.

One shard per input file, named by a key over (file name, size, mtime,
encoding settings, tokenizer fingerprint, instructions). A re-run with the
same inputs does no work; changing one file re-tokenizes that file only.
Shards and the manifest are written to a temporary name and renamed, so an
interrupted run never leaves a file that a later run trusts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
from tqdm import tqdm

from data_pipeline.reader import ReadCounts, Row, read_rows
from data_pipeline.registry import DATASETS_FILE_NAME, instructions_for, load_extra_instructions
from debater.prompts import EncodingSettings, TextFormatter, resolve_step_tokens

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHUNK_ROWS = 2048
SHARD_SCHEMA = pa.schema([
    ("line", pa.int64()),
    ("query", pa.list_(pa.int32())),
    ("positive", pa.list_(pa.int32())),
    ("negatives", pa.list_(pa.list_(pa.int32()))),
])


class PreprocessError(RuntimeError):
    """Input that cannot be preprocessed; the message says what to fix."""


@dataclass
class FileJob:
    path: Path
    instructions: list[str]
    shard: Path
    tokenizer_dir: str
    settings: dict
    strict: bool


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


def tokenize_file(job: FileJob, progress_position: int = 0) -> dict:
    """Tokenize one jsonl file into ``job.shard``; return its manifest entry."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.tokenizer_dir)
    formatter = TextFormatter(tokenizer, EncodingSettings(**job.settings))
    counts = ReadCounts()
    bar = tqdm(desc=job.path.name, unit=" rows", position=progress_position, leave=False, mininterval=1.0)

    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, SHARD_SCHEMA) as writer:
            chunk: list[Row] = []
            for row in read_rows(job.path, counts, strict=job.strict):
                chunk.append(row)
                if len(chunk) == CHUNK_ROWS:
                    writer.write_batch(_tokenize_chunk(formatter, chunk, job.instructions))
                    counts.written += len(chunk)
                    bar.update(len(chunk))
                    chunk = []
            if chunk:
                writer.write_batch(_tokenize_chunk(formatter, chunk, job.instructions))
                counts.written += len(chunk)
                bar.update(len(chunk))

    write_atomic(job.shard, write)
    bar.close()
    entry = {"file": job.path.name, "shard": job.shard.name, **counts.as_dict()}
    write_atomic(job.shard.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(entry)))
    return entry


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
               datasets_file: Path | None = None) -> dict:
    """Run stage 1 over every jsonl file of ``data_dir``; return the manifest."""
    files = input_files(data_dir)
    extra = load_extra_instructions(datasets_file or data_dir / DATASETS_FILE_NAME)
    instructions = {p.stem: instructions_for(p.stem, extra) for p in files}  # errors before any work
    tokenizer = load_tokenizer(model, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = out_dir / "tokenizer"
    fingerprint = tokenizer_fingerprint(tokenizer)
    marker = tokenizer_dir / "fingerprint.txt"
    if not marker.exists() or marker.read_text() != fingerprint:
        tokenizer.save_pretrained(tokenizer_dir)
        write_atomic(marker, lambda tmp: tmp.write_text(fingerprint))
    settings_dict = settings.to_dict()

    entries: dict[str, dict] = {}
    jobs: list[FileJob] = []
    for path in files:
        key = _shard_key(path, settings_dict, fingerprint, instructions[path.stem])
        shard = out_dir / "shards" / f"{path.stem}-{key}.arrow"
        sidecar = shard.with_suffix(".json")
        if shard.exists() and sidecar.exists():
            entries[path.name] = json.loads(sidecar.read_text())
            if strict and entries[path.name]["skipped"]:
                raise ValueError(f"{path}: rows were skipped ({entries[path.name]['skipped']}); "
                                 "--strict turns skips into errors")
            log.info("%s: cached (%d rows)", path.name, entries[path.name]["written"])
        else:
            jobs.append(FileJob(path, instructions[path.stem], shard, str(tokenizer_dir), settings_dict, strict))
    if jobs:
        workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
        log.info("tokenizing %d file(s) with %d worker(s)", len(jobs), workers)
        if workers == 1:
            results = [tokenize_file(job) for job in jobs]
        else:
            with ProcessPoolExecutor(workers) as pool:
                results = list(pool.map(tokenize_file, jobs, range(len(jobs))))
        for entry in results:
            entries[entry["file"]] = entry
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": str(data_dir.resolve()),
        "model": model,
        "tokenizer_fingerprint": fingerprint,
        "settings": settings_dict,
        "files": [entries[p.name] for p in files],
    }
    total_written = sum(e["written"] for e in manifest["files"])
    if total_written == 0:
        raise PreprocessError(f"no valid rows in {data_dir}: every row was skipped (see the manifest counts)")
    write_atomic(out_dir / MANIFEST_NAME, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
    _remove_stale_shards(out_dir / "shards", {e["shard"] for e in manifest["files"]})
    return manifest


def _remove_stale_shards(shard_dir: Path, keep: set[str]) -> None:
    for path in shard_dir.glob("*.arrow"):
        if path.name not in keep:
            path.unlink()
            path.with_suffix(".json").unlink(missing_ok=True)
