"""The documentation can be walked: every relative link and #anchor in README.md and docs/ resolves (GitHub's
heading anchors), and every `make` target and `python -m MODULE COMMAND` it names exists. No model loads."""
from __future__ import annotations

import contextlib
import importlib
import io
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
MAKE = re.compile(r"(?<![\w./-])make[ \t]+([a-z][\w-]*)")
PYTHON_M = re.compile(r"python3?[ \t]+-m[ \t]+([\w.]+)(?:[ \t]+([a-z][\w-]*))?")
# python -m MODULE of this project -> how to list its commands
PROJECT_CLIS = {"debater": "debater.cli", "data_pipeline": "data_pipeline.cli",
                "debater.wheelhouse": "debater.wheelhouse", "benchmarks": None}


def prose(text: str) -> str:
    """The text GitHub renders as Markdown: fenced blocks and code spans removed."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def code(text: str) -> list[str]:
    """The fenced blocks and code spans, where commands are written."""
    return [m.group(0) for m in FENCE.finditer(text)] + [m.group(2) for m in CODE_SPAN.finditer(FENCE.sub("", text))]


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lower-cased, punctuation but - and _ dropped, spaces to -."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>|\*", "", text)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, repeated headings numbered -1, -2, ... as GitHub does."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = github_slug(heading)
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(page: Path) -> list[str]:
    """Relative links of a page whose file or #anchor does not exist."""
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and anchor not in anchors(linked):
            broken.append(f"{page.name}: {target} (no heading with that anchor in {linked.name})")
    return broken


@cache
def make_targets() -> frozenset[str]:
    """The targets `make help` lists, and help itself; each must also be a rule of the Makefile."""
    listed = subprocess.run(["make", "-s", "--no-print-directory", "help"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    rules = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    return frozenset(name for name in re.findall(r"^  ([a-z][\w-]*) ", listed, re.M) + ["help"] if name in rules)


@cache
def commands(module: str) -> frozenset[str]:
    """The subcommands of `python -m module`, read from its argparse help (or the benchmark list)."""
    if PROJECT_CLIS[module] is None:
        return frozenset(importlib.import_module("benchmarks.__main__").benchmarks())
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        importlib.import_module(PROJECT_CLIS[module]).main(["--help"])
    return frozenset(re.search(r"\{([\w,-]+)\}", out.getvalue()).group(1).split(","))


def unknown_commands(page: Path) -> list[str]:
    """`make TARGET` and `python -m MODULE COMMAND` named in a page's code that do not exist."""
    unknown = []
    for snippet in code(page.read_text(encoding="utf-8")):
        unknown += [f"{page.name}: make {t}" for t in MAKE.findall(snippet) if t not in make_targets()]
        for module, command in PYTHON_M.findall(snippet):
            if module.split(".")[0] not in {m.split(".")[0] for m in PROJECT_CLIS}:
                continue  # pip, pytest, venv: not ours
            if module not in PROJECT_CLIS:
                unknown.append(f"{page.name}: python -m {module} (not a command of this project)")
            elif command and command not in commands(module):
                unknown.append(f"{page.name}: python -m {module} {command}")
    return unknown


def test_every_relative_link_and_anchor_resolves():
    assert len(PAGES) > 1 and not [problem for page in PAGES for problem in broken_links(page)]


def test_every_make_target_and_python_command_named_exists():
    assert {"demo", "test", "gpu-check"} <= make_targets() and {"train", "encode"} <= commands("debater")
    assert not [problem for page in PAGES for problem in unknown_commands(page)]


def test_the_checks_catch_what_they_look_for(tmp_path):
    (tmp_path / "other.md").write_text("# Speed and memory (`make bench`)\n\n## Speed and memory (`make bench`)\n")
    page = tmp_path / "page.md"
    page.write_text("See [a](other.md#speed-and-memory-make-bench-1), [b](other.md#speed-and-memory),\n"
                    "[c](missing.md), [d](https://example.org/x#y) and `[e](nowhere.md)`.\n\n"
                    "```bash\nmake tests\nmake demo\n.venv/bin/python -m debater traine --help\n"
                    "python -m benchmarks grad_cache\npython -m data_pipeline preprocess\npython -m debater.nothing\n"
                    "python -m pytest tests\n```\n")
    assert broken_links(page) == ["page.md: other.md#speed-and-memory (no heading with that anchor in other.md)",
                                  "page.md: missing.md (no such file)"]
    assert unknown_commands(page) == ["page.md: make tests", "page.md: python -m debater traine",
                                      "page.md: python -m debater.nothing (not a command of this project)"]
