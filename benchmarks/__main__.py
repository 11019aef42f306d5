"""``python -m benchmarks NAME [args]``: run one benchmark; with no NAME, or ``--help``, list them."""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def benchmarks() -> dict[str, str]:
    """NAME -> the first line of its docstring, for every module here with a top-level ``main``. Read from the
    source, not imported: importing them all would load torch to print a list."""
    found = {}
    for path in sorted(HERE.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if path.stem != "__main__" and any(isinstance(node, ast.FunctionDef) and node.name == "main"
                                           for node in tree.body):
            found[path.stem] = (ast.get_docstring(tree) or "").split("\n", 1)[0]
    return found


def usage() -> str:
    found = benchmarks()
    width = max(map(len, found))
    lines = ["usage: python -m benchmarks NAME [args]   (python -m benchmarks NAME --help: its arguments)", "",
             "benchmarks:", *(f"  {name:<{width}}  {text}" for name, text in found.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in benchmarks():
        print(f"unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(f"benchmarks.{name}").main(rest)


if __name__ == "__main__":
    sys.exit(main())
