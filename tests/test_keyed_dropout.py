"""LoRA dropout keyed by text: the rate is p, masks depend on the text and layer only, not on the batch it is in."""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from benchmarks.fused_dropout_check import CASES, as_bits, fused_dropout_equality, random_input
from debater import keyed_dropout, keyed_dropout_cpu
from debater.keyed_dropout import KeyedDropout, KeyedDropoutLoraA, TextKeys, install_keyed_dropout, masked


def _dropout(p: float = 0.25, salt: int = 7) -> KeyedDropout:
    return KeyedDropout(p, salt, TextKeys()).train()


def test_drop_rate_is_p_and_kept_values_are_rescaled():
    dropout = _dropout(0.25)
    ones = torch.ones(64, 32, 48)
    with dropout.text_keys.use(torch.arange(64)):
        out = dropout(ones)
    assert float((out == 0).float().mean()) == pytest.approx(0.25, abs=0.005)
    assert torch.equal(out[out != 0], torch.full_like(out[out != 0], 1 / 0.75))


def test_a_text_gets_its_mask_whatever_the_batch_and_padding_around_it():
    dropout = _dropout()
    keys = torch.tensor([5, 900, 1 << 40, 3])
    with dropout.text_keys.use(keys):
        whole = dropout(torch.ones(4, 10, 16))
    with dropout.text_keys.use(keys[2:3]):
        alone = dropout(torch.ones(1, 6, 16))  # fewer left-padding columns: positions count from the end
    assert torch.equal(alone[0], whole[2, -6:])


def test_masks_differ_between_texts_layers_and_positions():
    keys = torch.tensor([1, 2])
    first, second = _dropout(0.5, salt=1), _dropout(0.5, salt=2)
    with first.text_keys.use(keys), second.text_keys.use(keys):
        a, b = first(torch.ones(2, 8, 64)), second(torch.ones(2, 8, 64))
    assert not torch.equal(a[0], a[1])        # texts
    assert not torch.equal(a[0, 0], a[0, 1])  # positions
    assert not torch.equal(a, b)              # layers


def test_eval_mode_is_the_identity_and_without_keys_it_is_ordinary_dropout():
    dropout = _dropout(0.5)
    hidden = torch.ones(2, 3, 40)
    assert torch.equal(dropout.eval()(hidden), hidden)
    torch.manual_seed(0)
    plain = dropout.train()(hidden)
    torch.manual_seed(0)
    assert torch.equal(plain, torch.nn.functional.dropout(hidden, 0.5, training=True))
    with dropout.text_keys.use(torch.arange(3)), pytest.raises(ValueError, match="3 text keys"):
        dropout(hidden)


def test_install_replaces_every_lora_dropout_with_its_own_salt():
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    model = get_peft_model(model, LoraConfig(r=2, lora_dropout=0.1, target_modules=["0", "2"]))
    names = set(model.state_dict())
    install_keyed_dropout(model, seed=3, text_keys=TextKeys())
    keyed = [m for m in model.modules() if isinstance(m, KeyedDropout)]
    assert len(keyed) == 2 and all(m.p == 0.1 for m in keyed)
    assert len({m.salt for m in keyed}) == 2
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    # the dropout moved inside LoRA A, whose weights keep their names
    lora_a = [m for m in model.modules() if isinstance(m, KeyedDropoutLoraA)]
    assert [m.keyed_dropout for m in lora_a] == keyed and set(model.state_dict()) == names


def _lora_a(width: int, rank: int, p: float, dtype: torch.dtype) -> KeyedDropoutLoraA:
    """A LoRA A projection as install_keyed_dropout leaves it."""
    lora_a = torch.nn.Linear(width, rank, bias=False, dtype=dtype)
    lora_a.__class__ = KeyedDropoutLoraA
    lora_a.keyed_dropout = _dropout(p, salt=0xABC)
    return lora_a.train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, layout", [((3, 7, 5), "contiguous"), ((4, 33, 577), "contiguous"),
                                           ((4, 9, 70), "strided"), ((3, 11, 65), "sliced")])
