"""The encoder on real backbone classes beyond Llama: MiniCPM3 (native, MLA attention) and a
MiniCPM-style model loaded through trust_remote_code, both with MiniCPM's reserved step tokens."""
from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import fixture_texts, reserved_tokenizer

from debater.core.config import config_from_dict
from debater.core.padding import left_pad
from debater.core.prompts import TextFormatter
from debater.losses import debater_loss
from debater.model import build_training_encoder, load_encoder, save_encoder

MLA_AND_MLP = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
               "down_proj"}
RESERVED_STEPS = [f"<reserved_{i}>" for i in range(12, 20)]
WORDS = tuple(sorted({w for t in fixture_texts() for w in t.replace(":", " :").split()}))

REMOTE_CONFIG = '''
from transformers import LlamaConfig


class TinyCPMConfig(LlamaConfig):
    """Stands in for MiniCPM's remote configuration: a Llama layout plus embedding scaling."""

    model_type = "tinycpm"

    def __init__(self, scale_emb=12.0, **kwargs):
        self.scale_emb = scale_emb
        super().__init__(**kwargs)
'''
REMOTE_MODEL = '''
from transformers import LlamaModel

from .configuration_tinycpm import TinyCPMConfig


class TinyCPMModel(LlamaModel):
    """Like MiniCPM's remote code: input embeddings scaled by scale_emb."""

    config_class = TinyCPMConfig

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.config.scale_emb
        return super().forward(inputs_embeds=inputs_embeds, **kwargs)
'''


def _config(folder: Path, **extra):
    return config_from_dict({"model_name_or_path": str(folder), "dataset_file_path": "unused",
                             "output_dir": "unused", "lora_r": 4, "lora_dropout": 0.0, "cod_steps": 8,
                             "max_seq_length": 40, "torch_dtype": "float32", "attn_implementation": "eager",
                             **extra})


@pytest.fixture(scope="module")
def minicpm3_folder(tmp_path_factory) -> Path:
    from transformers import MiniCPM3Config, MiniCPM3ForCausalLM

    folder = tmp_path_factory.mktemp("minicpm3")
    tokenizer, vocab = reserved_tokenizer(24, WORDS)
    torch.manual_seed(0)
    config = MiniCPM3Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
                            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=128,
                            pad_token_id=2, dim_model_base=16, scale_emb=4)
    MiniCPM3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def remote_folder(tmp_path_factory) -> Path:
    """A checkpoint whose model class exists only as code inside the folder (auto_map)."""
    folder = tmp_path_factory.mktemp("tinycpm-remote")
    (folder / "configuration_tinycpm.py").write_text(textwrap.dedent(REMOTE_CONFIG))
    (folder / "modeling_tinycpm.py").write_text(textwrap.dedent(REMOTE_MODEL))
    spec_cfg = importlib.util.spec_from_file_location("tinycpm_src.configuration_tinycpm",
                                                      folder / "configuration_tinycpm.py")
    package = importlib.util.module_from_spec(importlib.util.spec_from_loader("tinycpm_src", loader=None))
    package.__path__ = [str(folder)]
    sys.modules["tinycpm_src"] = package
    config_module = importlib.util.module_from_spec(spec_cfg)
    sys.modules["tinycpm_src.configuration_tinycpm"] = config_module
    spec_cfg.loader.exec_module(config_module)
    tokenizer, vocab = reserved_tokenizer(24, WORDS)
    config = config_module.TinyCPMConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, pad_token_id=2, scale_emb=3.0)
    config.auto_map = {"AutoConfig": "configuration_tinycpm.TinyCPMConfig",
                       "AutoModel": "modeling_tinycpm.TinyCPMModel"}
    config.save_pretrained(folder)
    spec_model = importlib.util.spec_from_file_location("tinycpm_src.modeling_tinycpm",
                                                        folder / "modeling_tinycpm.py")
    model_module = importlib.util.module_from_spec(spec_model)
    sys.modules["tinycpm_src.modeling_tinycpm"] = model_module
    spec_model.loader.exec_module(model_module)
    torch.manual_seed(0)
    model_module.TinyCPMModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for name in ("tinycpm_src", "tinycpm_src.configuration_tinycpm", "tinycpm_src.modeling_tinycpm"):
        sys.modules.pop(name)
    return folder


def _batch(tokenizer, encoder, texts):
    formatter = TextFormatter(tokenizer, encoder.settings)
    return formatter, left_pad(formatter.documents(texts), tokenizer.pad_token_id)


