"""mteb 2.x glue: a DEBATER encoder as an mteb model, and local BEIR folders as mteb tasks."""
from __future__ import annotations

import numpy as np

from debater.beir import DEFAULT_INSTRUCTION, BeirData
from debater.core.errors import UserError
from debater.inference_encoder import TextEncoder

# Query instructions per BEIR task, as the released evaluation uses them.
BEIR_INSTRUCTIONS = {
    "ArguAna": "Given a claim, find documents that refute the claim:",
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim:",
    "NFCorpus": "Given a question, retrieve relevant documents that best answer the question:",
    "FiQA2018": "Given a financial question, retrieve user replies that best answer the question:",
    "QuoraRetrieval": "Given a question, retrieve questions that are semantically equivalent to the given question:",
    "SCIDOCS": "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper:",
    "TRECCOVID": "Given a query on COVID-19, retrieve documents that answer the query:",
    "Touche2020": "Given a question, retrieve detailed and persuasive arguments that answer the question:",
    "NQ": "Given a question, retrieve Wikipedia passages that answer the question:",
    "HotpotQA": "Given a multi-hop question, retrieve documents that can help answer the question:",
    "FEVER": "Given a claim, retrieve documents that support or refute the claim:",
    "ClimateFEVER": "Given a claim about climate change, retrieve documents that support or refute the claim:",
    "DBPedia": "Given a query, retrieve relevant entity descriptions from DBPedia:",
    "MSMARCO": "Given a web search query, retrieve relevant passages that answer the query:",
}


def make_mteb_model(text_encoder: TextEncoder, name: str, instructions: dict[str, str]):
    """An ``AbsEncoder`` whose queries get the task's instruction and documents the deliberation suffix.

    ``text_encoder`` may be anything with ``pooling``, ``queries`` and ``documents`` as TextEncoder has.
    """
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType

    multi_view = text_encoder.pooling == "multi_view"

    class DebaterMtebModel(AbsEncoder):
        def __init__(self):
            self.mteb_model_meta = ModelMeta(
                loader=None, name=f"debater/{name}", revision="local", release_date=None, languages=None,
                n_parameters=None, memory_usage_mb=None, max_tokens=None, embed_dim=None, license=None,
                open_weights=True, public_training_code=None, public_training_data=None, framework=["PyTorch"],
                reference=None, similarity_fn_name=ScoringFunction.MAX_SIM if multi_view else ScoringFunction.COSINE,
                use_instructions=True, training_datasets=set(), modalities=["text"])

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            texts = [t for batch in inputs for t in batch["text"]]
            if prompt_type == PromptType.query:
                instruction = instructions.get(task_metadata.name) or BEIR_INSTRUCTIONS.get(
                    task_metadata.name, DEFAULT_INSTRUCTION)
                vectors = text_encoder.queries(texts, instruction)
                return vectors[:, None, :] if multi_view else vectors
            return text_encoder.documents(texts).astype(np.float32)

    return DebaterMtebModel()


def score_with_mteb(model, tasks, batch_size: int, metrics: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Run mteb on ``tasks`` (no result cache); {task name: {metric: value}} of the test split."""
    import mteb

    try:
        result = mteb.evaluate(model, tasks, cache=None, overwrite_strategy="always", co2_tracker=False,
                               show_progress_bar=False, encode_kwargs={"batch_size": batch_size,
                                                                       "show_progress_bar": False})
    except OSError as err:
        raise UserError(f"mteb could not load a task's data (offline?): {err}") from None
    scores = {}
    for task_result in result.task_results:
        row = next(s for s in task_result.scores["test"] if s["hf_subset"] == "default")
        scores[task_result.task_name] = {m: float(row[m]) for m in metrics}
    return scores


def make_local_task(name: str, data: BeirData):
    """An ``AbsTaskRetrieval`` over an in-memory BEIR folder (no hub access)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    metadata = TaskMetadata(
        name=name, description=f"Local BEIR folder {name}", dataset={"path": f"local/{name}", "revision": "local"},
        type="Retrieval", category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"],
        main_score="ndcg_at_10", reference=None, date=None, domains=None, task_subtypes=None, license=None,
        annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation="")

    class LocalRetrieval(AbsTaskRetrieval):
        def load_data(self, num_proc=None, **kwargs):
            if self.data_loaded:
                return
            split = RetrievalSplitData(
                corpus=Dataset.from_list([{"id": i, **doc} for i, doc in data.corpus.items()]),
                queries=Dataset.from_list([{"id": i, "text": t} for i, t in data.queries.items()]),
                relevant_docs=data.qrels, top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    LocalRetrieval.metadata = metadata
    return LocalRetrieval()
