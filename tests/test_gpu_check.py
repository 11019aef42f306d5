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

from benchmarks.gpu_training import check_run, stop_tree
from debater import wheelhouse

PARTS = {"environment", "attention", "throughput", "training"}


@pytest.mark.launcher
def test_smoke_run_through_make(tmp_path):
    out = tmp_path / "gpu-check"
    done = subprocess.run(["make", "-s", "gpu-check", f"GPU_CHECK_ARGS=--out {out}"], cwd=ROOT, env=training_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "smoke" and "SMOKE RUN" in report["note"]
    assert set(report["parts"]) == PARTS and report["ok"]
    assert all(part["ok"] for part in report["parts"].values())
    training = report["parts"]["training"]["result"]
    for arm, check in training["arms"].items():
        assert check["exit"] == 0 and check["steps_with_finite_grad_norm"] == 3, arm
        assert check["largest_lora_b"] > 0, arm
    assert len(training["scores"]) == 4
    assert all(0 <= scores["ndcg_at_10"] <= 1 for scores in training["scores"].values())
    assert (out / "training" / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    attention = report["parts"]["attention"]["result"]
    assert attention["backend"] == "sdpa" and attention["kernels"] and attention["finite"]
    throughput = report["parts"]["throughput"]["result"]
    assert throughput["tokens_per_step"] == (2 + 4) * 32 and throughput["tokens_per_s"] > 0
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# gpu-check (smoke)") and "SMOKE RUN" in markdown


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
    stop_tree(launch)
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
