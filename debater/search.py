"""``python -m debater search``: the top-k documents for queries, against embeddings made by ``encode``.

An exact inner-product faiss index (the vectors are normalised, so this is
cosine similarity) is built on first use and cached next to the embeddings as
index.faiss; it is rebuilt when the embeddings are newer. A multi_view model's
documents are indexed view by view and a document scores by its best view
(max-sim, as in training and evaluation).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from debater.encode_command import META_FILE, load_embeddings

log = logging.getLogger(__name__)
INDEX_FILE = "index.faiss"


def _faiss():
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs which CPU build it tried
    import faiss

    return faiss


def _flat_index(vectors: np.ndarray):
    """An exact inner-product index holding every row (every view of every document, in order)."""
    dim = vectors.shape[-1]
    index = _faiss().IndexFlatIP(dim)
    index.add(np.ascontiguousarray(vectors.reshape(-1, dim), dtype=np.float32))
    return index


class Index:
    """The faiss index of one embeddings folder, with the document id of every indexed row."""

    def __init__(self, folder: Path):
        faiss = _faiss()
        ids, vectors, self.meta = load_embeddings(folder)
        self.folder, self.ids = folder, ids
        self.views = vectors.shape[1] if vectors.ndim == 3 else 1
        dim = vectors.shape[-1]
        path = folder / INDEX_FILE
        if path.exists() and path.stat().st_mtime >= (folder / META_FILE).stat().st_mtime:
            self.faiss = faiss.read_index(str(path))
            if self.faiss.ntotal == len(ids) * self.views and self.faiss.d == dim:
                log.info("loaded %s (%d vectors)", path, self.faiss.ntotal)
                return
        self.faiss = _flat_index(vectors)
        faiss.write_index(self.faiss, str(path))
        log.info("built %s (%d vectors of dimension %d)", path, self.faiss.ntotal, dim)

    @classmethod
    def in_memory(cls, ids: list, vectors: np.ndarray, model: str) -> "Index":
        """An index over ``vectors`` ([N, D] or [N, V, D]; row i is ``ids[i]``) that is not saved anywhere. It
        searches ``vectors`` in place with faiss's exhaustive kernel, so the vectors are held once, not copied."""
        index = cls.__new__(cls)
        index.folder, index.ids, index.meta = "memory", ids, {"model": model}
        index.views = vectors.shape[1] if vectors.ndim == 3 else 1
        index.faiss = None
        index.vectors = np.ascontiguousarray(vectors.reshape(-1, vectors.shape[-1]), dtype=np.float32)
        return index

    def top_rows(self, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """([queries, n] scores, [queries, n] indexed rows, -1 past the end): the best rows that hold each
        query's ``top_k`` documents."""
        if self.faiss is not None:
            dim, total = self.faiss.d, self.faiss.ntotal
        else:
            total, dim = self.vectors.shape
        if queries.ndim != 2 or queries.shape[1] != dim:
            raise ValueError(f"queries have dimension {queries.shape[-1]} but the index in {self.folder} has "
                             f"{dim}: search with the model that encoded it ({self.meta['model']})")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        depth = min(top_k * self.views, total)  # a document has at most `views` rows
        if self.faiss is not None:
            return self.faiss.search(queries, depth)
        faiss = _faiss()
        return faiss.knn(queries, self.vectors, depth, metric=faiss.METRIC_INNER_PRODUCT)

    def documents(self, row_scores: np.ndarray, row_ids: np.ndarray, top_k: int) -> list[tuple[str, float]]:
        """One query's ``top_rows`` as up to ``top_k`` (document id, score) pairs, best first."""
        best: dict[str, float] = {}
        for score, row in zip(row_scores, row_ids):
            if row >= 0:
                best.setdefault(self.ids[row // self.views], float(score))  # first seen = its best view
        return list(best.items())[:top_k]

    def search(self, queries: np.ndarray, top_k: int) -> list[list[tuple[str, float]]]:
        """Per query, up to ``top_k`` (document id, score) pairs, best first."""
        return [self.documents(s, r, top_k) for s, r in zip(*self.top_rows(queries, top_k))]


def run_search(model: str, index_folder: Path, query_ids: list[str], queries: list[str], instruction: str | None,
               top_k: int = 10, batch_size: int = 32, max_length: int | None = None,
               base_model: str | None = None) -> list[dict]:
    """Encode ``queries`` with ``model`` (``instruction`` None: the model's own) and return one
    {query_id, query, hits: [{id, score}]} per query."""
    from debater.retriever import Retriever

    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    index = Index(index_folder)
    retriever = Retriever.load(model, batch_size, max_length, base_model=base_model)
    log.info("query instruction: %r%s", instruction or retriever.default_instruction,
             "" if instruction else " (the model's)")
    hits = retriever.search(queries, index, top_k, instruction)
    return [{"query_id": qid, "query": text, "hits": [{"id": d, "score": s} for d, s in found]}
            for qid, text, found in zip(query_ids, queries, hits)]


def search_command(args) -> None:
    """The CLI: queries from --queries (a file) or --query (texts); JSON lines to --out or stdout. The query
    instruction: --instruction, else the instruction.txt beside --queries, else the model's own."""
    from debater.beir import INSTRUCTION_FILE, read_instruction, read_texts

    instruction = args.instruction
    if args.queries is not None:
        query_ids, queries = read_texts(args.queries)
        if instruction is None and (args.queries.parent / INSTRUCTION_FILE).exists():
            instruction = read_instruction(args.queries.parent)
    else:
        query_ids, queries = [str(n) for n in range(1, len(args.query) + 1)], args.query
    rows = run_search(args.model, args.index, query_ids, queries, instruction, args.top_k, args.batch_size,
                      args.max_length, args.base_model)
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    if args.out is None:
        print(lines, end="")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(lines)
    print(args.out)