def _assert_padding_invariant(tokenizer, encoder, texts) -> None:
    """Each document's views are the same alone as inside a left-padded batch."""
    formatter, (ids, mask) = _batch(tokenizer, encoder, texts)
    with torch.no_grad():
        together = encoder.encode_documents(ids, mask)
        for index, text in enumerate(texts):
            alone = encoder.encode_documents(*left_pad(formatter.documents([text]), 2))
            torch.testing.assert_close(together[index], alone[0], atol=1e-5, rtol=1e-5)


def _one_step(tokenizer, encoder) -> torch.Tensor:
    formatter = TextFormatter(tokenizer, encoder.settings)
    texts = fixture_texts()
    queries = left_pad(formatter.queries(texts[:4], ["Given a query, retrieve the matching document:"] * 4), 2)
    docs = left_pad(formatter.documents(texts[4:12]), 2)
    q, views = encoder(*queries, *docs)
    loss = debater_loss(q, views, torch.arange(4), "full").total
    loss.backward()
    return loss


def test_minicpm3_lora_reaches_the_mla_projections_and_trains(minicpm3_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minicpm3_folder)
    encoder = build_training_encoder(_config(minicpm3_folder), tokenizer)
    assert type(encoder.backbone.base_model.model).__name__ == "MiniCPM3Model"
    assert set(encoder.backbone.peft_config["default"].target_modules) == MLA_AND_MLP
    assert encoder.settings.step_tokens == RESERVED_STEPS  # MiniCPM's reserved tokens, nothing added
    assert encoder.backbone.get_input_embeddings().weight.shape[0] == len(tokenizer)
    loss = _one_step(tokenizer, encoder)
    assert torch.isfinite(loss)
    grads = {name: p.grad for name, p in encoder.named_parameters() if p.requires_grad}
    for target in MLA_AND_MLP:
        b_grads = [g for n, g in grads.items() if f".{target}.lora_B." in n]
        assert len(b_grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in b_grads), target
    assert all(".lora_" in n for n in grads)  # the base weights stay frozen


def test_minicpm3_padding_does_not_change_embeddings(minicpm3_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minicpm3_folder)
    encoder = build_training_encoder(_config(minicpm3_folder), tokenizer).eval()
    texts = fixture_texts()[:5]
    _assert_padding_invariant(tokenizer, encoder, texts)


def test_remote_code_backbone_needs_trust_remote_code(remote_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(remote_folder)
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_training_encoder(_config(remote_folder), tokenizer)


def test_remote_code_backbone_trains_saves_and_loads(remote_folder, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(remote_folder)
    encoder = build_training_encoder(_config(remote_folder, trust_remote_code=True), tokenizer)
    assert type(encoder.backbone.base_model.model).__name__ == "TinyCPMModel"
    assert encoder.settings.step_tokens == RESERVED_STEPS
    assert set(encoder.backbone.peft_config["default"].target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert torch.isfinite(_one_step(tokenizer, encoder))
    with torch.no_grad():
        for name, param in encoder.named_parameters():  # make the adapter non-trivial before saving
            if "lora_B" in name:
                param.add_(0.05)
    encoder.eval()
    save_encoder(encoder, tokenizer, tmp_path / "adapter", str(remote_folder), "last_step", trust_remote_code=True)
    loaded, loaded_tokenizer, _ = load_encoder(str(tmp_path / "adapter"))
    formatter, (ids, mask) = _batch(loaded_tokenizer, loaded, fixture_texts()[:3])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_documents(ids, mask), encoder.encode_documents(ids, mask),
                                   atol=1e-5, rtol=1e-5)


def test_remote_code_base_model_evaluates_only_when_trusted(remote_folder):
    """The untrained baseline of a remote-code model (eval --trust-remote-code)."""
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_encoder(str(remote_folder))
    encoder, tokenizer, pooling = load_encoder(str(remote_folder), trust_remote_code=True)
    assert type(encoder.backbone).__name__ == "TinyCPMModel" and pooling == "last_step"
    assert encoder.settings.step_tokens == RESERVED_STEPS and len(tokenizer) == encoder.backbone.config.vocab_size


@pytest.mark.parametrize("family", ["Qwen2", "Mistral"])
def test_native_families_get_every_projection_and_stay_padding_invariant(family, tmp_path):
    import transformers

    tokenizer, vocab = reserved_tokenizer(24, WORDS)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=2)
    torch.manual_seed(0)
    getattr(transformers, f"{family}ForCausalLM")(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    encoder = build_training_encoder(_config(tmp_path), tokenizer)
    assert type(encoder.backbone.base_model.model).__name__ == f"{family}Model"
    assert set(encoder.backbone.peft_config["default"].target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    encoder.eval()
    texts = fixture_texts()[:4]
    _assert_padding_invariant(tokenizer, encoder, texts)
