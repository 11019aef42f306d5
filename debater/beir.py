"""Local BEIR-format folders (corpus.jsonl, queries.jsonl, qrels/test.tsv) and fixed subsets of them."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

DEFAULT_INSTRUCTION = "Given a query, retrieve relevant documents that answer the query:"
INSTRUCTION_FILE = "instruction.txt"


@dataclass
class BeirData:
    corpus: dict[str, dict]            # id -> {"title", "text"}
    queries: dict[str, str]            # id -> text
    qrels: dict[str, dict[str, int]]   # query id -> {doc id: relevance}
    instruction: str


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/test.tsv")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{number}: not valid JSON") from None
    return rows


def _stable_key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def read_beir(folder: Path, split: str = "test", max_queries: int | None = None,
              max_corpus: int | None = None) -> BeirData:
    """Read a BEIR folder; with limits, keep a fixed hash-ordered subset of queries and, for the
    corpus, every relevant document of the kept queries plus hash-ordered distractors."""
    corpus = {str(r["_id"]): {"title": r.get("title") or "", "text": r.get("text") or ""}
              for r in _read_jsonl(folder / "corpus.jsonl")}
    queries = {str(r["_id"]): r["text"] for r in _read_jsonl(folder / "queries.jsonl")}
    qrels: dict[str, dict[str, int]] = {}
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        raise FileNotFoundError(f"{qrels_path} is missing")
    for number, line in enumerate(qrels_path.read_text().splitlines(), start=1):
        parts = line.split("\t")
        if number == 1 and parts[0] == "query-id":
            continue
        if len(parts) < 3:
            raise ValueError(f"{qrels_path}:{number}: expected query-id, corpus-id, score")
        qrels.setdefault(parts[0], {})[parts[1]] = int(float(parts[2]))
    queries = {q: t for q, t in queries.items() if any(v > 0 for v in qrels.get(q, {}).values())}
    if max_queries is not None and max_queries < len(queries):
        kept = sorted(queries, key=_stable_key)[:max_queries]
        queries = {q: queries[q] for q in kept}
    qrels = {q: qrels[q] for q in queries}
    if max_corpus is not None and max_corpus < len(corpus):
        needed = {d for rel in qrels.values() for d in rel if d in corpus}
        distractors = [d for d in sorted(corpus, key=_stable_key) if d not in needed]
        keep = needed | set(distractors[:max(0, max_corpus - len(needed))])
        corpus = {d: corpus[d] for d in corpus if d in keep}
    return BeirData(corpus, queries, qrels, read_instruction(folder))


def read_instruction(folder: Path) -> str:
    """The query instruction of a data folder (its instruction.txt), else the generic one."""
    instruction_file = folder / INSTRUCTION_FILE
    return instruction_file.read_text().strip() if instruction_file.exists() else DEFAULT_INSTRUCTION


def read_texts(path: Path) -> tuple[list[str], list[str]]:
    """(ids, texts) of a corpus or query file, for encode and search.

    A ``.jsonl`` file has one object per line with ``text``, an id in ``_id`` or ``id`` (else its row
    number) and an optional ``title``, joined to the text as mteb joins them, so search sees documents
    as the evaluation does. Any other file holds one text per non-empty line, numbered 1, 2, ...
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a .jsonl file (BEIR corpus/queries) or a text file")
    if path.suffix == ".jsonl":
        ids, texts = [], []
        for number, row in enumerate(_read_jsonl(path), start=1):
            if not isinstance(row.get("text"), str):
                raise ValueError(f"{path}: row {number} has no string 'text' field")
            ids.append(str(row.get("_id", row.get("id", number))))
            title = row.get("title") or ""
            texts.append(f"{title} {row['text']}".strip() if title else row["text"].strip())
    else:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        ids = [str(number) for number in range(1, len(texts) + 1)]
    if not texts:
        raise ValueError(f"{path} holds no texts")
    if len(set(ids)) != len(ids):
        duplicate = next(i for i, count in Counter(ids).items() if count > 1)
        raise ValueError(f"{path}: id {duplicate!r} occurs more than once; ids must be unique")
    return ids, texts
