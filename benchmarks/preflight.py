"""The GPU check's first part: imports, version constraints, CUDA, GPU, Triton and flash-attn, in seconds.

Every package a later part imports is imported here, in the check's own process, whose path the later parts'
processes share (on a GPU machine: the wheelhouse's site first), so a package that is missing, broken or built
for another torch shows before anything long starts (and the later parts that run in this process find it
imported). Each imported distribution's own requirements (its Requires-Dist metadata, e.g.
datasets' pyarrow and fsspec ranges) are checked against what is installed, and the wheelhouse's pins
(requirements-gpu-check.txt) against what is imported. On a GPU: CUDA torch sees the GPU and runs a bf16
product on it, and Triton imports. flash-attn is optional (training falls back to sdpa) but a broken one is
named. Each problem is one line naming the package; the result records the machine and every version.
"""
from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
import time
from importlib import metadata

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion

from debater.wheelhouse import REQUIREMENTS, pinned_wheels

# import name -> distribution name, for every third-party package a later part imports (some only inside a
# function, so importing the project's modules alone would not load them)
PACKAGES = {"torch": "torch", "numpy": "numpy", "transformers": "transformers", "tokenizers": "tokenizers",
            "safetensors": "safetensors", "peft": "peft", "accelerate": "accelerate", "deepspeed": "deepspeed",
            "pyarrow": "pyarrow", "fsspec": "fsspec", "datasets": "datasets", "mteb": "mteb",
            "sentence_transformers": "sentence-transformers", "pytrec_eval": "pytrec-eval-terrier",
            "tensorboard": "tensorboard", "matplotlib": "matplotlib", "psutil": "psutil", "gguf": "gguf"}
# the project's modules each later part runs (they import the rest at their top)
PROJECT = ("debater.train", "debater.export", "debater.evaluate", "debater.mteb_model", "debater.gguf_convert",
           "benchmarks.attention_check", "benchmarks.step_throughput", "benchmarks.gpu_training")


def import_all(names) -> tuple[dict[str, float], list[str]]:
    """Import each module; returns the seconds each took and one line per failure (whatever it raised)."""
    seconds, problems = {}, []
    for name in names:
        print(f"preflight: importing {name}", flush=True)  # a crash inside an extension leaves this in the log
        started = time.perf_counter()
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001  a broken build raises ImportError, OSError, RuntimeError...
            first_line = (str(error).splitlines() or [""])[0][:300]
            problems.append(f"{name}: import failed ({type(error).__name__}: {first_line})")
        seconds[name] = round(time.perf_counter() - started, 2)
    return seconds, problems


def installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def requirement_problems(distributions) -> list[str]:
    """Each distribution's Requires-Dist (extras and other platforms left out) against the installed versions."""
    problems = []
    for distribution in distributions:
        if installed(distribution) is None:
            continue  # its import has failed already, with a line of its own
        for line in metadata.requires(distribution) or []:
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            version = installed(requirement.name)
            if version is None:
                problems.append(f"{requirement.name}: not installed ({distribution} needs {requirement})")
                continue
            try:
                fits = requirement.specifier.contains(version, prereleases=True)
            except InvalidVersion:
                fits = True  # a local build's version string: nothing to compare
            if not fits:
                problems.append(f"{requirement.name}: {version} installed, {distribution} needs {requirement}")
    return problems


def pin_problems() -> list[str]:
    """What the wheelhouse carries must be what is imported (its site first on the path)."""
    problems = []
    for pin in pinned_wheels(REQUIREMENTS):
        name, version = pin.split("==")
        found = installed(name)
        if found != version:
            problems.append(f"{name}: {found or 'not installed'} found where the wheelhouse pins {version} "
                            "(is the unpacked site first on PYTHONPATH?)")
    return problems


def gpu_facts() -> tuple[dict, list[str]]:
    """CUDA torch, the GPU, a bf16 product on it, Triton."""
    import torch

    facts: dict = {"cuda": torch.version.cuda, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if not torch.cuda.is_available():
        return facts, []
    problems = []
    props = torch.cuda.get_device_properties(0)
    facts.update(gpu=props.name, gpus=torch.cuda.device_count(), gpu_memory_gb=round(props.total_memory / 2**30, 1),
                 capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
        facts["driver"] = query.stdout.strip() or None
    try:
        a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        facts["bf16_matmul_finite"] = bool(torch.isfinite(a @ a).all())
    except Exception as error:  # noqa: BLE001
        problems.append(f"torch: a bf16 product on the GPU failed ({type(error).__name__}: {error})")
    if not facts["bf16"]:
        problems.append(f"torch: {props.name} has no bf16, which the GPU settings train in")
    seconds, failed = import_all(["triton"])
    facts["triton"] = installed("triton") if not failed else None
    problems += [f"{line} (torch.compile's and the fused kernels' CUDA code needs it)" for line in failed]
    return facts, problems


def preflight() -> dict:
    from debater.model import flash_attention_unusable

    started = time.perf_counter()
    seconds, problems = import_all([*PACKAGES, *PROJECT])
    problems += requirement_problems(PACKAGES.values()) + pin_problems()
    facts, gpu_problems = gpu_facts()
    problems += gpu_problems
    reason = flash_attention_unusable()
    result = {"python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count(), **facts,
              "versions": {d: installed(d) for d in [*PACKAGES.values(), "flash-attn"]},
              "flash_attention_2": reason or "usable", "import_s": seconds,
              "warnings": [f"flash-attn: {reason}"] if reason and "does not import" in reason else [],
              "problems": problems, "ok": not problems}
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["summary"] = (f"{len(seconds)} imports in {result['seconds']} s: "
                         + ("ok" if not problems else f"{len(problems)} problems: " + "; ".join(problems)))
    return result

