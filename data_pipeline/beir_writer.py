"""Write a held-out retrieval set as a local BEIR folder (what ``debater eval --tasks FOLDER`` reads)."""
from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.stage_tokenize import write_atomic


def write_jsonl(path: Path, rows) -> None:
    write_atomic(path, lambda tmp: tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)))


def write_beir(folder: Path, pairs: list[tuple[str, str, str]], instruction: str) -> None:
    """``pairs`` of (id, query, document): each query's one relevant document is its own pair's, both under
    the pair's id; plus the instruction queries are encoded with."""
    write_jsonl(folder / "corpus.jsonl", ({"_id": name, "title": "", "text": text} for name, _, text in pairs))
    write_jsonl(folder / "queries.jsonl", ({"_id": name, "text": query} for name, query, _ in pairs))
    write_atomic(folder / "qrels" / "test.tsv", lambda tmp: tmp.write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{name}\t{name}\t1\n" for name, _, _ in pairs)))
    write_atomic(folder / "instruction.txt", lambda tmp: tmp.write_text(instruction + "\n"))