def test_lora_a_with_the_dropout_inside_equals_dropout_then_linear(shape, layout, dtype):
    """Forward bit for bit; gradients as autograd gives them for the reference's dropped input and a plain linear
    (the same products, summed by another matmul call: to rounding)."""
    generator = torch.Generator().manual_seed(1)
    lora_a = _lora_a(shape[2], 8, 1 / 3, dtype)
    keys = torch.tensor([5, 900, 1 << 40, 2**63 - 1][:shape[0]])
    hidden = random_input(shape, layout, generator).to(dtype).requires_grad_()
    upstream = torch.randn(*shape[:2], 8, generator=generator).to(dtype)
    with lora_a.keyed_dropout.text_keys.use(keys):
        fused = lora_a(hidden)
    assert type(fused.grad_fn).__name__ == "FusedKeyedDropoutLinearBackward"
    reference = torch.nn.functional.linear(lora_a.keyed_dropout.reference(hidden, keys), lora_a.weight)
    assert torch.equal(as_bits(fused), as_bits(reference))
    got = torch.autograd.grad(fused, [hidden, lora_a.weight], upstream)
    want = torch.autograd.grad(reference, [hidden, lora_a.weight], upstream)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for name, a, b in zip(("input", "weight"), got, want):
        torch.testing.assert_close(a, b, **tolerance, msg=name)


@pytest.mark.parametrize("frozen", ["input", "weight"])
def test_lora_a_with_one_gradient_wanted_masks_that_one(frozen):
    """The first layer's input or a frozen adapter: backward masks only what is asked for (one pass each)."""
    lora_a, keys = _lora_a(70, 8, 1 / 3, torch.float32), torch.tensor([3, 1, 4])
    hidden = torch.randn(3, 9, 70, requires_grad=frozen != "input")
    lora_a.weight.requires_grad_(frozen != "weight")
    with lora_a.keyed_dropout.text_keys.use(keys):
        fused = lora_a(hidden)
    reference = torch.nn.functional.linear(lora_a.keyed_dropout.reference(hidden, keys), lora_a.weight)
    wanted = [hidden] if frozen == "weight" else [lora_a.weight]
    upstream = torch.randn(3, 9, 8)
    torch.testing.assert_close(torch.autograd.grad(fused, wanted, upstream)[0],
                               torch.autograd.grad(reference, wanted, upstream)[0], rtol=1e-5, atol=1e-6)


def test_lora_a_with_the_dropout_inside_keeps_its_input_not_a_dropped_copy():
    """What LoRA A without dropout keeps (its input, shared with the other projections that read it), plus the
    small hashes and its own weight: no new tensor of the input's size."""
    lora_a, saved = _lora_a(96, 4, 0.1, torch.float32), []
    hidden = torch.randn(6, 40, 96, requires_grad=True)
    with lora_a.keyed_dropout.text_keys.use(torch.arange(6)), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        lora_a(hidden)
    large = [t for t in saved if t.numel() >= hidden.numel()]
    assert len(large) == 1 and large[0].data_ptr() == hidden.data_ptr()
    assert max(t.numel() for t in saved if t.data_ptr() != hidden.data_ptr()) == 96 * 4


def test_the_fused_cpu_kernel_equals_the_reference_bit_for_bit_forward_and_backward():
    """fp32 and bf16, odd shapes, strided and offset views (benchmarks/fused_dropout_check.py's cases, which
    make gpu-check runs on the GPU)."""
    result = fused_dropout_equality(torch.device("cpu"))
    assert result["mismatches"] == [] and result["cases"] == 2 * len(CASES)


def test_the_cuda_definition_in_int32_equals_the_reference_and_the_cpu_kernel():
    """``masked`` is what torch.compile turns into the CUDA kernel, fed by ``MaskSpec.rows``; run eagerly, their
    int32 arithmetic (wrapping multiply, masked shifts) must give the reference's bits (the compiled kernel is
    checked by make gpu-check), and so must the C kernel, which hashes the rows itself (negative keys too)."""
    dropout = _dropout(0.05, salt=2**32 - 1)
    keys = torch.tensor([0, 3, 1 << 33, 2**63 - 1, -5])
    hidden = torch.randn(5, 19, 301)
    spec = dropout.mask_spec(keys, hidden)
    reference = as_bits(dropout.reference(hidden, keys))
    assert torch.equal(as_bits(masked(hidden, spec.rows(), spec.features, spec.threshold, spec.scale)), reference)
    assert torch.equal(as_bits(keyed_dropout_cpu.apply(hidden, spec)), reference)


