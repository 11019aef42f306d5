"""A tiny randomly initialised Llama with a word-level tokenizer, built in code (no network, no assets): the
model of the tests and of `make gpu-check`'s smoke run."""
from __future__ import annotations

import json
from pathlib import Path


def build_tiny_model(folder: Path, texts: list[str], hidden: int = 32, layers: int = 2, seed: int = 0,
                     reserved: int = 0) -> Path:
    """A Llama with random weights and a word-level tokenizer that adds BOS, saved as an HF folder;
    ``reserved``: the tokenizer also owns ``<reserved_0>``.. as single special tokens, as MiniCPM's does."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    reserved_tokens = [f"<reserved_{i}>" for i in range(reserved)]
    words = sorted({w for t in texts for w in pre_tokenizers.Whitespace().pre_tokenize_str(t) for w in [w[0]]})
    vocab = {tok: i for i, tok in enumerate(specials + reserved_tokens + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    core.add_special_tokens(reserved_tokens)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def echo_texts(echo_jsonl: Path) -> list[str]:
    """Every query, positive and negative of an echo-data file, and the two prompts: the tiny vocabulary."""
    rows = [json.loads(line) for line in echo_jsonl.read_text().splitlines() if line.strip()]
    texts = []
    for row in rows:
        negatives = row["negative"] if isinstance(row["negative"], list) else [row["negative"]]
        texts += [row["query"], row["positive"], *negatives]
    return texts + ["Use eight words to represent the above text in multiple aspects:",
                    "Given a query, retrieve the matching document:"]
