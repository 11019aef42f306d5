"""Imports run one way: ``debater.core`` -> ``data_pipeline`` -> the rest of ``debater`` -> ``benchmarks``.

Read from the source (every import statement of every .py file, at any depth, including the lazy ones inside
functions), not from what happens to be imported at run time."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# lowest first; a module may import its own layer and those below it
LAYERS = ("debater.core", "data_pipeline", "debater", "benchmarks")
PACKAGES = ("debater", "data_pipeline", "benchmarks")


def layer_of(module: str) -> int | None:
    """The index in LAYERS of a dotted module name, or None for a module outside the project."""
    matches = [i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")]
    return min(matches) if matches else None  # debater.core.x is in debater.core, not in debater


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of everything a file imports; ``from a import b`` counts as ``a.b`` (b may be a
    module), relative imports are resolved against the file's package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def layer_violations(root: Path) -> list[str]:
    """``file:line: module (layer) imports name (a higher layer)`` for every import that runs back up."""
    problems = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            own = layer_of(module_name(path, root))
            for line, name in imported_modules(path, root):
                target = layer_of(name)
                if target is not None and target > own:
                    problems.append(f"{path.relative_to(root)}:{line}: {LAYERS[own]} imports {name} "
                                    f"({LAYERS[target]}, a higher layer)")
    return problems


def test_imports_run_one_way():
    assert layer_violations(ROOT) == []


def test_every_package_file_is_checked():
    checked = {module_name(p, ROOT) for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    assert {"debater.core.prompts", "debater.core.padding", "data_pipeline.loader", "debater.train",
            "benchmarks.common"} <= checked


@pytest.mark.parametrize("file, source, bad", [
    ("debater/core/prompts.py", "from debater.model import load_encoder\n", "debater.model.load_encoder"),
    ("debater/core/prompts.py", "def f():\n    import data_pipeline.loader\n", "data_pipeline.loader"),
    ("debater/core/prompts.py", "from .. import train\n", "debater.train"),
    ("data_pipeline/loader.py", "from debater import distributed\n", "debater.distributed"),
    ("data_pipeline/cli.py", "from debater.config import load_config\n", "debater.config.load_config"),
    ("debater/inference_encoder.py", "from benchmarks.common import write_result\n",
     "benchmarks.common.write_result"),
])
def test_an_import_back_up_a_layer_fails(tmp_path, file, source, bad):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "debater" / "core").mkdir()
    allowed = {"debater/core/padding.py": "import torch\nfrom debater.core.prompts import DEFAULT_PROMPT\n",
               "data_pipeline/reader.py": "from debater.core import prompts\nfrom . import pieces\n",
               "debater/model.py": "from data_pipeline.loader import RankLoader\nfrom debater.core.config import x\n",
               "benchmarks/report.py": "from debater.train import train\nfrom data_pipeline import cli\n"}
    for name, text in {**allowed, file: source}.items():
        (tmp_path / name).write_text(text)
    problems = layer_violations(tmp_path)
    assert len(problems) == 1 and problems[0].startswith(f"{file}:") and f"imports {bad} " in problems[0]
