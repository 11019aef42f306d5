"""The CPU kernel of keyed LoRA dropout: one pass that hashes each element's keep/drop bit and applies it.

Plain C, built once per machine with the system's C compiler (well under a second, no torch headers) into a
cache under the temporary directory, loaded with ctypes; it runs on the calling thread plus
``torch.get_num_threads() - 1`` OpenMP threads (the linker reuses the libgomp torch already loaded). The
reference's hashes in uint32 arithmetic: each row's (text, position) hash once per row, from the text's key and
the layer's cached position hashes, then ``mix32(row ^ feature)`` per element. fp32 and bf16 inputs; other
dtypes, or a machine without a compiler, use the reference (with a log line).

Nothing is allocated per call but the result, and not even that when the result is consumed at once (the
dropped input LoRA A multiplies, in forward and again in backward): it goes into a reused per-thread buffer
(``transient``). A fresh tensor of the input's size per call makes glibc fault in new pages every time or grow
a fragmented heap.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <stdint.h>
#include <string.h>

static inline uint32_t mix32(uint32_t v) {
    v = (v ^ (v >> 16)) * 0x45D9F3Bu;
    v = (v ^ (v >> 16)) * 0x45D9F3Bu;
    return v ^ (v >> 16);
}

static inline float load_f32(float v) { return v; }
static inline float store_f32(float v) { return v; }
static inline float load_bf16(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t store_bf16(float f) {  /* round to nearest even, as c10::BFloat16 */
    uint32_t u;
    if (f != f) return 0x7FC0;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* out[i, l, f] = in[i, l, f] * keep * scale, keep = (mix32(row ^ features[f]) >> 8) >= threshold, where
   row = mix32(text ^ positions[l]) and text = mix32(mix32(low half of keys[i]) ^ mix32(high half) ^ salt): the
   reference's hashes. in has any strides (elements), out is contiguous. With grad (contiguous, not NULL),
   grad[i, l, f] is masked in place as well, by the same bits: backward's two masked tensors from one pass. */
#define MASK_ROW(XF, WITH_GRAD, LOAD, STORE)                                                                 \
    for (int64_t f = 0; f < width; f++) {                                                                    \
        const float keep = (float)((mix32(row ^ features[f]) >> 8) >= threshold);                            \
        y[f] = STORE(LOAD(XF) * keep * scale);                                                               \
        if (WITH_GRAD) g[f] = STORE(LOAD(g[f]) * keep * scale);                                              \
    }
#define KERNEL(NAME, T, LOAD, STORE)                                                                         \
void NAME(const T *in, T *out, T *grad, const int64_t *keys, uint32_t salt, const uint32_t *positions,       \
          const uint32_t *features, int64_t texts, int64_t length, int64_t width, int64_t s0, int64_t s1,     \
          int64_t s2, uint32_t threshold, float scale, int threads) {                                        \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                       \
    for (int64_t r = 0; r < texts * length; r++) {                                                           \
        const int64_t i = r / length, l = r % length;                                                        \
        const uint64_t key = (uint64_t)keys[i];                                                              \
        const uint32_t text = mix32(mix32((uint32_t)key) ^ mix32((uint32_t)(key >> 32)) ^ salt);             \
        const uint32_t row = mix32(text ^ positions[l]);                                                     \
        const T *x = in + i * s0 + l * s1;                                                                   \
        T *y = out + r * width;                                                                              \
        T *g = grad ? grad + r * width : NULL;                                                               \
        if (g && s2 == 1) { MASK_ROW(x[f], 1, LOAD, STORE) }                                                 \
        else if (g) { MASK_ROW(x[f * s2], 1, LOAD, STORE) }                                                  \
        else if (s2 == 1) { MASK_ROW(x[f], 0, LOAD, STORE) }                                                 \
        else { MASK_ROW(x[f * s2], 0, LOAD, STORE) }                                                         \
    }                                                                                                        \
}

KERNEL(keyed_dropout_f32, float, load_f32, store_f32)
KERNEL(keyed_dropout_bf16, uint16_t, load_bf16, store_bf16)
"""
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
STABLE_CPUINFO = {"model name", "flags", "Features", "CPU implementer", "CPU architecture", "CPU part"}
KERNELS = {torch.float32: "keyed_dropout_f32", torch.bfloat16: "keyed_dropout_bf16"}
_ARGS = ([ctypes.c_void_p] * 4 + [ctypes.c_uint32] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 6
         + [ctypes.c_uint32, ctypes.c_float, ctypes.c_int])
