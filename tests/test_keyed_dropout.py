"""LoRA dropout keyed by text: the rate is p, masks depend on the text and layer only, not on the batch it is in."""
from __future__ import annotations

import pytest
import torch

from debater.keyed_dropout import KeyedDropout, TextKeys, install_keyed_dropout


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
    install_keyed_dropout(model, seed=3, text_keys=TextKeys())
    keyed = [m for m in model.modules() if isinstance(m, KeyedDropout)]
    assert len(keyed) == 2 and all(m.p == 0.1 for m in keyed)
    assert len({m.salt for m in keyed}) == 2
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
