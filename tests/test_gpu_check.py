"""`make gpu-check` without a GPU is a smoke run of the same script (so it cannot rot between GPU runs); its
checks fail on a run that did not learn; the wheelhouse's parcels carry a payload that unpacks exactly, and a
missing or damaged parcel is named."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, training_env
from safetensors.torch import save_file

from benchmarks import gpu_budget, gpu_check, preflight
from benchmarks.gpu_training import TRAINING_ARMS, check_run, stop_trees
from debater import wheelhouse


@pytest.mark.launcher
@pytest.mark.cluster
def test_smoke_run_through_make_with_an_early_deadline(tmp_path):
    """The smoke run, with the training deadline forced to its start: every part in the budget's order, each run
    stopped once it has a checkpoint, exported from it, judged and evaluated. Two of the three arms, the paper's
    format and the small-scale one (the vanilla arm's loss and pooling train in test_distributed.py): the arms
    train at once, and on 2 cores a third only slows the other two."""
    out = tmp_path / "gpu-check"
    arms = ["full_paper_format", "full_small_scale_format"]
    done = subprocess.run(["make", "-s", "gpu-check", f"GPU_CHECK_ARGS=--out {out} --training-deadline-s 0 --steps 50 "
                                                      f"--arms {' '.join(arms)}"],
                          cwd=ROOT, env=training_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "smoke" and "SMOKE RUN" in report["note"]
    assert list(report["parts"]) == list(gpu_budget.GPU_PARTS) and report["ok"]
    assert all(part["ok"] and part["seconds"] <= part["limit"] for part in report["parts"].values())
    # set-up included (each part's seconds are rounded to 0.1 s, so their sum may pass the total by rounding)
    assert report["wall_s"] >= sum(part["seconds"] for part in report["parts"].values()) - 0.05 * len(report["parts"])
    preflight = report["parts"]["preflight"]["result"]
    assert preflight["problems"] == [] and preflight["versions"]["deepspeed"] and "mteb" in preflight["import_s"]
    training = report["parts"]["training"]["result"]
    assert list(training["arms"]) == arms
    for arm, check in training["arms"].items():
        assert check["stopped_at_deadline"] and check["problems"] == [], arm
        assert 1 <= check["steps_with_finite_grad_norm"] == check["steps_logged"] < 50, arm
        assert check["largest_lora_b"] > 0, arm
    scores = report["parts"]["evaluation"]["result"]["scores"]
    assert list(scores) == ["base model (untrained)", *arms] and all(0 <= s["ndcg_at_10"] <= 1 for s in scores.values())
    assert (out / "training" / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    attention = report["parts"]["attention"]["result"]
    assert attention["backend"] == "sdpa" and attention["kernels"] and attention["finite"]
    for part in ("timing", "throughput"):
        step = report["parts"][part]["result"]
        assert step["tokens_per_step"] == (2 + 4) * 32 and step["tokens_per_s"] > 0
        assert step["tokens_per_s_without_lora_dropout"] > 0
        assert 0 < step["diagnostics_s"] and step["diagnostics_step_share"] == pytest.approx(
            step["diagnostics_s"] / min(step["step_s"][1:]), rel=1e-2, abs=1e-4)
    assert "not run again" in report["parts"]["throughput"]["result"]["note"]  # the same tiny step as timing's
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# gpu-check (smoke)") and "SMOKE RUN" in markdown


def test_the_gpu_budget_adds_up():
    """Parts run one after another, each stopped at its limit: every reserve covers its limit, the training
    share holds the deadline, the wait for a first checkpoint, the stop and every export, the outer timeout is
    the reserves plus a margin and fits the 10 minutes a lent GPU machine runs one command, and the docs give
    exactly these numbers."""
    parts = gpu_budget.GPU_PARTS
    assert all(part.reserve >= part.limit > 0 for part in parts.values())
    share, arms = gpu_budget.GPU_TRAINING, len(TRAINING_ARMS)
    deadline = gpu_budget.training_deadline(parts["training"].limit, share, arms)
    assert deadline >= 60
    assert deadline + share.first_checkpoint + share.stop + arms * share.export == parts["training"].limit
    assert gpu_budget.outer_timeout() == sum(p.reserve for p in parts.values()) + gpu_budget.MARGIN
    assert gpu_budget.MARGIN > 0 and gpu_budget.outer_timeout() + 10 <= 600  # `timeout -k 10 N`
    settings = gpu_check.plan(False, ROOT / "runs", None)
    assert settings["parts"] is parts
    assert settings["training"]["save_steps"] == gpu_budget.GPU_CHECKPOINT_EVERY == 5
    docs = (ROOT / "docs" / "gpu-check.md").read_text()
    assert gpu_budget.table() in docs and f"timeout -k 10 {gpu_budget.outer_timeout()} make gpu-check" in docs


def _fake_run(folder: Path, grad_norms: list[float], lora_b: float) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder / "tensorboard"))
    for step, value in enumerate(grad_norms, start=1):
        writer.add_scalar("train/grad_norm", value, step)
        writer.add_scalar("loss/total", 2.0, step)
        writer.add_scalar("train/in_batch_top1", 0.5, step)
    writer.close()
    (folder / "adapter").mkdir(parents=True)
    save_file({"layer.lora_A.weight": torch.ones(2, 2), "layer.lora_B.weight": torch.full((2, 2), lora_b)},
              str(folder / "adapter" / "adapter_model.safetensors"))
    return folder


def test_check_run_fails_on_a_skipped_update_and_an_adapter_that_did_not_move(tmp_path):
    good = check_run(_fake_run(tmp_path / "good", [1.0, 0.5, 0.7], 1e-3), steps=3)
    assert good["ok"] and good["problems"] == []
    bad = check_run(_fake_run(tmp_path / "bad", [1.0, math.inf], 0.0), steps=3)
    assert not bad["ok"]
    assert bad["problems"] == ["2 of 3 steps logged", "1 steps with a zero or non-finite gradient norm",
                               "the adapter did not move"]


def _tiny_wheel(folder: Path) -> Path:
    """A real (pure-Python) wheel of a one-module package, built offline."""
    project = folder / "project"
    (project / "gpucheckprobe").mkdir(parents=True)
    (project / "gpucheckprobe" / "__init__.py").write_text("VALUE = 42\n")
    (project / "pyproject.toml").write_text('[project]\nname = "gpucheckprobe"\nversion = "1.0"\n'
                                            '[build-system]\nrequires = ["setuptools"]\n'
                                            'build-backend = "setuptools.build_meta"\n')
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(folder / "wheels"), str(project)], check=True)
    return folder / "wheels"


def test_parcels_unpack_exactly_and_name_what_is_missing(tmp_path, monkeypatch):
    wheels = _tiny_wheel(tmp_path)
    source = tmp_path / "source"
    data = source / "assets" / "data" / "debian" / "test"
    data.mkdir(parents=True)
    (data / "corpus.jsonl").write_text('{"_id": "d1", "text": "hello"}\n' * 5000)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(torch.randint(0, 256, (300_000,), dtype=torch.uint8).numpy().tobytes())
    def gather_offline(out: Path, requirements: Path) -> None:
        shutil.copytree(wheels, out)

    monkeypatch.setattr(wheelhouse, "gather_wheels", gather_offline)
    monkeypatch.chdir(source)
    house = tmp_path / "house"
    manifest = wheelhouse.pack(house, gguf, parcel_mib=0.1, data_folders=("assets/data/debian/test",))
    assert len(manifest["parts"]) >= 3
    assert all(part["bytes"] <= 0.1 * 2**20 for part in manifest["parts"])
    assert sorted(p.name for p in house.iterdir()) == [f"parcel-{i}" for i in range(1, len(manifest["parts"]) + 1)]

    target = tmp_path / "gpu-machine"
    target.mkdir()
    second = house / "parcel-2" / manifest["parts"][1]["file"]
    kept = second.read_bytes()
    second.unlink()
    with pytest.raises(wheelhouse.WheelhouseError, match="parcel-2 not on this machine"):
        wheelhouse.unpack(house, target, tmp_path / "site")
    second.write_bytes(kept[:-1] + bytes([kept[-1] ^ 1]))
    with pytest.raises(wheelhouse.WheelhouseError, match="parcel-2 arrived damaged"):
        wheelhouse.unpack(house, target, tmp_path / "site")
    second.write_bytes(kept)

    placed = wheelhouse.unpack(house, target, tmp_path / "site")
    assert (target / "assets/data/debian/test/corpus.jsonl").read_bytes() == (data / "corpus.jsonl").read_bytes()
    assert Path(placed["gguf"]).read_bytes() == gguf.read_bytes()
    probe = subprocess.run([sys.executable, "-c", "import gpucheckprobe; print(gpucheckprobe.VALUE)"],
                           env={"PYTHONPATH": placed["site"]}, capture_output=True, text=True)
    assert probe.stdout.strip() == "42"


def test_wheelhouse_pins_agree_with_requirements():
    def pins(path: Path) -> dict[str, str]:
        return dict(line.split("==") for line in wheelhouse.pinned_wheels(path))

    ours, gpu = pins(ROOT / "requirements.txt"), pins(ROOT / "requirements-gpu-check.txt")
    shared = set(ours) & set(gpu)
    assert {"deepspeed", "datasets", "mteb", "gguf"} <= shared
    assert {name: gpu[name] for name in shared} == {name: ours[name] for name in shared}


def test_stopping_a_launch_stops_every_process_under_it():
    """A launch stopped at the deadline must not leave ranks running (the deepspeed runner of a local launch does
    not pass SIGTERM on; here a shell that leaves its children behind when it dies stands in for it)."""
    import psutil

    launch = subprocess.Popen(["bash", "-c", "sleep 300 & sleep 300 & wait"])
    time.sleep(0.5)
    children = psutil.Process(launch.pid).children(recursive=True)
    assert len(children) == 2
    stop_trees([launch])
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def _fake_distribution(site: Path, name: str, requires: tuple[str, ...] = (), code: str = "") -> None:
    """An installed distribution as pip leaves one: its metadata (with Requires-Dist) and its module."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
                                   + "".join(f"Requires-Dist: {line}\n" for line in requires))
    (site / f"{name}.py").write_text(code)


