"""``OUT/sentence-transformers``: an export that ``SentenceTransformer(path)`` loads offline and that embeds as
our encoder does, with sentence-transformers' own modules only (no ``trust_remote_code``).

- ``Transformer`` over the merged weights. Its tokenizer carries a chat template that writes what
  ``core/prompts.py`` writes: a query is ``instruction + " " + text`` then EOS, a document is its text then
  the deliberation suffix (prompt and step tokens). sentence-transformers renders every text through it,
  passing ``task`` ("query" from ``encode_query``, "document" from ``encode_document``).
- Body-first truncation: ``query_length`` / ``document_length`` are our limits; the text is cut at the limit
  and sentence-transformers writes the template's fixed tail (EOS or the suffix) back over the last positions
  ("restore_suffix"), so the step tokens are never truncated, as in training.
- ``Pooling("lasttoken")``: a query's EOS, a document's last step token (``last_step``); then ``Normalize``.
- The ``query`` prompt is the instruction the model was trained with (``prompts``), so ``encode_query``
  uses it unless given another ``prompt``.
- Right padding: the merged model gets default position ids, which start at 0 only on the right-padded side.

A ``multi_view`` model (several vectors per document) has no sentence-transformers form and is refused.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from debater.core.errors import UserError
from debater.core.prompts import EncodingSettings, TextFormatter, step_suffix_text
from debater.export import MERGED
from debater.model_folder import ENCODER_FILE, default_instruction

log = logging.getLogger(__name__)
ST_FOLDER = "sentence-transformers"


def chat_template(prefix: str, query_end: str, document_end: str) -> str:
    """A Jinja chat template: ``prefix``, every message's content (the prompt arrives as a system message
    before the text), then ``query_end`` for ``task == "query"`` and ``document_end`` otherwise. The fixed parts
    are raw blocks, so their spaces and braces are kept as they are."""
    def raw(text: str) -> str:
        return "{% raw %}" + text + "{% endraw %}" if text else ""

    return (raw(prefix) + "{% for message in messages %}{{ message['content'] }}{% endfor %}"
            + "{% if task == 'query' %}" + raw(query_end) + "{% else %}" + raw(document_end) + "{% endif %}")


def write_sentence_transformers(adapter_dir: Path) -> Path:
    """Write ``adapter_dir/sentence-transformers`` from ``adapter_dir/merged`` (see ``export.write_merged``)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoModel, AutoTokenizer

    merged = adapter_dir / MERGED
    meta = json.loads((merged / ENCODER_FILE).read_text())
    if meta["pooling"] == "multi_view":
        raise UserError("a multi_view model embeds a document as several vectors, which sentence-transformers "
                        "cannot hold: export it without SENTENCE_TRANSFORMERS, or train with pooling_mode last_step")
    settings = EncodingSettings(**meta["settings"])
    tokenizer = AutoTokenizer.from_pretrained(merged, trust_remote_code=meta["trust_remote_code"])
    formatter = TextFormatter(tokenizer, settings)
    prefix_ids = tokenizer("", add_special_tokens=True).input_ids
    if prefix_ids and prefix_ids[-1] == tokenizer.eos_token_id:
        raise UserError(f"{merged}: its tokenizer adds EOS by itself, which the sentence-transformers export "
                        "cannot reproduce")
    document_end = step_suffix_text(settings) if settings.doc_mode == "step_tokens" else tokenizer.eos_token
    tokenizer.chat_template = chat_template("".join(tokenizer.convert_ids_to_tokens(prefix_ids)),
                                            tokenizer.eos_token, document_end)
    tokenizer.padding_side = "right"
    out = adapter_dir / ST_FOLDER
    AutoModel.from_pretrained(merged, trust_remote_code=meta["trust_remote_code"]).save_pretrained(out)
    tokenizer.save_pretrained(out)
    document_length = (settings.doc_body_max_length + len(formatter.doc_suffix) if settings.doc_body_max_length
                       else settings.doc_max_length)
    transformer = Transformer(str(out), query_length=settings.query_max_length, document_length=document_length,
                              modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"},
                                               "message": {"method": "forward", "method_output_name":
                                                           "last_hidden_state", "format": "flat"}},
                              module_output_name="token_embeddings",
                              model_kwargs={"trust_remote_code": meta["trust_remote_code"]},
                              processor_kwargs={"trust_remote_code": meta["trust_remote_code"]})
    transformer.max_seq_length = max(settings.query_max_length, document_length)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
    instruction = default_instruction(meta["instructions"])
    model = SentenceTransformer(modules=[transformer, pooling, Normalize()], similarity_fn_name="cosine",
                                prompts={"query": f"{instruction} ", "document": ""})
    model.save(str(out), create_model_card=False)
    log.debug("sentence-transformers folder written to %s", out)
    return out
