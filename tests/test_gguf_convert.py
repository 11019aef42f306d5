"""The GGUF conversion takes EOS and padding from the GGUF's own metadata and checks the converted folder against
it: transformers 5.17 read SmolLM2's EOS as <|im_start|> (BOS's id) and set no padding, which would change every
text's last token, and a folder that says so is refused in one line."""
from __future__ import annotations

import shutil

import pytest
from transformers import AutoTokenizer

from debater.gguf_convert import (ConversionError, check_special_tokens, find_package_gguf, gguf_integers,
                                  gguf_special_token_ids)


def _write_gguf(path, eos: int, pad: int | None) -> None:
    """A small GGUF written by the gguf package itself: a vocabulary (an array of strings) before the ids."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_token_list(["<unk>", "<|im_start|>", "<|im_end|>", "hello"])
    writer.add_token_scores([0.0, 0.5, 0.25, -1.0])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(eos)
    if pad is not None:
        writer.add_pad_token_id(pad)
    writer.add_context_length(2048)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def test_the_ids_are_read_from_the_ggufs_header(tmp_path):
    _write_gguf(tmp_path / "a.gguf", eos=2, pad=3)
    assert gguf_special_token_ids(tmp_path / "a.gguf") == {"eos": 2, "pad": 3}
    assert gguf_integers(tmp_path / "a.gguf", ("tokenizer.ggml.bos_token_id", "llama.context_length")) == {
        "tokenizer.ggml.bos_token_id": 1, "llama.context_length": 2048}
    _write_gguf(tmp_path / "b.gguf", eos=2, pad=None)
    assert gguf_special_token_ids(tmp_path / "b.gguf") == {"eos": 2, "pad": 2}  # no padding named: EOS pads
    assert gguf_special_token_ids(find_package_gguf()) == {"eos": 2, "pad": 2}  # SmolLM2: <|im_end|> for both


def test_a_converted_folder_that_names_another_eos_is_refused_in_one_line(tiny_model, tmp_path):
    folder = tmp_path / "converted"
    shutil.copytree(tiny_model, folder)
    ids = {"eos": 2, "pad": 2}
    assert check_special_tokens(folder, ids) == {"eos": "</s>", "pad": "</s>", "eos_id": 2, "pad_id": 2}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.eos_token = "<s>"  # what transformers 5.17 made of SmolLM2's: BOS's token
    tokenizer.save_pretrained(folder)
    with pytest.raises(ConversionError) as refused:
        check_special_tokens(folder, ids)
    message = str(refused.value)
    assert "\n" not in message and "eos is 1 where the GGUF says 2" in message and "convert again" in message
