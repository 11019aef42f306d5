"""Batch encoding for inference: texts sorted by length so each batch pads little."""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_pipeline.loader import left_pad
from debater.model import DebaterEncoder
from debater.prompts import TextFormatter


class TextEncoder:
    """Turns raw strings into normalised embeddings with a DebaterEncoder."""

    def __init__(self, encoder: DebaterEncoder, tokenizer, pooling: str, batch_size: int = 32):
        self.encoder = encoder
        self.formatter = TextFormatter(tokenizer, encoder.settings)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pooling = pooling
        self.batch_size = batch_size
        self.device = next(encoder.parameters()).device
        self.texts_per_s = 0.0

    @torch.no_grad()
    def _run(self, sequences: list[list[int]], encode, desc: str) -> np.ndarray:
        order = np.argsort([-len(s) for s in sequences], kind="stable")
        out: list[torch.Tensor | None] = [None] * len(sequences)
        start = time.perf_counter()
        with tqdm(total=len(sequences), desc=desc, unit=" texts", mininterval=2.0) as bar:
            for first in range(0, len(order), self.batch_size):
                chunk = order[first:first + self.batch_size]
                ids, mask = left_pad([sequences[i] for i in chunk], self.pad_id)
                vectors = F.normalize(encode(ids.to(self.device), mask.to(self.device)).float(), dim=-1).cpu()
                for position, index in enumerate(chunk):
                    out[index] = vectors[position]
                bar.update(len(chunk))
        self.texts_per_s = len(sequences) / max(time.perf_counter() - start, 1e-9)
        return torch.stack(out).numpy()

    def queries(self, texts: list[str], instruction: str) -> np.ndarray:
        """[N, D] normalised query embeddings."""
        ids = self.formatter.queries(texts, [instruction] * len(texts))
        return self._run(ids, self.encoder.encode_queries, "encoding queries")

    def documents(self, texts: list[str]) -> np.ndarray:
        """[N, D] (last step / last token) or [N, V, D] (multi_view), each view normalised."""
        views = self._run(self.formatter.documents(texts), self.encoder.encode_documents, "encoding documents")
        return views if self.pooling == "multi_view" else views[:, -1]
