"""The encoder: padding invariance (invariant 2), LoRA targets, step tokens, formatting, PEFT training
encoder, adapter save/load round trip and gradient checkpointing."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from conftest import reserved_tokenizer

from debater.core.config import ConfigError, TrainConfig
from debater.core.padding import left_pad
from debater.core.prompts import EncodingSettings, TextFormatter, resolve_step_tokens
from debater.losses import debater_loss
from debater.model import build_training_encoder, load_encoder, lora_targets, save_encoder

INSTRUCTION = "Given a query, retrieve the matching document:"
QUERIES = ["small web browser engine",
           "small python library for plotting",
           "tool",
           "small compression archive tool for every user fast and simple to use"]
DOCS = ["This package provides a web browser engine . It is fast and simple to use for every user .",
        "This package provides a text editor",
        "editor",
        "This package provides a database server for sql . It is robust and easy to configure . "
        "This package provides a image editor with layers . It is robust and easy to configure ."]
LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def base_encoder(tiny_model):
    return load_encoder(str(tiny_model))


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _batches(formatter: TextFormatter, pad_id: int):
    q = formatter.queries(QUERIES, [INSTRUCTION] * len(QUERIES))
    d = formatter.documents(DOCS)
    return q, d, left_pad(q, pad_id), left_pad(d, pad_id)


@torch.no_grad()
def _embed(encoder, formatter, pad_id):
    _, _, (qi, qm), (di, dm) = _batches(formatter, pad_id)
    return encoder.encode_queries(qi, qm), encoder.encode_documents(di, dm)


# ---------------------------------------------------------------- invariant 2: padding does not matter
@torch.no_grad()
def test_padding_does_not_change_embeddings(base_encoder):
    encoder, tokenizer, _ = base_encoder
    assert not encoder.training
    formatter = TextFormatter(tokenizer, encoder.settings)
    q_ids, d_ids, (qi, qm), (di, dm) = _batches(formatter, tokenizer.pad_token_id)
    # the batch really is padded, with different amounts per row
    assert len({len(s) for s in q_ids}) > 1 and len({len(s) for s in d_ids}) > 1
    assert (qm == 0).any() and (dm == 0).any()

    batch_q = encoder.encode_queries(qi, qm)
    batch_d = encoder.encode_documents(di, dm)
    assert batch_q.dtype == torch.float32
    assert batch_d.shape == (len(DOCS), encoder.settings.num_views, batch_q.shape[-1])
    assert torch.isfinite(batch_q).all() and torch.isfinite(batch_d).all()
    for i, ids in enumerate(q_ids):
        alone = encoder.encode_queries(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        torch.testing.assert_close(batch_q[i], alone[0], rtol=1e-5, atol=1e-5)
    for i, ids in enumerate(d_ids):
        alone = encoder.encode_documents(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        torch.testing.assert_close(batch_d[i], alone[0], rtol=1e-5, atol=1e-5)
    # sanity: different texts give different vectors, and the K views differ from each other
    assert not torch.allclose(batch_q[0], batch_q[1], atol=1e-3)
    assert not torch.allclose(batch_d[0, 0], batch_d[0, -1], atol=1e-3)


# ---------------------------------------------------------------- LoRA targets
def test_lora_targets_cover_every_llama_linear(base_encoder, tiny_model):
    from transformers import AutoModelForCausalLM

    encoder, _, _ = base_encoder
    assert lora_targets(encoder.backbone) == LLAMA_LINEAR
    # with a causal-LM head (model.layers.N...), the head is not a target
    assert lora_targets(AutoModelForCausalLM.from_pretrained(str(tiny_model))) == LLAMA_LINEAR


class _MiniCPM3Attention(nn.Module):
    def __init__(self, h: int = 8):
        super().__init__()
        self.q_a_proj = nn.Linear(h, 4, bias=False)
        self.q_a_layernorm = nn.LayerNorm(4)
        self.q_b_proj = nn.Linear(4, h, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, 6, bias=False)
        self.kv_a_layernorm = nn.LayerNorm(4)
        self.kv_b_proj = nn.Linear(4, 2 * h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)


class _MLP(nn.Module):
    def __init__(self, h: int = 8):
        super().__init__()
        self.gate_proj = nn.Linear(h, 2 * h, bias=False)
        self.up_proj = nn.Linear(h, 2 * h, bias=False)
        self.down_proj = nn.Linear(2 * h, h, bias=False)
        self.act_fn = nn.SiLU()


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = _MiniCPM3Attention()
        self.mlp = _MLP()
        self.input_layernorm = nn.LayerNorm(8)


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([_Layer(), _Layer()])
        self.norm = nn.LayerNorm(8)


class _FakeMiniCPM3(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = _Inner()
        self.lm_head = nn.Linear(8, 10, bias=False)


def test_lora_targets_cover_minicpm3_attention():
    assert lora_targets(_FakeMiniCPM3()) == sorted(
        ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_lora_targets_without_layers_is_an_error():
    with pytest.raises(ValueError, match="lora_target_modules"):
        lora_targets(nn.Sequential(nn.Linear(2, 2)))


# ---------------------------------------------------------------- step tokens
def test_resolve_step_tokens_adds_step_tokens(tiny_model):
    tokenizer = _tokenizer(tiny_model)
    before = len(tokenizer)
    settings = EncodingSettings(cod_steps=8)
    added = resolve_step_tokens(tokenizer, settings)
    expected = [f"<step_{i}>" for i in range(1, 9)]
    assert added == expected and settings.step_tokens == expected
    assert len(tokenizer) == before + 8
    ids = tokenizer.convert_tokens_to_ids(expected)
    assert len(set(ids)) == 8 and min(ids) >= before
    for token, token_id in zip(expected, ids):
        assert tokenizer(token, add_special_tokens=False).input_ids == [token_id]
    # inside running text each still is one id
    text_ids = tokenizer("aspects : " + " ".join(expected), add_special_tokens=False).input_ids
    assert text_ids[-8:] == ids
    # idempotent: a second call adds nothing
    again = EncodingSettings(cod_steps=8)
    assert resolve_step_tokens(tokenizer, again) == [] and again.step_tokens == expected
    assert len(tokenizer) == before + 8


def test_resolve_step_tokens_uses_minicpm_reserved_tokens():
    tokenizer, vocab = reserved_tokenizer(24)
    before = len(tokenizer)
    settings = EncodingSettings(cod_steps=8)
    assert resolve_step_tokens(tokenizer, settings) == []
    expected = [f"<reserved_{i}>" for i in range(12, 20)]
    assert settings.step_tokens == expected
    assert len(tokenizer) == before
    assert tokenizer.convert_tokens_to_ids(expected) == [vocab[t] for t in expected]
    assert tokenizer("hello " + " ".join(expected), add_special_tokens=False).input_ids[1:] == [
        vocab[t] for t in expected]


def test_resolve_step_tokens_falls_back_when_reserved_range_is_incomplete():
    tokenizer, _ = reserved_tokenizer(16)  # has <reserved_12>..<reserved_15> only
    settings = EncodingSettings(cod_steps=8)
    added = resolve_step_tokens(tokenizer, settings)
    assert settings.step_tokens == added == [f"<step_{i}>" for i in range(1, 9)]


def test_resolve_step_tokens_configured_tokens(tiny_model):
    tokenizer = _tokenizer(tiny_model)
    wrong = EncodingSettings(cod_steps=4, step_tokens=["<a>", "<b>", "<c>"])
    with pytest.raises(ValueError, match="step_tokens has 3 entries but cod_steps is 4"):
        resolve_step_tokens(tokenizer, wrong)
    chosen = ["<a>", "<b>", "<c>", "<d>"]
    settings = EncodingSettings(cod_steps=4, step_tokens=list(chosen))
    assert resolve_step_tokens(tokenizer, settings) == chosen
    assert settings.step_tokens == chosen
    assert len(set(tokenizer.convert_tokens_to_ids(chosen))) == 4


def test_resolve_step_tokens_other_modes_use_none(tiny_model):
    tokenizer = _tokenizer(tiny_model)
    before = len(tokenizer)
    settings = EncodingSettings(doc_mode="last_k_tokens", cod_steps=4, step_tokens=["<x>"] * 4)
    assert resolve_step_tokens(tokenizer, settings) == [] and settings.step_tokens == []
    assert len(tokenizer) == before


# ---------------------------------------------------------------- TextFormatter
def test_documents_end_with_prompt_and_steps_and_fit(tiny_model):
    tokenizer = _tokenizer(tiny_model)
    settings = EncodingSettings(cod_steps=8, doc_max_length=30, query_max_length=9)
    resolve_step_tokens(tokenizer, settings)
    formatter = TextFormatter(tokenizer, settings)
    prompt = tokenizer.convert_tokens_to_ids("Use eight words to represent the above text in multiple aspects :".split())
    steps = tokenizer.convert_tokens_to_ids(settings.step_tokens)
    suffix = prompt + steps
    assert tokenizer.unk_token_id not in suffix
    words = DOCS[3].split()
    texts = [" ".join(words[:n]) for n in range(0, len(words) + 1)]
    for text, ids in zip(texts, formatter.documents(texts)):
        assert len(ids) <= settings.doc_max_length
        assert ids[-len(suffix):] == suffix
        assert ids[-8:] == steps
        assert ids[0] == tokenizer.bos_token_id
        body = tokenizer(text, add_special_tokens=False).input_ids
        kept = ids[1:-len(suffix)]
        assert kept == body[:len(kept)]  # the body is cut on the right, never the suffix
        if 1 + len(body) + len(suffix) <= settings.doc_max_length:
            assert kept == body
        else:
            assert len(ids) == settings.doc_max_length
    for ids in formatter.queries([DOCS[3], "tool"], [INSTRUCTION, ""]):
        assert len(ids) <= settings.query_max_length and ids[-1] == tokenizer.eos_token_id
        assert ids[0] == tokenizer.bos_token_id


def test_an_empty_prompt_puts_the_step_tokens_right_after_the_body(tiny_model):
    tokenizer = _tokenizer(tiny_model)
    settings = EncodingSettings(cod_steps=4, doc_max_length=30, deliberation_prompt="")
    resolve_step_tokens(tokenizer, settings)
    steps = tokenizer.convert_tokens_to_ids(settings.step_tokens)
    body = tokenizer(DOCS[0], add_special_tokens=False).input_ids
    assert TextFormatter(tokenizer, settings).documents([DOCS[0]]) == [[tokenizer.bos_token_id, *body, *steps]]


def test_last_token_mode_ends_documents_with_eos(tiny_model):
    tokenizer = _tokenizer(tiny_model)
    settings = EncodingSettings(doc_mode="last_token", doc_max_length=6)
    resolve_step_tokens(tokenizer, settings)
    formatter = TextFormatter(tokenizer, settings)
    for ids in formatter.documents([DOCS[0], "editor"]):
        assert len(ids) <= 6 and ids[-1] == tokenizer.eos_token_id
    assert settings.num_views == 1


def test_formatter_rejects_room_for_no_body(tiny_model):
    tokenizer = _tokenizer(tiny_model)
    settings = EncodingSettings(cod_steps=8, doc_max_length=20)  # suffix is 12 + 8 = 20 tokens
    resolve_step_tokens(tokenizer, settings)
    with pytest.raises(ValueError, match="doc_max_length"):
        TextFormatter(tokenizer, settings)


# ---------------------------------------------------------------- training encoder, save / load
def _config(tiny_model, tmp_path, **extra) -> TrainConfig:
    return TrainConfig(model_name_or_path=str(tiny_model), dataset_file_path=str(tmp_path / "data"),
                       output_dir=str(tmp_path / "out"), lora_r=4, lora_alpha=8, lora_dropout=0.0,
                       torch_dtype="float32", **extra)


def _perturb_trainables(encoder, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in encoder.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def test_training_encoder_trains_lora_only_by_default(tiny_model, tmp_path):
    tokenizer = _tokenizer(tiny_model)
    encoder = build_training_encoder(_config(tiny_model, tmp_path), tokenizer)
    from peft import PeftModel

    assert isinstance(encoder.backbone, PeftModel)
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_A" in n or "lora_B" in n]
    assert len(lora) == 2 * 2 * len(LLAMA_LINEAR)  # A and B, 2 layers, 7 linears
    for layer in range(2):
        for name in LLAMA_LINEAR:
            assert any(f"layers.{layer}." in n and f".{name}.lora_A" in n for n in lora), (layer, name)
    assert set(trainable) == set(lora)  # base weights and step rows stay frozen, as in the released code
    assert encoder.settings.step_tokens == [f"<step_{i}>" for i in range(1, 9)]
    assert encoder.backbone.get_base_model().config.vocab_size == len(tokenizer)


@pytest.mark.parametrize("model", ["tiny_model", "tiny_reserved_model"])
def test_train_step_rows_trains_the_step_rows(model, tmp_path, request):
    folder = request.getfixturevalue(model)
    tokenizer = _tokenizer(folder)
    encoder = build_training_encoder(_config(folder, tmp_path, train_step_rows=True), tokenizer)
    tokens = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad and "trainable_tokens" in n]
    assert len(tokens) == 1 and tokens[0][1].shape[0] == 8
    formatter = TextFormatter(tokenizer, encoder.settings)
    _perturb_trainables(encoder)
    encoder.train()
    _, _, (qi, qm), (di, dm) = _batches(formatter, tokenizer.pad_token_id)
    queries, views = encoder(qi, qm, di, dm)
    debater_loss(queries, views, torch.arange(len(QUERIES)), "full").total.backward()
    assert tokens[0][1].grad is not None and tokens[0][1].grad.abs().sum(-1).gt(0).all()


@pytest.mark.parametrize("init", ["sampled", "eos"])
def test_step_token_init_sets_where_the_added_rows_start(tiny_model, tmp_path, init):
    tokenizer = _tokenizer(tiny_model)
    encoder = build_training_encoder(_config(tiny_model, tmp_path, step_token_init=init), tokenizer)
    embed = encoder.backbone.get_input_embeddings()
    vocabulary = embed.weight[:len(tokenizer) - 8].detach()
    with torch.no_grad():
        steps = embed(torch.tensor(tokenizer.convert_tokens_to_ids(encoder.settings.step_tokens)))
        eos = embed(torch.tensor([tokenizer.eos_token_id]))
    assert torch.equal(steps, eos.expand_as(steps)) == (init == "eos")
    if init == "sampled":  # distinct draws, as far apart as real rows are (not mean_resizing's 1e-9 covariance)
        step_gap = torch.pdist(steps).mean()
        vocab_gap = torch.pdist(vocabulary).mean()
        assert 0.6 < float(step_gap / vocab_gap) < 1.6, (step_gap, vocab_gap)


@pytest.mark.parametrize("init", ["default", "gaussian", "orthogonal"])
def test_every_lora_init_starts_as_the_base_model(tiny_model, tmp_path, init):
    """Embeddings equal the base model's whatever the LoRA start; only orthogonal starts B non-zero."""
    tokenizer = _tokenizer(tiny_model)
    encoder = build_training_encoder(_config(tiny_model, tmp_path, lora_init=init), tokenizer).eval()
    formatter = TextFormatter(tokenizer, encoder.settings)
    with encoder.backbone.disable_adapter():
        base = _embed(encoder, formatter, tokenizer.pad_token_id)
    for got, expected in zip(_embed(encoder, formatter, tokenizer.pad_token_id), base):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    b_sum = sum(float(p.abs().sum()) for name, p in encoder.named_parameters() if "lora_B" in name)
    assert (b_sum > 0) == (init == "orthogonal"), b_sum


