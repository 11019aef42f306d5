"""The Python API: a trained model (or any model the CLI takes) as an object that embeds and searches.

    from debater import Retriever
    retriever = Retriever.load("runs/demo")
    queries = retriever.encode_queries(["pdf viewer"])           # the model's own instruction
    documents = retriever.encode_documents(["A PDF viewer ..."])  # the suffix, step tokens and pooling
    hits = retriever.search(["pdf viewer"], ["A PDF viewer ...", "A mail client ..."], top_k=1)

It is a thin face over ``inference_encoder.TextEncoder``, which ``encode``, ``search`` and ``eval`` use too,
so the API gives the command line's embeddings.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from debater.inference_encoder import TextEncoder, load_text_encoder
from debater.search import Index

log = logging.getLogger(__name__)


class Retriever:
    """Embeddings (L2-normalised float32 arrays) and top-k search with one model."""

    def __init__(self, text_encoder: TextEncoder, name: str):
        self.text_encoder = text_encoder
        self.name = name

    @classmethod
    def load(cls, path: str | Path, batch_size: int = 32, max_length: int | None = None,
             devices: list[str] | None = None, base_model: str | None = None,
             trust_remote_code: bool = False) -> "Retriever":
        """A training output_dir, an exported (adapter or merged) folder, or a base model, from any working
        directory. ``devices``: e.g. ["cuda:0", "cuda:1"] (default: every GPU, else the CPU);
        ``max_length``: truncate texts to this many tokens (a document keeps its suffix);
        ``base_model``: the base model folder of an adapter, in place of the one it records."""
        return cls(load_text_encoder(str(path), batch_size, max_length, devices,
                                     trust_remote_code=trust_remote_code, base_model=base_model), str(path))

    @property
    def instructions(self) -> dict[str, list[str]]:
        """Each training file's query instruction(s), as the model recorded them."""
        return self.text_encoder.instructions

    @property
    def default_instruction(self) -> str:
        """What ``encode_queries`` uses when no instruction is given."""
        return self.text_encoder.default_instruction

    def encode_queries(self, texts: list[str], instruction: str | None = None) -> np.ndarray:
        """[N, D]: each query after ``instruction`` (default: the one the model was trained with)."""
        return self.text_encoder.queries(list(texts), instruction)

    def encode_documents(self, texts: list[str], all_views: bool = False) -> np.ndarray:
        """[N, D] as the model's pooling embeds documents ([N, V, D] for a multi_view model); with
        ``all_views``, [N, V, D]: every deliberation step's view."""
        texts = list(texts)
        return self.text_encoder.document_views(texts) if all_views else self.text_encoder.documents(texts)

    def search(self, queries: list[str], documents_or_index, top_k: int = 10,
               instruction: str | None = None) -> list[list[tuple[str | int, float]]]:
        """Per query, up to ``top_k`` (document, score) pairs, best first (a multi_view model scores a document
        by its best view). ``documents_or_index``: a list of texts (documents named by their position), a
        folder written by ``python -m debater encode`` (named by their ids), or an ``Index``."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if isinstance(documents_or_index, Index):
            index = documents_or_index
        elif isinstance(documents_or_index, (str, Path)):
            index = Index(Path(documents_or_index))
        else:
            documents = list(documents_or_index)
            index = Index.in_memory(list(range(len(documents))), self.encode_documents(documents), self.name)
        if index.meta["model"] != self.name:
            log.warning("%s was encoded with %s, the queries with %s: scores mean nothing unless they are the "
                        "same model", index.folder, index.meta["model"], self.name)
        return index.search(self.encode_queries(queries, instruction), top_k)
