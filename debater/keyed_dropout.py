"""LoRA dropout whose mask is a function of the text, not of the order texts are encoded in.

``nn.Dropout`` draws its mask from the global RNG stream, so the mask a text gets depends on how many
texts were encoded before it and in which tensor: splitting a batch into chunks (gradient caching), or
over a different number of ranks, changes every mask and so the gradient. Here each element's keep/drop
bit is a hash of (seed, the LoRA layer, the text's key, its position counted from the end, the feature).
Text keys come from the loader (batch index, global row, role), so a text gets the same mask in a
one-process run, a W-rank run, a chunked re-forward and a checkpointed recomputation. Without keys
(a caller's own training loop) it is ordinary dropout.

``keep_mask`` is the reference: plain torch, int64 tensors of the input's size. Training runs a fused kernel
instead (C on the CPU, see keyed_dropout_cpu.py; ``masked`` compiled to Triton on CUDA): each element's bit is
hashed inside the kernel that applies it, forward and backward, with the same bits as the reference, from a
``MaskSpec`` that holds only tensors which exist anyway. Inside a
PEFT model the mask is applied within LoRA A's own op (``KeyedDropoutLoraA``), which keeps the undropped input
for backward, as LoRA A does without dropout, rather than a dropped copy of every adapted projection's input.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from debater import keyed_dropout_cpu

log = logging.getLogger(__name__)

_LOW32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # below 2**31: the product of two 32-bit halves stays inside int64
_KEEP_BITS = 24          # the top 24 of 32 hash bits decide keep/drop, compared as integers


def mix32(values: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values in [0, 2**32), or on int32
    tensors holding the same 32 bits (a multiply wraps around, the shift is made logical by its mask): the
    fused kernels' arithmetic, which vectorises better."""
    low = _LOW32 if values.dtype == torch.int64 else -1
    values = ((values ^ ((values >> 16) & 0xFFFF)) * _MULTIPLIER) & low
    values = ((values ^ ((values >> 16) & 0xFFFF)) * _MULTIPLIER) & low
    return values ^ ((values >> 16) & 0xFFFF)


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


def as_int32_bits(values: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) as int32 with the same 32 bits (what the fused kernels read)."""
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def masked(hidden: torch.Tensor, rows: torch.Tensor, features: torch.Tensor, threshold: int,
           scale: float) -> torch.Tensor:
    """The fused op, written once in torch: ``hidden`` [texts, length, width] times its keep mask and
    ``scale``, each element's bit hashed from the int32 hashes of its row (``rows`` [texts, length]) and of its
    feature (``features`` [width]). Compiled (torch.compile, a Triton kernel on CUDA) it runs as one
    elementwise kernel with no integer tensor of the input's size; run as it is, it is the reference's hash in
    int32 arithmetic."""
    bits = mix32(rows[:, :, None] ^ features)
    keep = ((bits >> (32 - _KEEP_BITS)) & ((1 << _KEEP_BITS) - 1)) >= threshold
    return hidden * keep.to(hidden.dtype) * scale


@functools.cache
def compiled_masked(device: torch.device, dtype: torch.dtype):
    """``masked`` compiled (dynamic shapes: one compile serves every layer width), once checked on a small input
    against itself run eagerly; or None, with one log line, where compiling fails (no Triton, say) or differs."""
    from torch.utils._triton import has_triton

    if device.type == "cuda" and not has_triton():
        log.warning("keyed LoRA dropout: Triton is not installed, so the fused CUDA kernel cannot be compiled; "
                    "using the reference masks: the same result, slower and with int64 temporaries")
        return None
    compiled = torch.compile(masked, dynamic=True)
    generator = torch.Generator().manual_seed(0)
    probe = (torch.randn(3, 5, 7, generator=generator).to(device, dtype),
             torch.randint(-2**31, 2**31, (3, 5), generator=generator, dtype=torch.int32).to(device),
             torch.randint(-2**31, 2**31, (7,), generator=generator, dtype=torch.int32).to(device), 2**23, 2.0)
    try:
        with torch.no_grad():  # as in the autograd Function's forward and backward: one compiled graph for all
            same = torch.equal(compiled(*probe), masked(*probe))
    except Exception as error:  # a compiler's failures have many types; the reference path still works
        log.warning("keyed LoRA dropout: compiling the fused kernel for %s %s failed (%s: %s); using the reference "
                    "masks: the same result, slower", device, dtype, type(error).__name__, str(error)[:200])
        return None
    if not same:
        log.warning("keyed LoRA dropout: the compiled kernel for %s %s differs from the reference on a probe; "
                    "using the reference masks", device, dtype)
        return None
    return compiled


@dataclass(frozen=True)
class MaskSpec:
    """What decides one layer's keep bits for the texts of one forward. Its tensors exist anyway (the forward's
    text keys, the layer's cached position and feature hashes), so keeping it for backward allocates nothing."""

    keys: torch.Tensor       # int64 [texts]
    salt: int
    positions: torch.Tensor  # int32 [length]: the hash of each position, counted from the end
    features: torch.Tensor   # int32 [width]
    threshold: int
    scale: float

    def rows(self) -> torch.Tensor:
        """[texts, length] int32: the hash of each (text, position), on the positions' device."""
        texts = as_int32_bits(hash_keys(self.keys.to(self.positions.device), self.salt))
        return mix32(texts[:, None] ^ self.positions[None])