def test_lora_init_rejects_inits_that_change_the_base_weights(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="pissa, olora"):
        _config(tiny_model, tmp_path, lora_init="pissa")
    with pytest.raises(ConfigError, match="even lora_r"):
        TrainConfig(model_name_or_path=str(tiny_model), dataset_file_path="data", output_dir="out",
                    lora_init="orthogonal", lora_r=3)


def test_sampled_rows_follow_the_vocabulary_covariance():
    from debater.model import vocabulary_draws

    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 6, generator=gen)
    rows = torch.randn(20000, 6, generator=gen) @ mixing + 3.0
    draws = vocabulary_draws(rows, 20000, seed=1)
    torch.testing.assert_close(draws.mean(0), rows.mean(0), atol=0.15, rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), torch.cov(rows.T), atol=0.1 * torch.cov(rows.T).abs().max(), rtol=0)
    assert torch.equal(vocabulary_draws(rows, 4, seed=1), vocabulary_draws(rows, 4, seed=1))


def test_step_token_init_rejects_unknown_values(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="step_token_init"):
        _config(tiny_model, tmp_path, step_token_init="zeros")


def test_warm_start_from_an_adapter_without_step_rows_says_they_stay_untrained(tiny_model, tmp_path, caplog):
    vanilla = build_training_encoder(_config(tiny_model, tmp_path, loss_variant="vanilla", pooling_mode="last_token"),
                                     _tokenizer(tiny_model))
    save_encoder(vanilla, _tokenizer(tiny_model), tmp_path / "vanilla", str(tiny_model), "last_token")
    full = build_training_encoder(_config(tiny_model, tmp_path / "full", train_step_rows=True), _tokenizer(tiny_model))
    save_encoder(full, _tokenizer(tiny_model), tmp_path / "full-adapter", str(tiny_model), "last_step")
    with caplog.at_level(logging.WARNING, logger="debater.model"):
        full_config = _config(tiny_model, tmp_path, train_step_rows=True,
                              peft_model_name_or_path=str(tmp_path / "full-adapter"))
        resumed = build_training_encoder(full_config, _tokenizer(tiny_model))
    assert not [r for r in caplog.records if r.name == "debater.model"]
    assert any("trainable_tokens" in n for n, p in resumed.named_parameters() if p.requires_grad)
    with caplog.at_level(logging.WARNING, logger="debater.model"):
        warm = build_training_encoder(_config(tiny_model, tmp_path, train_step_rows=True,
                                              peft_model_name_or_path=str(tmp_path / "vanilla")), _tokenizer(tiny_model))
    ours = [r.getMessage() for r in caplog.records if r.name == "debater.model"]
    assert len(ours) == 1 and "keep their initial embeddings" in ours[0]
    assert not any("trainable_tokens" in n for n, p in warm.named_parameters() if p.requires_grad)


