"""Export on demand: any checkpoint becomes an adapter folder that loads without the training config and
encodes like the model did at that step; ``--merged`` adds a plain Hugging Face model with the same embeddings."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, fixture_texts, training_env

from debater.cli import main
from debater.core.prompts import EncodingSettings
from debater.export import MERGED, export_checkpoint
from debater.inference_encoder import TextEncoder
from debater.model import DebaterEncoder, load_encoder

pytestmark = pytest.mark.launcher

INSTRUCTION = "Given a query, retrieve the matching document:"


@pytest.fixture(scope="module")
def exports(interrupted_run, tmp_path_factory):
    """The run's latest checkpoint (step 4, its last) through the CLI with --merged; step 3 in process."""
    assert interrupted_run.resumed.returncode == 0
    out = tmp_path_factory.mktemp("exports")
    done = subprocess.run([sys.executable, "-m", "debater", "export", "--checkpoint", str(interrupted_run.output_dir),
                           "--out", str(out / "latest"), "--merged"],
                          cwd=ROOT, env=training_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    export_checkpoint(interrupted_run.output_dir / "checkpoints" / "step-3", out / "step-3")
    return out


def _embeddings(encoder, tokenizer, pooling) -> np.ndarray:
    texts = fixture_texts()[:12]
    embed = TextEncoder(encoder, tokenizer, pooling, batch_size=4)
    return np.concatenate([embed.queries(texts, INSTRUCTION), embed.documents(texts)])


def test_last_checkpoint_exports_the_end_of_training_encoder(exports, interrupted_run):
    trained = _embeddings(*load_encoder(str(interrupted_run.output_dir)))  # its adapter/, written at step 4
    exported = _embeddings(*load_encoder(str(exports / "latest")))
    np.testing.assert_allclose(exported, trained, rtol=0, atol=1e-6)


def test_an_earlier_checkpoint_exports_its_own_weights(exports):
    earlier = _embeddings(*load_encoder(str(exports / "step-3")))
    last = _embeddings(*load_encoder(str(exports / "latest")))
    assert np.abs(earlier - last).max() > 1e-4


def test_merged_model_loads_as_a_plain_model_with_the_same_embeddings(exports):
    from transformers import AutoModel, AutoTokenizer

    folder = exports / "latest" / MERGED
    backbone = AutoModel.from_pretrained(folder)
    assert not any("lora" in name for name in backbone.state_dict())
    meta = json.loads((exports / "latest" / "debater.json").read_text())
    encoder = DebaterEncoder(backbone, EncodingSettings(**meta["settings"])).eval()
    merged = _embeddings(encoder, AutoTokenizer.from_pretrained(folder), meta["pooling"])
    adapter = _embeddings(*load_encoder(str(exports / "latest")))
    np.testing.assert_allclose(merged, adapter, rtol=0, atol=1e-5)
    # eval/encode load the merged folder by itself, with the trained settings from its own debater.json
    np.testing.assert_allclose(_embeddings(*load_encoder(str(folder))), adapter, rtol=0, atol=1e-5)


def test_export_of_a_missing_checkpoint_is_a_one_line_error(tmp_path, caplog):
    assert main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "holds no finished checkpoint" in caplog.text