def fused_kernel(hidden: torch.Tensor):
    """The fused kernels for ``hidden``'s device and dtype, or None: then the reference path runs. Two functions:
    ``apply(hidden, spec, out=None, transient=False)``, whose hints say where the result may be written
    (``out``, a contiguous tensor of ``hidden``'s shape, ``hidden`` itself included) or that it is consumed
    before the next transient call (so a reused buffer may hold it); callers use the returned tensor.
    ``apply_pair(grad, hidden, spec)`` gives backward's two masked tensors: ``grad`` (the caller's own), possibly
    masked in place, and ``hidden``'s, transient. On the CPU that is keyed_dropout_cpu itself."""
    if hidden.device.type == "cuda":
        compiled = compiled_masked(hidden.device, hidden.dtype)
        return None if compiled is None else CompiledKernel(compiled)
    if keyed_dropout_cpu.supports(hidden):
        return keyed_dropout_cpu
    return None


class CompiledKernel:
    """``fused_kernel``'s two functions over the compiled ``masked``, which always returns a new tensor (torch's
    caching allocator already reuses CUDA memory, so the hints are not needed)."""

    def __init__(self, compiled):
        self.compiled = compiled

    def apply(self, hidden, spec: MaskSpec, out=None, transient=False):
        return self.compiled(hidden, spec.rows(), spec.features, spec.threshold, spec.scale)

    def apply_pair(self, grad, hidden, spec: MaskSpec):
        rows = spec.rows()
        return (self.compiled(grad, rows, spec.features, spec.threshold, spec.scale),
                self.compiled(hidden, rows, spec.features, spec.threshold, spec.scale))


class FusedKeyedDropout(torch.autograd.Function):
    """y = x * keep * scale, and so dL/dx = g * keep * scale: backward applies the same kernel to the gradient,
    the mask recomputed from the spec."""

    @staticmethod
    def forward(ctx, hidden, spec, kernel):
        ctx.spec, ctx.kernel = spec, kernel
        # detached, as the gradient in backward is: a compiled kernel then serves both without a recompile
        return kernel.apply(hidden.detach(), spec)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return ctx.kernel.apply(grad, ctx.spec), None, None


class FusedKeyedDropoutLinear(torch.autograd.Function):
    """y = (x * keep * scale) @ W^T for LoRA A. Backward recomputes the dropped input from x and the spec for W's
    gradient, and applies the mask to x's, both in one pass: it keeps x, the tensor a LoRA A without dropout
    keeps too (shared by the projections that read the same input), instead of a dropped copy per projection."""

    @staticmethod
    def forward(ctx, hidden, weight, spec, kernel):
        ctx.save_for_backward(hidden, weight)
        ctx.spec, ctx.kernel = spec, kernel
        return nn.functional.linear(kernel.apply(hidden.detach(), spec, transient=True), weight.detach())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        grad_hidden = grad_weight = dropped = None
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
            grad_hidden, dropped = ctx.kernel.apply_pair(grad.matmul(weight), hidden, ctx.spec)
        elif ctx.needs_input_grad[0]:
            grad_hidden = grad.matmul(weight)
            grad_hidden = ctx.kernel.apply(grad_hidden, ctx.spec, out=grad_hidden)  # a new tensor of its own
        elif ctx.needs_input_grad[1]:
            dropped = ctx.kernel.apply(hidden, ctx.spec, transient=True)
        if dropped is not None:
            grad_weight = grad.reshape(-1, grad.shape[-1]).t().mm(dropped.reshape(-1, dropped.shape[-1]))
        return grad_hidden, grad_weight, None, None


