"""The ``README.md`` of an export: what the model is (base model, training config, data, the evaluation that
exists for it) and how to use it (Python API, sentence-transformers, command line), written from the records
the run left (train_config.json, batch_plan.json, eval/results.md) and the export's debater.json."""
from __future__ import annotations

import json
from pathlib import Path

from debater.model_folder import ENCODER_FILE, default_instruction

# the training keys a reader needs to judge the model; the whole config is in the run's train_config.json
CARD_KEYS = ("loss_variant", "pooling_mode", "cod_steps", "deliberation_prompt", "step_tokens", "max_seq_length",
             "query_max_length", "per_device_train_batch_size", "negatives_per_query", "learning_rate",
             "stop_after_n_steps", "lora_r", "lora_alpha", "torch_dtype", "seed")


def _evaluation(run_dir: Path, step: int) -> str:
    """The run's evaluation table, when it is of the exported step (``make demo`` evaluates the run's end)."""
    table = run_dir / "eval" / "results.md"
    adapter_meta = run_dir / "adapter" / ENCODER_FILE
    if not table.exists():
        return f"No evaluation was found for this run (`{table}`); `make eval MODEL=<this folder>` makes one."
    evaluated_step = json.loads(adapter_meta.read_text()).get("trained", {}).get("checkpoint_step") \
        if adapter_meta.exists() else None
    if evaluated_step != step:
        return (f"The run's evaluation (`{table}`) is of step {evaluated_step}, not of this export (step {step}); "
                "`make eval MODEL=<this folder>` evaluates this one.")
    subset = run_dir / "eval" / "results.json"
    limits = json.loads(subset.read_text()).get("subset", {}) if subset.exists() else {}
    return f"From `{table}` (subset: {json.dumps(limits)}):\n\n{table.read_text().strip()}"


def model_card(meta: dict, config: dict, run_dir: Path, with_sentence_transformers: bool) -> str:
    """The card's Markdown for an export whose debater.json is ``meta``, trained with ``config``."""
    trained = meta["trained"]
    base = meta.get("base_model_hub") or meta.get("base_model_absolute") or meta["base_model"]
    settings = "\n".join(f"| `{key}` | `{json.dumps(config[key])}` |" for key in CARD_KEYS if key in config)
    instructions = "\n".join(f"  - `{stem}`: " + " / ".join(f'"{text}"' for text in options)
                             for stem, options in meta["instructions"].items()) or "  - (none recorded)"
    plan = run_dir / "batch_plan.json"
    batches = json.loads(plan.read_text()) if plan.exists() else {}
    front = "---\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\ntags:\n" \
            "- sentence-transformers\n- feature-extraction\n- debater\n---\n\n" if with_sentence_transformers else ""
    st_usage = ("""
### sentence-transformers (the `sentence-transformers/` folder; merged weights, no remote code)

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("sentence-transformers")           # this export's sub-folder
queries = model.encode_query(["pdf viewer"])                    # the instruction is the "query" prompt
documents = model.encode_document(["A PDF viewer for GNOME."])  # the deliberation suffix is added for you
print(model.similarity(queries, documents))
```
""" if with_sentence_transformers else "")
    return f"""{front}# DEBATER dense retriever

A decoder LM trained as a dense retriever with DEBATER (Chain-of-Deliberation + Self-Distillation): a
document is embedded by the last of its {config.get("cod_steps", "K")} step tokens (`{meta["pooling"]}` pooling),
a query by its last token after the instruction.

- Base model: `{base}`
- Trained weights: step {trained.get("checkpoint_step")} of the run `{trained.get("run")}`
- Data: `{config.get("dataset_file_path")}` ({batches.get("batches", "?")} planned batches of
  {batches.get("global_batch", "?")} rows); the query instruction of each training file:
{instructions}
- Default query instruction: "{default_instruction(meta["instructions"])}"

## Training settings

| key | value |
|---|---|
{settings}

## Evaluation

{_evaluation(run_dir, trained.get("checkpoint_step"))}

## Usage

### Python

```python
from debater import Retriever
retriever = Retriever.load("path/to/this/export")
hits = retriever.search(["pdf viewer"], ["A PDF viewer for GNOME.", "A mail client."], top_k=1)
```
{st_usage}
### Command line

```
python -m debater encode --model path/to/this/export --corpus corpus.jsonl --out index
python -m debater search --model path/to/this/export --index index --query "pdf viewer"
```
"""


def write_model_cards(out: Path, config: dict, run_dir: Path, st_folder: Path | None) -> None:
    """``out/README.md``, and the same card in the sentence-transformers folder when there is one."""
    meta = json.loads((out / ENCODER_FILE).read_text())
    (out / "README.md").write_text(model_card(meta, config, run_dir, st_folder is not None))
    if st_folder is not None:
        (st_folder / "README.md").write_text(model_card(meta, config, run_dir, True))
