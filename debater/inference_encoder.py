"""Batch encoding for inference (the inference encoder that `eval`, `search` and `encode` load models with).

Texts are sorted by length so each batch pads little; the batches are shared
out to one model replica per device (every GPU, else the CPU), each replica
pulling the next batch when it is free, so faster devices take more. GPUs run
in bf16, the CPU in fp32. Results do not depend on the number of devices: a
text's batch (and so its padding) is fixed before any device starts.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from debater.core.padding import left_pad, pad_token_id
from debater.core.prompts import TextFormatter
from debater.model import DebaterEncoder, load_encoder
from debater.model_folder import ModelPathError, default_instruction

log = logging.getLogger(__name__)


def inference_devices() -> list[str]:
    """Every visible CUDA GPU, else the CPU."""
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]


def load_text_encoder(path: str, batch_size: int = 32, max_length: int | None = None,
                      devices: list[str] | None = None, remember: bool = False, trust_remote_code: bool = False,
                      base_model: str | None = None):
    """Load a model for inference: bf16 when the devices are GPUs, fp32 on the CPU (``base_model``: see
    ``load_encoder``).

    A sentence-transformers folder (a zero-shot reference such as MiniLM) is encoded its own way.
    """
    from debater.reference_encoder import MeanPoolTextEncoder, is_sentence_transformers_folder, pooling_mode

    if is_sentence_transformers_folder(path):
        if pooling_mode(path) not in (None, "mean"):  # e.g. our sentence-transformers export (last-token pooling)
            raise ModelPathError(f"{path} is a sentence-transformers folder with {pooling_mode(path)} pooling, which "
                                 "only SentenceTransformer(path) encodes as intended: pass the export folder that "
                                 "holds it (its adapter) instead")
        return MeanPoolTextEncoder(path, batch_size, max_length)
    devices = devices or inference_devices()
    dtype = "bfloat16" if devices[0].startswith("cuda") else "float32"
    try:
        encoder, tokenizer, pooling = load_encoder(path, dtype=dtype, max_length=max_length,
                                                   trust_remote_code=trust_remote_code, base_model=base_model)
    except OSError as err:  # transformers' many-line "not found on the hub" message (local paths are checked first)
        if isinstance(err, FileNotFoundError):
            raise
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise FileNotFoundError(f"cannot load model {path!r}: no such folder here, and no Hugging Face model of "
                                f"that name is available ({reason}): pass a model folder, a training output_dir "
                                "or an adapter folder") from None
    log.info("%s: %s on %s", path, dtype, ", ".join(devices))
    return TextEncoder(encoder, tokenizer, pooling, batch_size, devices, remember)


class TextEncoder:
    """Turns raw strings into L2-normalised embeddings with a DebaterEncoder."""

    def __init__(self, encoder: DebaterEncoder, tokenizer, pooling: str, batch_size: int = 32,
                 devices: list[str] | None = None, remember: bool = False):
        devices = devices or [str(next(encoder.parameters()).device)]
        # copies are made before the original moves, so a GPU never holds two replicas at once
        others = [copy.deepcopy(encoder).to(device) for device in devices[1:]]
        self.replicas = [encoder.to(devices[0]), *others]
        self.settings = encoder.settings
        self.formatter = TextFormatter(tokenizer, encoder.settings)
        self.pad_id = pad_token_id(tokenizer)
        self.pooling = pooling
        self.batch_size = batch_size
        self.instructions = encoder.instructions
        # remember=True keeps every output by (method, ids), so passes that see the same texts again
        # (the per-step analysis after the main evaluation) encode nothing twice
        self.memory: dict[bytes, np.ndarray] | None = {} if remember else None

    def _run(self, sequences: list[list[int]], method: str, desc: str, view: int | None = None) -> np.ndarray:
        """Encode id lists with ``DebaterEncoder.<method>`` (or recall them); rows in input order. ``view``
        keeps only that view of each document, as each batch comes back."""
        if self.memory is None:
            return self._encode(sequences, method, desc, view)
        name = f"{method}:{view}".encode()
        keys = [hashlib.sha1(name + np.asarray(s, dtype=np.int64).tobytes()).digest() for s in sequences]
        todo = list({key: i for i, key in enumerate(keys) if key not in self.memory}.values())
        if todo:
            fresh = self._encode([sequences[i] for i in todo], method, desc, view)
            self.memory.update({keys[i]: vector for i, vector in zip(todo, fresh)})
        return np.stack([self.memory[key] for key in keys])

    def _encode(self, sequences: list[list[int]], method: str, desc: str, view: int | None) -> np.ndarray:
        """Length-sorted batches shared out to the replicas; rows come back in input order."""
        if not sequences:
            raise ValueError(f"{desc}: nothing to encode (no texts)")
        order = np.argsort([-len(s) for s in sequences], kind="stable")
        batches: queue.SimpleQueue = queue.SimpleQueue()
        for first in range(0, len(order), self.batch_size):
            batches.put(order[first:first + self.batch_size])
        out: list[torch.Tensor | None] = [None] * len(sequences)
        failed, lock = threading.Event(), threading.Lock()

        def work(replica: DebaterEncoder) -> None:
            device = next(replica.parameters()).device
            # grad mode is per thread, so it is switched off here rather than around _run
            with torch.inference_mode():
                while not failed.is_set():
                    try:
                        chunk = batches.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        ids, mask = left_pad([sequences[i] for i in chunk], self.pad_id)
                        hidden = getattr(replica, method)(ids.to(device), mask.to(device))
                    except BaseException:
                        failed.set()
                        raise
                    vectors = F.normalize(hidden.float() if view is None else hidden[:, view].float(), dim=-1).cpu()
                    with lock:
                        for position, index in enumerate(chunk):
                            out[index] = vectors[position]
                        bar.update(len(chunk))

        start = time.perf_counter()
        with tqdm(total=len(sequences), desc=desc, unit=" texts", mininterval=2.0) as bar:
            if len(self.replicas) == 1:
                work(self.replicas[0])
            else:
                with ThreadPoolExecutor(len(self.replicas)) as pool:
                    for future in [pool.submit(work, replica) for replica in self.replicas]:
                        future.result()
        seconds = time.perf_counter() - start
        log.info("%s: %d texts in %.1f s (%.1f texts/s)", desc, len(sequences), seconds,
                 len(sequences) / max(seconds, 1e-9))
        return torch.stack(out).numpy()

    @property
    def default_instruction(self) -> str:
        """The query instruction the model was trained with (see model_folder.default_instruction)."""
        return default_instruction(self.instructions)

    def queries(self, texts: list[str], instruction: str | None = None) -> np.ndarray:
        """[N, D] normalised query embeddings (``instruction`` None: the model's default)."""
        instruction = self.default_instruction if instruction is None else instruction
        ids = self.formatter.queries(texts, [instruction] * len(texts))
        return self._run(ids, "encode_queries", "encoding queries")

    def document_views(self, texts: list[str]) -> np.ndarray:
        """[N, V, D]: every view (deliberation step) of each document, each normalised."""
        return self._run(self.formatter.documents(texts), "encode_documents", "encoding documents")

    def documents(self, texts: list[str]) -> np.ndarray:
        """What the model's pooling uses: [N, D] (last step / last token) or [N, V, D] (multi_view). The other
        views are dropped batch by batch (mining a large pool holds one view per document, not K), unless the
        encoder remembers its outputs for the per-step analysis, which asks for every view of the same texts."""
        if self.pooling == "multi_view" or self.memory is not None:
            views = self.document_views(texts)
            return views if self.pooling == "multi_view" else views[:, -1]
        return self._run(self.formatter.documents(texts), "encode_documents", "encoding documents", view=-1)