class KeyedDropout(nn.Module):
    """Inverted dropout with probability ``p``; ``salt`` tells this layer's masks apart from the others'."""

    def __init__(self, p: float, salt: int, text_keys: TextKeys):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.salt, self.text_keys = p, salt, text_keys
        self.threshold = round(p * 2 ** _KEEP_BITS)
        self._hash_cache: dict[tuple, torch.Tensor] = {}  # (size, from_end, device, int32) -> hashes of the range

    def hashes(self, keys: torch.Tensor, length: int, features: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The hashes of each (text, position) [n, length] and of each feature [features], on ``device``: an
        element's keep bit is ``mix32`` of their xor."""
        rows = hash_keys(keys.to(device), self.salt)                                          # [n]
        positions = mix32(rows[:, None] ^ self._range_hashes(length, True, device)[None])  # [n, L]
        return positions, self._range_hashes(features, False, device)

    def _range_hashes(self, size: int, from_end: bool, device: torch.device, int32: bool = False) -> torch.Tensor:
        """``hash_keys`` of 0..size-1 (counted from the end for positions, salted apart from features), as int64
        or as the int32 bits the fused kernels read, computed once per size and device: every forward of a layer
        would otherwise hash the same range again."""
        key = (size, from_end, device, int32)
        if key not in self._hash_cache:
            if int32:
                self._hash_cache[key] = as_int32_bits(self._range_hashes(size, from_end, device))
            else:
                indices = torch.arange(size, device=device)
                self._hash_cache[key] = hash_keys(indices.flip(0) if from_end else indices,
                                                  self.salt + (1 if from_end else 2))
        return self._hash_cache[key]

    def keep_mask(self, keys: torch.Tensor, length: int, features: int,
                  device: torch.device | None = None) -> torch.Tensor:
        """The reference (the spec every fused kernel equals): [n, length, features] bools for n texts, on
        ``device`` (default: the keys'); position 0 of the result is ``length`` from the end."""
        positions, feature = self.hashes(keys, length, features, keys.device if device is None else device)
        bits = mix32(positions[..., None] ^ feature)                                  # [n, L, F]
        return (bits >> (32 - _KEEP_BITS)) >= self.threshold

    def keys_for(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The text keys of this training forward, or None where no keyed mask applies (eval, p = 0, or a caller
        that names no texts)."""
        keys = self.text_keys.current if self.training and self.p > 0.0 else None
        if keys is not None and (hidden.dim() != 3 or keys.shape[0] != hidden.shape[0]):
            raise ValueError(f"KeyedDropout got {keys.shape[0]} text keys for an input of shape "
                             f"{tuple(hidden.shape)}: expected one key per row of [texts, positions, features]")
        return keys

    def mask_spec(self, keys: torch.Tensor, hidden: torch.Tensor) -> MaskSpec:
        """The fused kernels' description of this layer's masks for ``keys`` and an input shaped as ``hidden``."""
        _, length, width = hidden.shape
        return MaskSpec(keys, self.salt, self._range_hashes(length, True, hidden.device, int32=True),
                        self._range_hashes(width, False, hidden.device, int32=True), self.threshold,
                        1.0 / (1.0 - self.p))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return hidden
        keys = self.keys_for(hidden)
        if keys is None:  # a caller that names no texts (a user's own loop) gets ordinary dropout
            return nn.functional.dropout(hidden, self.p, training=True)
        kernel = fused_kernel(hidden)
        if kernel is None:
            return self.reference(hidden, keys)
        return FusedKeyedDropout.apply(hidden, self.mask_spec(keys, hidden), kernel)

    def reference(self, hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The training forward as the spec computes it: the reference mask times ``hidden``, rescaled."""
        keep = self.keep_mask(keys, hidden.shape[1], hidden.shape[2], hidden.device)
        return hidden * keep.to(hidden.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, salt={self.salt}"


class KeyedDropoutLoraA(nn.Linear):
    """PEFT's LoRA A projection (an ``nn.Linear`` whose class ``install_keyed_dropout`` swaps for this one, so its
    weight and state-dict keys stay as they are) with the layer's keyed dropout applied inside its op."""

    keyed_dropout: KeyedDropout

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        keys = self.keyed_dropout.keys_for(hidden)
        kernel = fused_kernel(hidden) if keys is not None else None
        if kernel is None or self.bias is not None:
            return super().forward(self.keyed_dropout(hidden))
        return FusedKeyedDropoutLinear.apply(hidden, self.weight, self.keyed_dropout.mask_spec(keys, hidden), kernel)


def install_keyed_dropout(model: nn.Module, seed: int, text_keys: TextKeys) -> None:
    """Replace every LoRA dropout of a PEFT model by a KeyedDropout (same p, one salt per layer, from
    ``seed``) reading ``text_keys``, which the encoder fills before each forward. Where LoRA A is a plain
    ``nn.Linear`` the dropout moves inside it (``KeyedDropoutLoraA``) and PEFT's dropout slot becomes the
    identity."""
    layer = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for adapter, dropout in dropouts.items():
            if isinstance(dropout, nn.Dropout):
                salt = int(hash_keys(torch.tensor([seed * 1_000_003 + layer]), 0x5EED)[0])
                keyed = KeyedDropout(dropout.p, salt, text_keys)
                lora_a = module.lora_A[adapter]
                if type(lora_a) is nn.Linear:
                    lora_a.__class__ = KeyedDropoutLoraA
                    lora_a.keyed_dropout = keyed
                    dropouts[adapter] = nn.Identity()
                else:
                    dropouts[adapter] = keyed
                layer += 1
