"""``python -m debater encode``: document embeddings on disk, with their ids in order.

Two formats hold the same thing: ``npy`` (embeddings.npy + ids.json) for numpy
and faiss users, ``arrow`` (embeddings.arrow, one row per document: ``id`` and
a flat ``embedding``) for pyarrow/datasets users. meta.json records the model,
the shape ([N, D], or [N, V, D] for a multi_view model) and the format; it is
written last, so a folder without it is incomplete.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
META_FILE = "meta.json"
FORMATS = ("npy", "arrow")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def save_embeddings(folder: Path, ids: list[str], vectors: np.ndarray, fmt: str, meta: dict) -> None:
    """Write ``vectors`` (row i belongs to ``ids[i]``) in ``fmt``, then meta.json."""
    _check_format(fmt)
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids but {len(vectors)} embeddings")
    folder.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if fmt == "npy":
        np.save(folder / "embeddings.npy", vectors)
        (folder / "ids.json").write_text(json.dumps(ids))
    else:
        import pyarrow as pa

        flat = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), int(np.prod(vectors.shape[1:])))
        table = pa.table({"id": pa.array(ids, pa.string()), "embedding": flat})
        with pa.OSFile(str(folder / "embeddings.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / META_FILE).write_text(json.dumps({**meta, "format": fmt, "shape": list(vectors.shape)}, indent=2))


def load_embeddings(folder: Path) -> tuple[list[str], np.ndarray, dict]:
    """(ids, float32 vectors of meta's shape, meta) of a folder written by save_embeddings."""
    meta_path = folder / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{folder} holds no {META_FILE}: make it with "
                                f"`python -m debater encode --out {folder}`")
    meta = json.loads(meta_path.read_text())
    if meta["format"] == "npy":
        vectors = np.load(folder / "embeddings.npy", mmap_mode="r")
        ids = json.loads((folder / "ids.json").read_text())
    else:
        import pyarrow as pa

        table = pa.ipc.open_file(pa.memory_map(str(folder / "embeddings.arrow"))).read_all()
        ids = table["id"].to_pylist()
        flat = table["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors = flat.reshape(meta["shape"])
    if list(vectors.shape) != meta["shape"] or len(ids) != meta["shape"][0]:
        raise ValueError(f"{folder}: embeddings {list(vectors.shape)} and {len(ids)} ids do not match "
                         f"{META_FILE}'s shape {meta['shape']}; encode the corpus again")
    return ids, vectors, meta


def encode_corpus(model: str, corpus: Path, out: Path, fmt: str = "npy", batch_size: int = 32,
                  max_length: int | None = None, base_model: str | None = None) -> Path:
    """Embed every document of ``corpus`` (see beir.read_texts) as ``model``'s pooling says, into ``out``."""
    from debater.beir import read_texts
    from debater.inference_encoder import load_text_encoder

    _check_format(fmt)  # before the encoding, which may take hours
    ids, texts = read_texts(corpus)
    text_encoder = load_text_encoder(model, batch_size, max_length, base_model=base_model)
    vectors = text_encoder.documents(texts)
    meta = {"model": model, "pooling": text_encoder.pooling, "corpus": str(corpus),
            "doc_max_length": text_encoder.settings.doc_max_length}
    save_embeddings(out, ids, vectors, fmt, meta)
    log.info("%d documents -> %s %s (%s)", len(ids), fmt, list(vectors.shape), out)
    return out