def test_save_and_load_round_trip(tiny_model, tmp_path, base_encoder):
    tokenizer = _tokenizer(tiny_model)
    encoder = build_training_encoder(_config(tiny_model, tmp_path), tokenizer)
    _perturb_trainables(encoder, seed=1)  # move LoRA B (zero at init) and step rows away from init
    encoder.eval()
    formatter = TextFormatter(tokenizer, encoder.settings)
    trained_q, trained_d = _embed(encoder, formatter, tokenizer.pad_token_id)

    out = tmp_path / "adapter"
    save_encoder(encoder, tokenizer, out, str(tiny_model), "last_step")
    loaded, loaded_tok, pooling = load_encoder(str(out))
    assert pooling == "last_step" and not loaded.training
    assert loaded.settings.to_dict() == encoder.settings.to_dict()
    loaded_formatter = TextFormatter(loaded_tok, loaded.settings)
    assert loaded_formatter.documents(DOCS) == formatter.documents(DOCS)
    loaded_q, loaded_d = _embed(loaded, loaded_formatter, loaded_tok.pad_token_id)
    # the loaded adapter is merged into the base weights: equal up to float rounding of W + BA
    torch.testing.assert_close(loaded_q, trained_q, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loaded_d, trained_d, rtol=1e-4, atol=1e-4)

    # the comparison can fail: the untrained base encoder gives other vectors
    base, base_tok, _ = base_encoder
    base_q, base_d = _embed(base, TextFormatter(base_tok, base.settings), base_tok.pad_token_id)
    assert not torch.allclose(base_q, trained_q, atol=1e-3)
    assert not torch.allclose(base_d, trained_d, atol=1e-3)


