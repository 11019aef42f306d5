"""LoRA dropout whose mask is a function of the text, not of the order texts are encoded in.

``nn.Dropout`` draws its mask from the global RNG stream, so the mask a text gets depends on how many
texts were encoded before it and in which tensor: splitting a batch into chunks (gradient caching), or
over a different number of ranks, changes every mask and so the gradient. Here each element's keep/drop
bit is a hash of (seed, the LoRA layer, the text's key, its position counted from the end, the feature).
Text keys come from the loader (batch index, global row, role), so a text gets the same mask in a
one-process run, a W-rank run, a chunked re-forward and a checkpointed recomputation. Without keys
(a caller's own training loop) it is ordinary dropout.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

_LOW32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # below 2**31: the product of two 32-bit halves stays inside int64
_KEEP_BITS = 24          # the top 24 of 32 hash bits decide keep/drop, compared as integers


def mix32(values: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values in [0, 2**32)."""
    values = ((values ^ (values >> 16)) * _MULTIPLIER) & _LOW32
    values = ((values ^ (values >> 16)) * _MULTIPLIER) & _LOW32
    return values ^ (values >> 16)


def hash_keys(keys: torch.Tensor, salt: int) -> torch.Tensor:
    """Hash int64 keys of any size (both 32-bit halves) with a salt, into [0, 2**32)."""
    keys = keys.long()
    return mix32(mix32(keys & _LOW32) ^ mix32((keys >> 32) & _LOW32) ^ (salt & _LOW32))


class TextKeys:
    """The keys of the texts in the forward pass now running, shared by every KeyedDropout of one model."""

    def __init__(self) -> None:
        self.current: torch.Tensor | None = None

    @contextlib.contextmanager
    def use(self, keys: torch.Tensor | None):
        """``keys`` for the forward (or recomputation) inside the block."""
        previous, self.current = self.current, keys
        try:
            yield
        finally:
            self.current = previous

    def checkpoint_contexts(self):
        """``context_fn`` for torch's non-reentrant checkpoint: a layer recomputed in backward, when the
        forward that set the keys has long returned, sees the keys of the texts it first ran on."""
        return contextlib.nullcontext(), self.use(self.current)


class KeyedDropout(nn.Module):
    """Inverted dropout with probability ``p``; ``salt`` tells this layer's masks apart from the others'."""

    def __init__(self, p: float, salt: int, text_keys: TextKeys):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.salt, self.text_keys = p, salt, text_keys
        self.threshold = round(p * 2 ** _KEEP_BITS)

    def keep_mask(self, keys: torch.Tensor, length: int, features: int) -> torch.Tensor:
        """[n, length, features] bools for n texts; position 0 of the result is ``length`` from the end."""
        device = keys.device
        rows = hash_keys(keys.to(device), self.salt)                                   # [n]
        from_end = torch.arange(length - 1, -1, -1, device=device)
        positions = mix32(rows[:, None] ^ hash_keys(from_end, self.salt + 1)[None])    # [n, L]
        feature = hash_keys(torch.arange(features, device=device), self.salt + 2)     # [F]
        bits = mix32(positions[..., None] ^ feature)                                  # [n, L, F]
        return (bits >> (32 - _KEEP_BITS)) >= self.threshold

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return hidden
        keys = self.text_keys.current
        if keys is None:  # a caller that names no texts (a user's own loop) gets ordinary dropout
            return nn.functional.dropout(hidden, self.p, training=True)
        if hidden.dim() != 3 or keys.shape[0] != hidden.shape[0]:
            raise ValueError(f"KeyedDropout got {keys.shape[0]} text keys for an input of shape "
                             f"{tuple(hidden.shape)}: expected one key per row of [texts, positions, features]")
        keep = self.keep_mask(keys, hidden.shape[1], hidden.shape[2])
        return hidden * keep.to(hidden.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, salt={self.salt}"


def install_keyed_dropout(model: nn.Module, seed: int, text_keys: TextKeys) -> None:
    """Replace every LoRA dropout of a PEFT model by a KeyedDropout (same p, one salt per layer, from
    ``seed``) reading ``text_keys``, which the encoder fills before each forward."""
    layer = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for adapter, dropout in dropouts.items():
            if isinstance(dropout, nn.Dropout):
                salt = int(hash_keys(torch.tensor([seed * 1_000_003 + layer]), 0x5EED)[0])
                dropouts[adapter] = KeyedDropout(dropout.p, salt, text_keys)
                layer += 1
