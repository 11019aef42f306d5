"""Shared fixtures: a tiny randomly initialised Llama and a word-level tokenizer, built in code (no network)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(ROOT))
from benchmarks.tiny_model import build_tiny_model, echo_texts  # noqa: E402  (ROOT must be on the path first)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def fixture_texts() -> list[str]:
    return echo_texts(FIXTURES / "echo" / "tiny_retrieval.jsonl")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), fixture_texts())


@pytest.fixture(scope="session")
def tiny_reserved_model(tmp_path_factory) -> Path:
    """The tiny Llama whose tokenizer has ``<reserved_0..19>``: step tokens are existing rows, as on MiniCPM."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-reserved"), fixture_texts(), reserved=20)


def training_env() -> dict:
    """Environment for launched ranks: CPU accelerator, one thread each, this venv first on PATH."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT))
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def free_port() -> int:
    """A TCP port free right now, for one launch's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_launcher(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group; past ``timeout`` the whole group (ranks included) is killed
    and ``subprocess.TimeoutExpired`` raised, so a hung run fails the test instead of leaking processes."""
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def launch_training(config: dict, config_path: Path, port: int, nproc: int = 2, script: Path | None = None,
                    env: dict | None = None, timeout: float = 600, ds_config: str = "zero2_cpu.json",
                    launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """Write ``config`` and train it on ``nproc`` CPU ranks (``script`` in place of ``-m debater``, ``env`` added to
    the ranks' environment) with ``launcher``: torchrun (what launch/torchrun.sh and launch/slurm.sbatch run; its
    ranks start ~6 s sooner, measured here, since the deepspeed launcher passes through two python processes
    first) for the invariants of training, or the deepspeed launcher, whose own exit codes and messages some tests
    check (torchrun reports any failed rank with its own traceback and exit code 1)."""
    config_path.write_text(json.dumps(config))
    deepspeed_config = ["--deepspeed", str(ROOT / "ds_configs" / ds_config)]
    if launcher == "torchrun":
        entry = ["-m", "debater"] if script is None else [str(script)]
        command = ["torchrun", "--nproc_per_node", str(nproc), "--master_port", str(port), *entry]
    else:
        entry = ["--module", "debater"] if script is None else [str(script)]
        command = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(port), *entry]
    return run_launcher([*command, "train", str(config_path), *deepspeed_config], {**training_env(), **(env or {})},
                        timeout)


def as_published_at(run: Path, copy: Path, step: int) -> Path:
    """``copy``: the training output ``run`` as it stood once its checkpoint step-``step`` was published (what a
    preemption then leaves), for a resumed run to continue: later checkpoints, the adapter and the TensorBoard
    events removed, so that it writes its own, and 'latest' pointing at step-``step``."""
    assert (run / "checkpoints" / f"step-{step}").is_dir(), f"{run} has no checkpoint step-{step}"
    shutil.copytree(run, copy)
    for later in [*(copy / "checkpoints").glob("step-*"), copy / "adapter", copy / "tensorboard"]:
        if later.name in ("adapter", "tensorboard") or int(later.name.removeprefix("step-")) > step:
            shutil.rmtree(later)
    (copy / "checkpoints" / "latest").write_text(f"step-{step}")
    return copy


def tensorboard_scalars(folder: Path, tag: str) -> dict[int, float]:
    """step -> value of a scalar across every event file under ``folder`` (later files win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events_file in sorted(folder.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(events_file), size_guidance={"scalars": 0}).Reload()
        values.update({e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {})
    return values


@dataclass
class InterruptedRun:
    """A 4-step run (a checkpoint every step, keep 2) whose rank 1 was killed while writing checkpoint
    step-3 (under the deepspeed launcher, whose handling of a dead rank is checked), then resumed from 'latest'
    to the end (by torchrun): shared by the fault and export tests."""

    output_dir: Path
    crashed: subprocess.CompletedProcess
    latest_after_crash: str | None
    tags_after_crash: list[str]
    resumed: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def interrupted_run(tiny_model, tmp_path_factory) -> InterruptedRun:
    work = tmp_path_factory.mktemp("interrupted")
    shutil.copytree(FIXTURES / "echo", work / "echo")
    run = work / "run"
    config = {"model_name_or_path": str(tiny_model), "dataset_file_path": str(work / "echo"), "output_dir": str(run),
              "learning_rate": 5e-3, "warmup_steps": 1, "per_device_train_batch_size": 2, "max_seq_length": 32,
              "stop_after_n_steps": 4, "logging_steps": 1, "save_steps": 1, "save_total_limit": 2, "lora_r": 4,
              "cod_steps": 4, "torch_dtype": "float32", "seed": 3}
    # a hang would last gloo's 30-minute timeout; a healthy launch ends within a minute or two
    crashed = launch_training(config, work / "config.json", free_port(), script=ROOT / "tests" / "rank_crash.py",
                              env={"CRASH_RANK": "1", "CRASH_TAG": "step-3"}, timeout=480, launcher="deepspeed")
    pointer = run / "checkpoints" / "latest"
    latest = pointer.read_text() if pointer.exists() else None
    tags = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    resumed = launch_training({**config, "resume_from_checkpoint": "latest"}, work / "config.json", free_port())
    return InterruptedRun(run, crashed, latest, tags, resumed)


def reserved_tokenizer(reserved_count: int, words: tuple[str, ...] = ("hello", "world"), extra: tuple[str, ...] = ()):
    """A word-level tokenizer that, like MiniCPM's, owns <reserved_0>.. (and ``extra``) as single special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reserved = [f"<reserved_{i}>" for i in range(reserved_count)] + list(extra)
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *reserved, *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    core.add_special_tokens(reserved)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   unk_token="<unk>"), vocab


def assert_close_to_scale(got: dict, expected: dict, relative: float, context: str) -> None:
    """Each tensor of ``got`` within ``relative`` of the largest entry of its counterpart in ``expected``: sums
    taken in another order (other ranks, other chunks) differ by fp32 rounding of the large entries, which
    an elementwise relative tolerance would wrongly reject near zero."""
    assert got.keys() == expected.keys(), context
    for name, want in expected.items():
        gap = float((got[name] - want).abs().max())
        assert gap <= relative * float(want.abs().max()), f"{context}: {name} differs by {gap:.3g}"