def test_output_dir_with_adapter_folder_loads(tiny_model, tmp_path):
    tokenizer = _tokenizer(tiny_model)
    encoder = build_training_encoder(_config(tiny_model, tmp_path), tokenizer)
    save_encoder(encoder, tokenizer, tmp_path / "run" / "adapter", str(tiny_model), "multi_view")
    _, _, pooling = load_encoder(str(tmp_path / "run"))
    assert pooling == "multi_view"


def test_gradient_checkpointing_gives_same_gradients(tiny_model, tmp_path):
    plain = build_training_encoder(_config(tiny_model, tmp_path), _tokenizer(tiny_model))
    tokenizer = _tokenizer(tiny_model)
    ckpt = build_training_encoder(_config(tiny_model, tmp_path, gradient_checkpointing=True), tokenizer)
    _perturb_trainables(plain, seed=2)
    trainable = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in ckpt.named_parameters():
            if p.requires_grad:
                p.copy_(trainable[n])
    formatter = TextFormatter(tokenizer, ckpt.settings)
    _, _, (qi, qm), (di, dm) = _batches(formatter, tokenizer.pad_token_id)

    calls = {"n": 0}
    layer = ckpt.backbone.get_base_model().layers[0].mlp
    layer.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    grads, losses = [], []
    for encoder in (plain, ckpt):
        encoder.train()
        queries, views = encoder(qi, qm, di, dm)
        loss = debater_loss(queries, views, torch.arange(len(QUERIES)), "full").total
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in encoder.named_parameters() if p.requires_grad})
    # checkpointing really happened: the layer ran again (recomputed) during backward
    assert calls["n"] == 4  # queries + documents forward, then their recomputation
    torch.testing.assert_close(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
