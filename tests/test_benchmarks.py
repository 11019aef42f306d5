"""One entry point for the benchmarks: ``python -m benchmarks`` lists them, ``python -m benchmarks NAME`` runs
one; every benchmark has the same ``main`` and names its machine, model and output the same way."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common
from benchmarks.__main__ import benchmarks
from benchmarks.__main__ import main as run_benchmark
from debater.core.cli_support import EMBEDDED_MODEL

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted(benchmarks())
OWN_OUTPUT = {"gpu_check": "runs/gpu-check"}  # a folder of report.json and report.md, as issue 15 names it


def test_every_benchmark_is_listed_with_a_one_line_description():
    listed = subprocess.run([sys.executable, "-m", "benchmarks"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    assert {"ablation", "encoding", "grad_cache", "preprocess", "report", "trainer"} <= set(NAMES)
    for name, text in benchmarks().items():
        assert text and "\n" not in text and len(text) <= 100, name
        assert f"  {name}  " in listed and text in listed
    assert subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout == listed


def test_an_unknown_benchmark_is_refused_with_the_list(capsys):
    assert run_benchmark(["no_such_benchmark"]) == 2
    assert "unknown benchmark 'no_such_benchmark'" in capsys.readouterr().err


@pytest.mark.parametrize("name", NAMES)
def test_every_benchmark_has_the_same_main(name):
    tree = ast.parse((ROOT / "benchmarks" / f"{name}.py").read_text())
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    assert ast.unparse(main.args) == "argv: list[str] | None=None"
    assert main.returns is None or ast.unparse(main.returns) in ("int", "None")  # the exit code, None for 0
    assert not any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body), \
        "run through python -m benchmarks, not as a module of its own"


@pytest.mark.parametrize("name", [n for n in NAMES if n != "report"])
def test_help_names_the_entry_point_and_the_default_output(name, capsys):
    with pytest.raises(SystemExit) as done:
        run_benchmark([name, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith(f"usage: python -m benchmarks {name} ")
    assert f"(default: {OWN_OUTPUT.get(name, f'runs/bench/{name}')})" in text
    assert "--model" not in text or f"(default: {EMBEDDED_MODEL})" in text


def test_a_result_records_machine_model_and_command(tmp_path, capsys):
    path = common.write_result({"name": "x", "summary": "x: 2.00x"}, tmp_path / "x", "some/model")
    assert path == tmp_path / "x.json"
    result = json.loads(path.read_text())
    assert result["model"] == "some/model" and "cores" in result["machine"] and result["command"]
    assert capsys.readouterr().out == "x: 2.00x\n"


def test_report_runs_through_the_entry_point(tmp_path):
    (tmp_path / "trainer.json").write_text(json.dumps({"summary": "trainer 1.11x", "machine": "m", "command": "c"}))
    assert run_benchmark(["report", str(tmp_path)]) == 0
    assert "- **trainer**: trainer 1.11x" in (tmp_path / "report.md").read_text()


def test_measured_run_counts_a_spike_shorter_than_its_sampling():
    spike = "import time; b = bytearray(200 << 20); del b; time.sleep(0.2); print('done')"
    peak, seconds, stdout = common.measured_run([sys.executable, "-c", spike])
    assert peak >= 200 and stdout == "done\n" and seconds > 0.2


def test_measured_run_raises_with_the_failing_commands_stderr():
    with pytest.raises(RuntimeError, match="exited with 3: oops"):
        common.measured_run([sys.executable, "-c", "import sys; sys.stderr.write('oops'); sys.exit(3)"])
