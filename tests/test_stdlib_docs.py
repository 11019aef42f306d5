"""The standard-library docstring set: built from a small fake standard library, read back by the reader the
evaluation uses, every left-out docstring counted by its reason."""
from __future__ import annotations

import json
import textwrap

from data_pipeline.cli import main as pipeline_main
from debater.beir import read_beir

LONG = "This paragraph explains the behaviour in enough words to be a document worth retrieving by its summary."


def docstring_module(*functions: tuple[str, str]) -> str:
    return "".join(f"def {name}():\n    '''{textwrap.indent(doc, '    ').strip()}'''\n\n" for name, doc in functions)


def test_builds_a_beir_folder_from_public_docstrings_and_counts_every_drop(tmp_path):
    stdlib = tmp_path / "lib"
    (stdlib / "pkg").mkdir(parents=True)
    (stdlib / "test").mkdir()
    (stdlib / "pkg" / "__init__.py").write_text(docstring_module(("wrap", f"Wrap a text into lines.\n\n{LONG}")))
    (stdlib / "pkg" / "tools.py").write_text(
        docstring_module(("spin", f"Spin the wheel many times.\n\n{LONG} Twice."),
                         ("_hidden", f"A private helper function here.\n\n{LONG} Private."),
                         ("terse", "Too short a body here.\n\nOnly a few words."),
                         ("same_a", f"Open the same door now.\n\n{LONG} A."),
                         ("same_b", f"Open the same door now.\n\n{LONG} B."),
                         ("tiny", f"Tiny.\n\n{LONG} Tiny."))
        + "class Wheel:\n    '''A wheel that turns round.\n\n    " + LONG + " Wheel.'''\n\n"
        "    def turn(self):\n        '''Turn the wheel once more.\n\n        " + LONG + " Turn.'''\n")
    (stdlib / "test" / "test_tools.py").write_text(docstring_module(("check", f"Check the tools work.\n\n{LONG}")))
    (stdlib / "_private.py").write_text(docstring_module(("go", f"Go somewhere else now.\n\n{LONG}")))
    (stdlib / "broken.py").write_text("def (:\n")
    out = tmp_path / "set"
    assert pipeline_main(["build-stdlib-docs", "--out", str(out), "--stdlib", str(stdlib)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dropped"] == {"body_too_short": 1, "duplicate_summary": 2, "summary_length": 1}
    assert summary["unreadable_modules"] == 1 and summary["docstrings"] == 4 + summary["pairs"]
    data = read_beir(out / "test")
    assert sorted(data.queries) == ["pkg.tools.Wheel", "pkg.tools.Wheel.turn", "pkg.tools.spin", "pkg.wrap"]
    assert data.queries["pkg.wrap"] == "Wrap a text into lines."
    assert data.corpus["pkg.tools.spin"]["text"] == f"{LONG} Twice."
    assert data.qrels["pkg.wrap"] == {"pkg.wrap": 1}
    assert data.instruction.startswith("Given the one-line summary of a Python function")
    again = pipeline_main(["build-stdlib-docs", "--out", str(out), "--stdlib", str(tmp_path / "elsewhere")])
    assert again == 0  # built once: a second call reads summary.json and touches nothing


def test_a_folder_without_docstrings_is_a_one_line_error(tmp_path, caplog):
    (tmp_path / "lib").mkdir()
    assert pipeline_main(["build-stdlib-docs", "--out", str(tmp_path / "set"), "--stdlib", str(tmp_path / "lib")]) == 2
    assert "no usable docstrings" in caplog.text and not (tmp_path / "set").exists()
