"""Does the fused keyed-dropout kernel of a device give the reference's bits, forward and backward? make
gpu-check's throughput part asks it on the GPU, the tests on the CPU."""
from __future__ import annotations

import torch

from debater.keyed_dropout import KeyedDropout, TextKeys

# odd sizes, the demo's and MiniCPM's widths; "strided": features not adjacent in memory; "sliced": a view
# with an offset and a gap between rows
CASES = [((3, 7, 5), "contiguous"), ((2, 1, 1), "contiguous"), ((4, 33, 1537), "contiguous"),
         ((6, 64, 576), "contiguous"), ((2, 128, 2304), "contiguous"), ((4, 9, 70), "strided"),
         ((3, 11, 65), "sliced")]


def as_bits(values: torch.Tensor) -> torch.Tensor:
    """The bit patterns (NaN and -0.0 compared exactly too)."""
    return values.contiguous().view(torch.int16 if values.element_size() == 2 else torch.int32)


def random_input(shape: tuple[int, int, int], layout: str, generator: torch.Generator) -> torch.Tensor:
    n, length, width = shape
    if layout == "strided":
        return torch.randn(width, length, n, generator=generator).permute(2, 1, 0)
    if layout == "sliced":
        return torch.randn(n + 1, length, width + 3, generator=generator)[1:, :, 2:-1]
    return torch.randn(shape, generator=generator)


def fused_dropout_equality(device: torch.device) -> dict:
    """The fused kernel against the reference on ``device``, fp32 and bf16, every case of CASES. p = 1/3 scales
    by 1.5, which leaves bf16 many rounding ties to get right. A case where the reference ran instead (no fused
    kernel here) counts as a mismatch."""
    generator = torch.Generator().manual_seed(0)
    mismatches, cases = [], 0
    for dtype in (torch.float32, torch.bfloat16):
        for shape, layout in CASES:
            dropout = KeyedDropout(1 / 3, salt=0xC0FFEE, text_keys=TextKeys()).train()
            keys = torch.tensor([5, 900, 1 << 40, 2**63 - 1, 7, 0][:shape[0]])
            hidden = random_input(shape, layout, generator).to(device, dtype).requires_grad_()
            upstream = random_input(shape, layout, generator).to(device, dtype)
            with dropout.text_keys.use(keys):
                fused = dropout(hidden)
            reference = dropout.reference(hidden, keys)
            name = f"{str(dtype).split('.')[-1]} {list(shape)} {layout}"
            cases += 1
            if type(fused.grad_fn).__name__ != "FusedKeyedDropoutBackward":
                mismatches.append(f"{name}: no fused kernel ran (see the log)")
            elif not torch.equal(as_bits(fused), as_bits(reference)):
                mismatches.append(f"{name}: forward")
            elif not torch.equal(as_bits(torch.autograd.grad(fused, hidden, upstream)[0]),
                                 as_bits(torch.autograd.grad(reference, hidden, upstream)[0])):
                mismatches.append(f"{name}: backward")
    return {"device": str(device), "cases": cases, "mismatches": mismatches, "equal": not mismatches}
