"""The paths a new user takes, through the commands they type: each mistake gets one line naming the cause and
the fix, with no traceback, before anything is loaded or written (no launch: each command stops in its first
second)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import training_env

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CPU_DS = str(ROOT / "ds_configs" / "zero2_cpu.json")


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The command failed with exit code 2 and said why in exactly one line, without a traceback."""
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(lines) == 1, lines
    return lines[0]


def debater(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "debater", *args], cwd=cwd, env=env or training_env(),
                          capture_output=True, text=True, timeout=120)


def write_config(tmp_path: Path, **values) -> Path:
    config = {"model_name_or_path": str(FIXTURES), "dataset_file_path": str(FIXTURES / "echo"),
              "output_dir": str(tmp_path / "run"), **values}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    return path


def test_train_without_a_deepspeed_config_names_both_ways(tmp_path):
    line = one_line_error(debater("train", str(write_config(tmp_path))))
    assert "--deepspeed ds_configs/zero2_cpu.json" in line and "launch/single_node.sh" in line


def test_an_unknown_key_given_with_set_is_blamed_on_set(tmp_path):
    config = write_config(tmp_path)
    line = one_line_error(debater("train", str(config), "--deepspeed", CPU_DS, "--set", "learning_rat=1e-3"))
    assert "--set: unknown key 'learning_rat'; did you mean 'learning_rate'?" in line and str(config) not in line
    line = one_line_error(debater("train", str(config), "--deepspeed", CPU_DS, "--set", "lora_r=big"))
    assert line.endswith("--set: key 'lora_r' should be int, got 'big'")


def test_a_missing_dataset_is_named_by_its_key_and_leaves_no_output_dir(tmp_path):
    config = write_config(tmp_path, dataset_file_path="no/such/echo-data")
    line = one_line_error(debater("train", str(config), "--deepspeed", CPU_DS))
    assert "dataset_file_path: no/such/echo-data does not exist" in line and str(ROOT) in line
    assert not (tmp_path / "run").exists()


def test_a_python_without_the_packages_says_how_to_get_them(tmp_path):
    """As `python -m debater` with a system python: torch cannot be imported."""
    hide_torch = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['debater'] + sys.argv[1:]; "
                  "runpy.run_module('debater', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", hide_torch, "encode", "--model", "m", "--corpus", "c.jsonl",
                           "--out", str(tmp_path / "out")], cwd=ROOT, env=training_env(), capture_output=True,
                          text=True, timeout=120)
    line = one_line_error(done)
    assert "source .venv/bin/activate" in line and "make setup" in line and "torch" in line


def test_help_is_plain_text_and_every_option_says_what_it_does():
    for args in (["--help"], ["encode", "--help"], ["search", "--help"], ["eval", "--help"]):
        done = debater(*args)
        assert done.returncode == 0 and "``" not in done.stdout, done.stdout
    encode = debater("encode", "--help").stdout
    assert "(default: 32)" in encode and "(default: npy)" in encode


# --------------------------------------------------------------------------- the launch scripts


def fake_launcher(folder: Path, name: str) -> Path:
    """A stand-in for deepspeed/torchrun that records its working directory and arguments."""
    folder.mkdir(exist_ok=True)
    script = folder / name
    script.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@" > "$RECORD"\n')
    script.chmod(0o755)
    return folder


@pytest.mark.parametrize("script, launcher, nproc_flag", [("single_node.sh", "deepspeed", "--num_gpus"),
                                                         ("torchrun.sh", "torchrun", "--nproc_per_node")])
def test_launch_scripts_take_set_without_a_ds_config_and_keep_the_callers_directory(tmp_path, script, launcher,
                                                                                    nproc_flag):
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    fakes = fake_launcher(tmp_path / "bin", launcher)
    env = {**training_env(), "RECORD": str(tmp_path / "record")}
    env["PATH"] = f"{fakes}:{env['PATH']}"
    done = subprocess.run(["bash", str(ROOT / "launch" / script), "cfg.json", "1", "--set", "k=v"], cwd=caller,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    cwd, *args = (tmp_path / "record").read_text().splitlines()
    assert cwd == str(caller)  # so cfg.json and the config's own relative paths are read from the caller's folder
    assert args[-5:] == ["cfg.json", "--deepspeed", CPU_DS, "--set", "k=v"]  # the machine's default DS config
    assert args[args.index(nproc_flag) + 1] == "1"


def test_a_launch_script_without_deepspeed_says_how_to_get_it(tmp_path):
    """A checkout without .venv, and no deepspeed on PATH."""
    shutil.copytree(ROOT / "launch", tmp_path / "repo" / "launch")
    env = {**training_env(), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(["bash", str(tmp_path / "repo" / "launch" / "single_node.sh"), "cfg.json"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    line = one_line_error(done)
    assert "'deepspeed' not found on PATH" in line and "source" in line and ".venv/bin/activate" in line


def test_a_launch_script_given_a_ds_config_for_nproc_says_so(tmp_path):
    env = {**training_env(), "RECORD": str(tmp_path / "record")}
    env["PATH"] = f"{fake_launcher(tmp_path / 'bin', 'deepspeed')}:{env['PATH']}"
    done = subprocess.run(["bash", str(ROOT / "launch" / "single_node.sh"), "cfg.json", CPU_DS], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert "NPROC must be a number of ranks" in one_line_error(done)


# --------------------------------------------------------------------------- make


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", *args], cwd=ROOT, env=training_env(), capture_output=True, text=True,
                          timeout=60)


def test_make_preprocess_with_data_but_no_out_refuses(tmp_path):
    done = make("preprocess", f"DATA={tmp_path}")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "OUT=" in done.stderr and "CONFIG=" in done.stderr and "assets/preprocessed/debian" in done.stderr


def test_make_eval_without_models_refuses_instead_of_a_full_evaluation():
    done = make("eval")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert 'MODEL="' in done.stderr and "--max-queries" in done.stderr


def test_make_tensorboard_serves_loopback_with_port_and_logdir():
    assert "--host 127.0.0.1 --port 6006" in make("-n", "tensorboard").stdout
    assert "--logdir runs/demo --host 127.0.0.1 --port 7007" in make("-n", "tensorboard", "PORT=7007",
                                                                     "LOGDIR=runs/demo").stdout