def test_preflight_gives_one_line_naming_the_package_of_each_problem(tmp_path, monkeypatch):
    from importlib import metadata

    _fake_distribution(tmp_path, "probe_needs", ("pyarrow>=999", "no-such-package-xyz>=1", "numpy; extra == 'docs'",
                                                 "torch>=999; sys_platform == 'win32'"))
    _fake_distribution(tmp_path, "probe_broken", code='raise OSError("libcudart.so.13: cannot open shared object")')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert preflight.requirement_problems(["probe_needs"]) == [
        f"pyarrow: {metadata.version('pyarrow')} installed, probe_needs needs pyarrow>=999",
        "no-such-package-xyz: not installed (probe_needs needs no-such-package-xyz>=1)"]
    seconds, problems = preflight.import_all(["json", "probe_broken"])
    assert set(seconds) == {"json", "probe_broken"}
    assert problems == ["probe_broken: import failed (OSError: libcudart.so.13: cannot open shared object)"]
    pins = tmp_path / "requirements-gpu-check.txt"
    pins.write_text("pyarrow==0.0.1\n")
    monkeypatch.setattr(preflight, "REQUIREMENTS", pins)
    assert preflight.pin_problems() == [f"pyarrow: {metadata.version('pyarrow')} found where the wheelhouse pins "
                                        "0.0.1 (is the unpacked site first on PYTHONPATH?)"]
