"""Which instruction each training file gets.

The 14 echo-data files carry the E5 task descriptions used by the released
DEBATER code; allnli and quora_duplicates alternate two descriptions by line.
Any other file needs an entry in a small JSON datasets file
(``{"file_stem": "instruction"}`` or a list to alternate), else it is an error.
"""
from __future__ import annotations

import json
from pathlib import Path

from debater.core.errors import UserError

DATASETS_FILE_NAME = "datasets.json"

ECHO_INSTRUCTIONS: dict[str, list[str]] = {
    "allnli": [
        "Given a premise, retrieve a hypothesis that is entailed by the premise:",
        "Retrieve semantically similar text:",
    ],
    "dureader": ["Given a Chinese search query, retrieve web passages that answer the question:"],
    "eli5_question_answer": ["Provided a user question, retrieve the highest voted answers on Reddit ELI5 forum:"],
    "fever": ["Given a claim, retrieve documents that support or refute the claim:"],
    "hotpot_qa": ["Given a multi-hop question, retrieve documents that can help answer the question:"],
    "miracl": ["Given a question, retrieve Wikipedia passages that answer the question:"],
    "mrtydi": ["Given a question, retrieve Wikipedia passages that answer the question:"],
    "msmarco_passage": ["Given a web search query, retrieve relevant passages that answer the query:"],
    "msmarco_document": ["Given a web search query, retrieve relevant documents that answer the query:"],
    "nq": ["Given a question, retrieve Wikipedia passages that answer the question:"],
    "quora_duplicates": [
        "Given a question, retrieve questions that are semantically equivalent to the given question:",
        "Find questions that have the same meaning as the input question:",
    ],
    "squad": ["Retrieve Wikipedia passages that answer the question:"],
    "t2ranking": ["Given a Chinese search query, retrieve web passages that answer the question:"],
    "trivia_qa": ["Retrieve Wikipedia passages that answer the question:"],
}


class RegistryError(UserError, ValueError):
    """A training file has no known instruction, or the datasets file is malformed."""


def load_extra_instructions(path: Path | None) -> dict[str, list[str]]:
    """Read a datasets file; a missing optional file means no extra entries."""
    if path is None or not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RegistryError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: expected an object mapping file stem -> instruction")
    extra: dict[str, list[str]] = {}
    for stem, value in raw.items():
        options = [value] if isinstance(value, str) else value
        if not (isinstance(options, list) and options and all(isinstance(o, str) and o.strip() for o in options)):
            raise RegistryError(f"{path}: entry {stem!r} must be a non-empty string or list of strings")
        extra[stem] = options
    return extra


def instructions_for(stem: str, extra: dict[str, list[str]]) -> list[str]:
    """The instruction(s) for a file stem; line i uses ``options[i % len(options)]``."""
    if stem in extra:
        return extra[stem]
    if stem in ECHO_INSTRUCTIONS:
        return ECHO_INSTRUCTIONS[stem]
    raise RegistryError(
        f"no instruction known for training file '{stem}.jsonl': add it to a "
        f"{DATASETS_FILE_NAME} next to the data, e.g. {{\"{stem}\": \"Given a ..., retrieve ...:\"}}"
    )