_buffers = threading.local()


def cpu_identity() -> list[str]:
    """The CPU's model and instruction-set lines (not its clock, which changes between reads)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return [platform.processor()]
    return sorted({line for line in lines if line.split(":")[0].strip() in STABLE_CPUINFO})


def build(compiler: str, cache_dir: Path) -> ctypes.CDLL:
    """The kernel library, compiled by ``compiler`` unless ``cache_dir`` holds it already (the name hashes the
    source, the flags, the compiler and the CPU, since ``-march=native`` ties it to this machine's CPU)."""
    key = hashlib.sha256("\0".join([SOURCE, *FLAGS, compiler, platform.machine(), *cpu_identity()]).encode())
    key = key.hexdigest()[:16]
    library = cache_dir / f"keyed_dropout_{key}.so"
    if not library.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        source = cache_dir / f"keyed_dropout_{key}.{os.getpid()}.c"
        partial = source.with_suffix(".so")
        source.write_text(SOURCE)
        try:
            subprocess.run([compiler, *FLAGS, str(source), "-o", str(partial)], check=True, capture_output=True,
                           text=True, timeout=120)
            os.replace(partial, library)  # atomic: ranks building at once each publish a whole file
        finally:
            source.unlink(missing_ok=True)
            partial.unlink(missing_ok=True)
    loaded = ctypes.CDLL(str(library))
    for name in KERNELS.values():
        getattr(loaded, name).argtypes = _ARGS
    return loaded


@cache
def library() -> ctypes.CDLL | None:
    """The built kernel, or None (with one log line saying why) where it cannot be built."""
    compiler = os.environ.get("CC", "cc")
    try:
        return build(compiler, Path(tempfile.gettempdir()) / f"debater-kernels-{os.getuid()}")
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        log.warning("keyed LoRA dropout: could not build the fused CPU kernel with %s (%s); using the reference "
                    "masks: the same result, slower", compiler, str(detail).strip().splitlines()[-1:])
        return None


def supports(hidden: torch.Tensor) -> bool:
    return hidden.device.type == "cpu" and hidden.dtype in KERNELS and library() is not None


def transient_buffer(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous tensor of ``shape`` from this thread's reused buffer (grown as needed): valid only until the
    next call on this thread."""
    count = shape.numel()
    buffer = getattr(_buffers, str(dtype), None)
    if buffer is None or buffer.numel() < count:
        buffer = torch.empty(count, dtype=dtype)
        setattr(_buffers, str(dtype), buffer)
    return buffer[:count].view(shape)


def apply(hidden: torch.Tensor, spec, out: torch.Tensor | None = None, transient: bool = False) -> torch.Tensor:
    """``hidden`` [texts, length, width] times its keep mask (from ``spec``, a keyed_dropout.MaskSpec) and scale.
    Written into ``out`` (a contiguous tensor of ``hidden``'s shape and dtype, ``hidden`` itself included), or
    into the thread's reused buffer when ``transient``, or into a new tensor."""
    if out is None:
        out = transient_buffer(hidden.shape, hidden.dtype) if transient else torch.empty(hidden.shape,
                                                                                          dtype=hidden.dtype)
    return _run(hidden, out, None, spec)


def apply_pair(grad: torch.Tensor, hidden: torch.Tensor, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward's two masked tensors from one pass: ``grad`` (contiguous, owned by the caller) masked in place,
    and ``hidden`` masked into the thread's reused buffer."""
    return grad, _run(hidden, transient_buffer(hidden.shape, hidden.dtype), grad, spec)


def _run(hidden: torch.Tensor, out: torch.Tensor, grad: torch.Tensor | None, spec) -> torch.Tensor:
    texts, length, width = hidden.shape
    keys = spec.keys.to(torch.int64).contiguous()  # no copy when it is already
    getattr(library(), KERNELS[hidden.dtype])(
        hidden.data_ptr(), out.data_ptr(), None if grad is None else grad.data_ptr(), keys.data_ptr(),
        spec.salt & 0xFFFFFFFF, spec.positions.data_ptr(), spec.features.data_ptr(), texts, length, width,
        *hidden.stride(), spec.threshold, spec.scale, torch.get_num_threads())
    return out
