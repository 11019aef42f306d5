"""Build a second held-out retrieval set, from another real source than the Debian one: the docstrings of the
Python standard library of the interpreter running this (every machine with Python has it; nothing is fetched).

Query = a public function's or class's one-paragraph summary, document = the rest of its docstring. Sources are
read with ``ast``, never imported (some standard modules act on import). Test and private modules and names are
left out, and so is every summary or body that is too short or not unique, with the count of each in
summary.json. Nothing here is ever trained on: the whole set is a BEIR test folder.
"""
from __future__ import annotations

import ast
import json
import logging
import re
import sys
import sysconfig
from collections import Counter
from pathlib import Path

from data_pipeline.beir_writer import write_beir
from data_pipeline.stage_tokenize import write_atomic

log = logging.getLogger(__name__)
INSTRUCTION = "Given the one-line summary of a Python function or class, retrieve its full documentation:"
MIN_SUMMARY_WORDS = 4
MAX_SUMMARY_WORDS = 40
MIN_BODY_WORDS = 12
SKIPPED_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
                 "turtledemo", "_bundled"}


def module_files(stdlib: Path) -> list[tuple[str, Path]]:
    """(dotted module name, file) of every public, non-test module under ``stdlib``, in a fixed order."""
    found = []
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(p in SKIPPED_PARTS or p.startswith(("_", "test_")) for p in parts):
            continue
        found.append((".".join(parts), path))
    return found


def docstrings(module: str, source: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) of the module's public functions, classes and methods."""
    found = []

    def visit(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if child.name.startswith("_"):
                    continue
                name = f"{prefix}.{child.name}"
                text = ast.get_docstring(child)
                if text:
                    found.append((name, text))
                if isinstance(child, ast.ClassDef):
                    visit(child, name)

    visit(ast.parse(source), module)
    return found


def split_docstring(text: str) -> tuple[str, str]:
    """(summary: the first paragraph on one line, body: the remaining paragraphs, each on one line)."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip())]
    return paragraphs[0], "\n".join(p for p in paragraphs[1:] if p)


def select_pairs(entries: list[tuple[str, str]]) -> tuple[list[tuple[str, str, str]], Counter]:
    """(id, summary, body) of the usable docstrings, and the count of each reason one was left out."""
    dropped: Counter = Counter()
    split = [(name, *split_docstring(text)) for name, text in entries]
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    summaries = Counter(norm(summary) for _, summary, _ in split)
    bodies = Counter(norm(body) for _, _, body in split)
    kept = []
    for name, summary, body in split:
        words = len(summary.split())
        if not MIN_SUMMARY_WORDS <= words <= MAX_SUMMARY_WORDS:
            dropped["summary_length"] += 1
        elif len(body.split()) < MIN_BODY_WORDS:
            dropped["body_too_short"] += 1
        elif summaries[norm(summary)] > 1:
            dropped["duplicate_summary"] += 1
        elif bodies[norm(body)] > 1:
            dropped["duplicate_body"] += 1
        else:
            kept.append((name, summary, body))
    return kept, dropped


def build_stdlib_docs(out_dir: Path, stdlib: Path | None = None) -> dict:
    """Write the BEIR folder ``out_dir/test`` and ``out_dir/summary.json``; idempotent."""
    summary_path = out_dir / "summary.json"
    if summary_path.exists():
        log.info("standard-library docs set already built at %s", out_dir)
        return json.loads(summary_path.read_text())
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    entries, unreadable = [], 0
    for module, path in module_files(stdlib):
        try:
            entries += docstrings(module, path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            unreadable += 1
    pairs, dropped = select_pairs(entries)
    if not pairs:
        raise ValueError(f"no usable docstrings under {stdlib}: is it a Python standard library?")
    write_beir(out_dir / "test", pairs, INSTRUCTION)
    summary = {"stdlib": str(stdlib), "python": sys.version.split()[0], "docstrings": len(entries),
               "unreadable_modules": unreadable, "dropped": dict(sorted(dropped.items())), "pairs": len(pairs)}
    write_atomic(summary_path, lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    return summary
