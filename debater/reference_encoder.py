"""Zero-shot reference models: a sentence-transformers folder (e.g. all-MiniLM-L6-v2) evaluated as it was
trained: mean pooling over the tokens, L2-normalised, no instructions and no deliberation suffix."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from debater.core.prompts import EncodingSettings


def is_sentence_transformers_folder(path: str) -> bool:
    return (Path(path) / "modules.json").exists() and (Path(path) / "config_sentence_transformers.json").exists()


def pooling_mode(folder: str) -> str | None:
    """The pooling of a sentence-transformers folder (``mean`` for the legacy ``pooling_mode_mean_tokens``)."""
    for module in json.loads((Path(folder) / "modules.json").read_text()):
        config = Path(folder) / module["path"] / "config.json"
        if module["type"].endswith("Pooling") and config.exists():
            settings = json.loads(config.read_text())
            return settings.get("pooling_mode") or ("mean" if settings.get("pooling_mode_mean_tokens") else None)
    return None


class MeanPoolTextEncoder:
    """Offers what the mteb glue needs from a TextEncoder (pooling, settings, queries, documents)."""

    pooling = "last_step"
    settings = EncodingSettings(doc_mode="last_token")  # one view: nothing for the per-step analysis

    def __init__(self, folder: str, batch_size: int = 32, max_length: int | None = None):
        from transformers import AutoModel, AutoTokenizer

        config = Path(folder) / "sentence_bert_config.json"
        trained_length = json.loads(config.read_text()).get("max_seq_length", 512) if config.exists() else 512
        self.max_length = min(max_length or trained_length, trained_length)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> np.ndarray:
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for first in range(0, len(texts), self.batch_size):
            chunk = order[first:first + self.batch_size]
            batch = self.tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out[chunk] = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
        return out

    def queries(self, texts: list[str], instruction: str | None = None) -> np.ndarray:
        return self._encode(texts)  # trained without instructions

    def documents(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts)
