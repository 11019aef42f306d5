"""Step tokens as the released code treats them: existing reserved rows when the tokenizer has them, frozen by
default, the suffix tokenized with its space, and the rows used in training reproduced bit for bit by every
load (adapter and merged; added and existing rows; trained and frozen)."""
from __future__ import annotations

import pytest
import torch
from conftest import fixture_texts, reserved_tokenizer

from debater.core.config import TrainConfig
from debater.core.padding import left_pad
from debater.core.prompts import CODE_MARKUP_TOKENS, EncodingSettings, TextFormatter, resolve_step_tokens, step_suffix
from debater.export import write_merged
from debater.losses import debater_loss
from debater.model import build_training_encoder, load_encoder, save_encoder, step_rows

INSTRUCTION = "Given a query, retrieve the matching document:"


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ---------------------------------------------------------------- which tokens
@pytest.mark.parametrize("names, expected", [
    ([f"<reserved_{i}>" for i in range(24)], [f"<reserved_{i}>" for i in range(12, 20)]),
    ([f"<|reserved_special_token_{i}|>" for i in range(10)], [f"<|reserved_special_token_{i}|>" for i in range(8)]),
    ([f"<unused{i}>" for i in range(10)], [f"<unused{i}>" for i in range(8)]),
    (list(CODE_MARKUP_TOKENS), list(CODE_MARKUP_TOKENS[:8])),
])
def test_existing_reserved_tokens_are_used_when_the_tokenizer_has_them(names, expected):
    tokenizer, vocab = reserved_tokenizer(0, extra=tuple(names))
    before = len(tokenizer)
    settings = EncodingSettings(cod_steps=8)
    assert resolve_step_tokens(tokenizer, settings) == []
    assert settings.step_tokens == expected and len(tokenizer) == before
    assert tokenizer.convert_tokens_to_ids(expected) == [vocab[t] for t in expected]


# ---------------------------------------------------------------- the suffix's space
def _byte_level_tokenizer():
    """A small byte-level BPE (as GPT-2, SmolLM2, Qwen): a space is part of the ids, unlike the word-level one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(fixture_texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_suffix_has_the_released_space_before_the_first_step_token():
    tokenizer = _byte_level_tokenizer()
    settings = EncodingSettings(cod_steps=8)
    resolve_step_tokens(tokenizer, settings)
    steps = tokenizer.convert_tokens_to_ids(settings.step_tokens)
    released = tokenizer(" Use eight words to represent the above text in multiple aspects: "
                         + "".join(settings.step_tokens), add_special_tokens=False).input_ids
    no_space = tokenizer(" Use eight words to represent the above text in multiple aspects:",
                         add_special_tokens=False).input_ids + steps
    assert released != no_space  # on this tokenizer the space is an id of its own
    assert step_suffix(tokenizer, settings) == released
    document = TextFormatter(tokenizer, settings).documents(["a text editor"])[0]
    assert document[-len(released):] == released and document[-8:] == steps


def test_an_empty_prompt_has_no_space_before_the_steps():
    tokenizer = _byte_level_tokenizer()
    settings = EncodingSettings(cod_steps=4, deliberation_prompt="")
    resolve_step_tokens(tokenizer, settings)
    assert step_suffix(tokenizer, settings) == tokenizer.convert_tokens_to_ids(settings.step_tokens)


def test_doc_body_max_length_keeps_the_same_body_in_every_format(tiny_model):
    text = " ".join(fixture_texts()[:6])
    bodies = []
    for mode in ("step_tokens", "last_k_tokens", "last_token"):
        tokenizer = _tokenizer(tiny_model)
        settings = EncodingSettings(doc_mode=mode, cod_steps=8, doc_max_length=20, doc_body_max_length=15)
        resolve_step_tokens(tokenizer, settings)
        formatter = TextFormatter(tokenizer, settings)
        ids = formatter.documents([text])[0]
        assert ids[-len(formatter.doc_suffix):] == formatter.doc_suffix
        bodies.append(ids[:-len(formatter.doc_suffix)])
    assert len(bodies[0]) == 15 and bodies[0] == bodies[1] == bodies[2]


# ---------------------------------------------------------------- what is saved is what was trained
def _config(model, tmp_path, train_rows: bool) -> TrainConfig:
    return TrainConfig(model_name_or_path=str(model), dataset_file_path=str(tmp_path / "data"),
                       output_dir=str(tmp_path / "out"), lora_r=4, lora_alpha=8, lora_dropout=0.1,
                       torch_dtype="float32", cod_steps=4, train_step_rows=train_rows)


def _last_views(encoder, tokenizer) -> torch.Tensor:
    formatter = TextFormatter(tokenizer, encoder.settings)
    texts = fixture_texts()[:8]
    with torch.no_grad():
        return encoder.encode_documents(*left_pad(formatter.documents(texts), tokenizer.pad_token_id))[:, -1]


def _train_a_few_steps(encoder, tokenizer) -> None:
    """Real optimizer steps on the DEBATER loss (LoRA dropout on), so LoRA and any trainable rows move."""
    formatter = TextFormatter(tokenizer, encoder.settings)
    texts = fixture_texts()
    queries = left_pad(formatter.queries(texts[0:12:3], [INSTRUCTION] * 4), tokenizer.pad_token_id)
    documents = left_pad(formatter.documents(texts[1:12:3]), tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=0.05)
    encoder.train()
    for _ in range(3):
        q, views = encoder(*queries, *documents)
        debater_loss(q, views, torch.arange(4), "full").total.backward()
        optimizer.step()
        optimizer.zero_grad()
    encoder.eval()


@pytest.mark.parametrize("train_rows", [False, True], ids=["frozen", "trained"])
@pytest.mark.parametrize("model", ["tiny_model", "tiny_reserved_model"], ids=["added", "existing"])
def test_reloads_reproduce_the_trained_step_rows_and_views(model, train_rows, tmp_path, request):
    folder = request.getfixturevalue(model)
    tokenizer = _tokenizer(folder)
    encoder = build_training_encoder(_config(folder, tmp_path, train_rows), tokenizer)
    added = encoder.settings.step_tokens[0].startswith("<step_")
    assert added == (model == "tiny_model")
    initial = step_rows(encoder.backbone, encoder.settings, tokenizer)["rows"]
    assert torch.pdist(initial).min() > 0  # distinct rows, added or existing
    _train_a_few_steps(encoder, tokenizer)
    trained = step_rows(encoder.backbone, encoder.settings, tokenizer)["rows"]
    assert torch.equal(trained, initial) != train_rows  # frozen rows stay, trained rows move
    views = _last_views(encoder, tokenizer)

    save_encoder(encoder, tokenizer, tmp_path / "adapter", str(folder), "last_step")
    merged_dir = write_merged(tmp_path / "adapter", "float32")
    for path in (tmp_path / "adapter", merged_dir):
        loaded, loaded_tokenizer, _ = load_encoder(str(path))
        reloaded = step_rows(loaded.backbone, loaded.settings, loaded_tokenizer)["rows"]
        assert torch.equal(reloaded, trained), path  # bit for bit
        # the LoRA merge (W + BA) rounds differently, so the views agree to float precision, not bits
        torch.testing.assert_close(_last_views(loaded, loaded_tokenizer), views, rtol=1e-5, atol=1e-5)
