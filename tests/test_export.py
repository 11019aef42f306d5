"""Export on demand: any checkpoint becomes an adapter folder that loads without the training config and
encodes like the model did at that step; ``--merged`` adds a plain Hugging Face model with the same embeddings,
``--sentence-transformers`` a SentenceTransformer folder; an export replaces its folder whole and says which
step it holds; a checkpoint given as a model is refused with the command that exports it."""
from __future__ import annotations

import json
import shutil
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
    """The run's latest checkpoint (step 4, its last) through the CLI with --merged and --sentence-transformers;
    step 3 in process."""
    assert interrupted_run.resumed.returncode == 0
    out = tmp_path_factory.mktemp("exports")
    done = subprocess.run([sys.executable, "-m", "debater", "export", "--checkpoint", str(interrupted_run.output_dir),
                           "--out", str(out / "latest"), "--merged", "--sentence-transformers"],
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
    assert f"checkpoint folder {tmp_path / 'nowhere'} does not exist" in caplog.text
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "holds no finished checkpoint" in caplog.text


def test_an_export_over_an_earlier_one_replaces_it_whole_and_records_its_step(exports, interrupted_run):
    replaced = exports / "replaced"
    shutil.copytree(exports / "latest", replaced)  # step 4 with merged/ and sentence-transformers/
    export_checkpoint(interrupted_run.output_dir / "checkpoints" / "step-3", replaced)
    assert sorted(p.name for p in replaced.iterdir()) == sorted(p.name for p in (exports / "step-3").iterdir())
    meta = json.loads((replaced / "debater.json").read_text())
    assert meta["trained"]["checkpoint_step"] == 3 and meta["trained"]["checkpoint"].endswith("step-3")
    assert json.loads((exports / "latest" / "debater.json").read_text())["trained"]["checkpoint_step"] == 4
    np.testing.assert_array_equal(_embeddings(*load_encoder(str(replaced))),
                                  _embeddings(*load_encoder(str(exports / "step-3"))))


def test_an_export_does_not_replace_a_folder_that_is_not_an_export(interrupted_run, tmp_path, caplog):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(interrupted_run.output_dir), "--out", str(tmp_path)]) == 2
    assert "is not an earlier export" in caplog.text and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("model", ["checkpoints/step-4", "checkpoints"])
def test_a_checkpoint_given_as_a_model_says_to_export_it_first(interrupted_run, model, tmp_path, caplog):
    path = str(interrupted_run.output_dir / model)
    assert main(["encode", "--model", path, "--corpus", str(ROOT / "tests" / "fixtures" / "beir" / "corpus.jsonl"),
                 "--out", str(tmp_path / "o")]) == 2
    message = caplog.records[-1].getMessage()
    assert f"{path} is a training checkpoint, not a model: export it first: `make export CKPT={path} OUT=DIR`" \
        in message and "\n" not in message


def test_sentence_transformers_folder_of_the_cli_export_embeds_as_the_adapter(exports):
    from sentence_transformers import SentenceTransformer

    texts = fixture_texts()[:12]
    ours = TextEncoder(*load_encoder(str(exports / "latest")), batch_size=4)
    model = SentenceTransformer(str(exports / "latest" / "sentence-transformers"), device="cpu")
    assert (model.encode_query(texts) * ours.queries(texts)).sum(1).min() >= 0.9999
    # the tiny word-level vocabulary has no digits, which sentence-transformers needs to find the suffix it
    # restores after truncation (test_sentence_transformers_export.py covers truncation): untruncated texts here
    whole = [t for t in texts if len(ours.formatter.documents([t])[0]) < ours.settings.doc_max_length]
    assert whole and (model.encode_document(whole) * ours.documents(whole)).sum(1).min() >= 0.9999


def test_the_export_has_a_model_card(exports, interrupted_run):
    card = (exports / "latest" / "README.md").read_text()
    config = json.loads((interrupted_run.output_dir / "train_config.json").read_text())
    assert config["model_name_or_path"] in card and f"step 4 of the run `{interrupted_run.output_dir}`" in card
    assert '"Given a query, retrieve the matching document:"' in card  # the fixture data's instruction
    # training recorded each file's instruction, and both its adapter and the export carry it
    trained_with = {"tiny_retrieval": [json.loads((ROOT / "tests" / "fixtures" / "echo" / "datasets.json")
                                                  .read_text())["tiny_retrieval"]]}
    for folder in (interrupted_run.output_dir / "adapter", exports / "latest"):
        assert json.loads((folder / "debater.json").read_text())["instructions"] == trained_with
    assert "from debater import Retriever" in card and "python -m debater search" in card
    assert "No evaluation was found" in card
    st_card = (exports / "latest" / "sentence-transformers" / "README.md").read_text()
    assert st_card.startswith("---\nlibrary_name: sentence-transformers") and "model.encode_query" in st_card
