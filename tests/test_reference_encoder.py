"""The zero-shot reference (a sentence-transformers folder such as MiniLM) is mean-pooled as it was trained."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from debater.inference_encoder import load_text_encoder
from debater.reference_encoder import MeanPoolTextEncoder

TEXTS = ["a small web browser", "chess", "a game of cards for two players and more", "web"]


@pytest.fixture(scope="module")
def st_folder(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-st")
    words = sorted({w for t in TEXTS for w in t.split()})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "",
                                                      "type": "sentence_transformers.models.Transformer"}]))
    (folder / "config_sentence_transformers.json").write_text("{}")
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 6}))
    return folder


def test_mean_pooling_equals_one_text_at_a_time(st_folder):
    from transformers import AutoModel, AutoTokenizer

    encoder = load_text_encoder(str(st_folder), batch_size=3)
    assert isinstance(encoder, MeanPoolTextEncoder) and encoder.settings.num_views == 1
    got = encoder.documents(TEXTS)
    model, tokenizer = AutoModel.from_pretrained(st_folder).eval(), AutoTokenizer.from_pretrained(st_folder)
    for text, vector in zip(TEXTS, got):
        ids = tokenizer(text, truncation=True, max_length=6, return_tensors="pt")  # the folder's trained length
        with torch.no_grad():
            expected = F.normalize(model(**ids).last_hidden_state.mean(1), dim=-1)[0]
        torch.testing.assert_close(torch.from_numpy(vector), expected, atol=1e-5, rtol=1e-5)
    assert (encoder.queries(TEXTS, "Some instruction:") == got).all()  # no instruction, as it was trained