def test_the_cuda_kernels_glue_run_eagerly_gives_the_reference(monkeypatch):
    """What training runs on CUDA, short of the compiler: ``CompiledKernel`` over ``masked`` (eager here) inside
    LoRA A, forward and both gradients (make gpu-check runs the compiled kernel itself)."""
    monkeypatch.setattr(keyed_dropout, "fused_kernel", lambda hidden: keyed_dropout.CompiledKernel(masked))
    lora_a, keys = _lora_a(65, 8, 1 / 3, torch.float32), torch.tensor([6, 2**62, 0])
    hidden = torch.randn(3, 11, 65, requires_grad=True)
    with lora_a.keyed_dropout.text_keys.use(keys):
        fused = lora_a(hidden)
    reference = torch.nn.functional.linear(lora_a.keyed_dropout.reference(hidden, keys), lora_a.weight)
    assert type(fused.grad_fn).__name__ == "FusedKeyedDropoutLinearBackward" and torch.equal(fused, reference)
    upstream = torch.randn(3, 11, 8)
    for got, want in zip(torch.autograd.grad(fused, [hidden, lora_a.weight], upstream),
                         torch.autograd.grad(reference, [hidden, lora_a.weight], upstream)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_stacked_lora_a_layers_sharing_the_reused_buffer_get_their_own_masks():
    """Each fused LoRA A writes its dropped input into one reused per-thread buffer, in forward and backward: two
    of different widths in a row must still equal the reference's dropped inputs and plain linears."""
    first, second = _lora_a(40, 24, 0.25, torch.float32), _lora_a(24, 8, 0.25, torch.float32)
    second.keyed_dropout = KeyedDropout(0.25, 0xDEF, first.keyed_dropout.text_keys).train()
    keys, hidden = torch.tensor([2, 9, 4]), torch.randn(3, 10, 40, requires_grad=True)
    with first.keyed_dropout.text_keys.use(keys):
        fused = second(first(hidden))
    middle = torch.nn.functional.linear(first.keyed_dropout.reference(hidden, keys), first.weight)
    reference = torch.nn.functional.linear(second.keyed_dropout.reference(middle, keys), second.weight)
    assert type(fused.grad_fn).__name__ == "FusedKeyedDropoutLinearBackward"
    assert torch.equal(fused, reference)
    weights = [hidden, first.weight, second.weight]
    for got, want in zip(torch.autograd.grad(fused.square().sum(), weights),
                         torch.autograd.grad(reference.square().sum(), weights)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_backward_keeps_no_tensor_of_its_own():
    """The mask is recomputed in backward from the spec, whose tensors exist anyway (the keys, the layer's
    cached hashes): autograd is handed nothing to keep."""
    dropout, saved = _dropout(0.1), []
    hidden = torch.randn(6, 40, 96, requires_grad=True)
    with dropout.text_keys.use(torch.arange(6)), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        out = dropout(hidden)
    assert type(out.grad_fn).__name__ == "FusedKeyedDropoutBackward" and saved == []


@pytest.mark.parametrize("inside_lora_a", [False, True])
def test_checkpoint_recomputation_gives_the_same_gradients(inside_lora_a):
    torch.manual_seed(0)
    text_keys = TextKeys()
    layer = torch.nn.Sequential(KeyedDropout(0.5, 11, text_keys), torch.nn.Linear(24, 24, bias=False)).train()
    if inside_lora_a:
        layer[1].__class__, layer[1].keyed_dropout, layer[0] = KeyedDropoutLoraA, layer[0], torch.nn.Identity()
    hidden = torch.randn(3, 8, 24, requires_grad=True)
    grads = []
    for checkpointed in (False, True):
        with text_keys.use(torch.tensor([4, 8, 15])):
            out = (checkpoint(layer, hidden, use_reentrant=False, context_fn=text_keys.checkpoint_contexts)
                   if checkpointed else layer(hidden))
        if inside_lora_a and not checkpointed:
            assert type(out.grad_fn).__name__ == "FusedKeyedDropoutLinearBackward"
        grads.append(torch.autograd.grad(out.square().sum(), [hidden, layer[1].weight]))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_the_mask_is_built_on_the_device_asked_for_not_the_keys():
    dropout = _dropout()
    keys = torch.tensor([1, 2])  # on the CPU, as the loader gives them
    assert dropout.keep_mask(keys, 4, 8, torch.device("meta")).device.type == "meta"
    with dropout.text_keys.use(keys):
        assert dropout(torch.ones(2, 4, 8, device="meta")).device.type == "meta"


def test_without_a_compiler_it_says_so_once_and_runs_the_reference(monkeypatch, caplog):
    dropout = _dropout(0.25)
    hidden, keys = torch.randn(2, 5, 16, requires_grad=True), torch.tensor([3, 4])
    monkeypatch.setenv("CC", "no-such-compiler")
    keyed_dropout_cpu.library.cache_clear()
    try:
        with dropout.text_keys.use(keys), caplog.at_level("WARNING"):
            out = dropout(hidden)
            dropout(hidden)
    finally:
        keyed_dropout_cpu.library.cache_clear()
    assert [r.getMessage() for r in caplog.records if "no-such-compiler" in r.getMessage()] == [
        caplog.records[0].getMessage()] and "using the reference masks" in caplog.records[0].getMessage()
    assert type(out.grad_fn).__name__ == "MulBackward0" and torch.equal(out, dropout.reference(hidden, keys))
