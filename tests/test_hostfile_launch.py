"""launch/multi_node.sh as on a cluster (issue 17): DeepSpeed's hostfile launcher reaches two hosts, 127.0.0.1 and
127.0.0.2 with one rank each, through pdsh over ssh, served by a throwaway sshd on the loopback interface. The
run trains and ends with the weights of the same global batch on one node. Then every rank on the second host
is killed mid-run: the launch exits non-zero within a bounded time, the last published checkpoint stays
'latest', and resuming from it on both hosts completes. Needs root, sshd and pdsh (`make cluster-tools`, which
.ci/run calls); skipped, with that reason, elsewhere."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (FIXTURES, ROOT, assert_close_to_scale, free_port, launch_training, run_launcher,
                      tensorboard_scalars, training_env)
from safetensors.torch import load_file

SSHD = Path("/usr/sbin/sshd")
HOSTS = ("127.0.0.1", "127.0.0.2")
FAILURE_EXIT_LIMIT_S = 120  # measured: a few seconds (gloo sees the dead peer's socket close)

pytestmark = [pytest.mark.launcher, pytest.mark.skipif(
    not (shutil.which("pdsh") and SSHD.exists() and os.geteuid() == 0),
    reason="needs root, openssh-server and pdsh: run `make cluster-tools` (as root) first")]


@pytest.fixture(scope="module")
def ssh_env(tmp_path_factory):
    """A private sshd on HOSTS with a throwaway host key and client key; the pdsh settings that use it."""
    work = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / key)], check=True)
    shutil.copy(work / "client_key.pub", work / "authorized_keys")
    port = free_port()
    (work / "sshd_config").write_text("\n".join([
        f"Port {port}", *(f"ListenAddress {h}" for h in HOSTS), f"HostKey {work / 'host_key'}",
        f"AuthorizedKeysFile {work / 'authorized_keys'}", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no",
        f"PidFile {work / 'sshd.pid'}"]) + "\n")
    (work / "ssh_config").write_text("\n".join([
        f"Host {' '.join(HOSTS)}", f"  Port {port}", f"  IdentityFile {work / 'client_key'}",
        "  StrictHostKeyChecking no", "  UserKnownHostsFile /dev/null", "  LogLevel ERROR", "  BatchMode yes"]) + "\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    # what a user's ~/.ssh/config does, without touching this machine's: an ssh first on PATH that adds -F
    # (DeepSpeed's reachability check and pdsh both call plain `ssh`)
    shim = work / "bin"
    shim.mkdir()
    (shim / "ssh").write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {work / "ssh_config"} "$@"\n')
    (shim / "ssh").chmod(0o755)
    server = subprocess.Popen([str(SSHD), "-D", "-f", str(work / "sshd_config"), "-E", str(work / "sshd.log")])
    try:
        _wait_for_port(HOSTS[1], port)
        yield {"PATH": f"{shim}:{training_env()['PATH']}"}
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for_port(host: str, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"sshd did not listen on {host}:{port}")


def _setup(tmp_path, copies: int, **extra) -> tuple[Path, Path, dict]:
    """Echo data (the fixture repeated ``copies`` times), a hostfile of HOSTS with one slot each, a config."""
    data = tmp_path / "echo"
    data.mkdir()
    rows = (FIXTURES / "echo" / "tiny_retrieval.jsonl").read_text()
    (data / "tiny_retrieval.jsonl").write_text(rows * copies)
    shutil.copy(FIXTURES / "echo" / "datasets.json", data / "datasets.json")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{host} slots=1\n" for host in HOSTS))
    return hostfile, data, {"dataset_file_path": str(data), "learning_rate": 5e-3, "warmup_steps": 1,
                            "per_device_train_batch_size": 2, "max_seq_length": 32, "logging_steps": 1, "lora_r": 4,
                            "lora_dropout": 0.1, "cod_steps": 4, "torch_dtype": "float32", "seed": 5, **extra}


def _multi_node_command(hostfile: Path, config: dict, config_path: Path) -> list[str]:
    config_path.write_text(json.dumps(config))
    return ["bash", "launch/multi_node.sh", str(hostfile), str(config_path), "ds_configs/zero2_cpu.json"]


def _env(ssh_env: dict) -> dict:
    return {**training_env(), **ssh_env, "MASTER_PORT": str(free_port())}


def test_hostfile_launch_over_ssh_trains_like_one_node(tiny_model, tmp_path, ssh_env):
    hostfile, _, base = _setup(tmp_path, copies=1, model_name_or_path=str(tiny_model), stop_after_n_steps=3,
                               save_steps=3)
    across = {**base, "output_dir": str(tmp_path / "across")}
    done = run_launcher(_multi_node_command(hostfile, across, tmp_path / "across.json"), _env(ssh_env), 480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert all(f"{host}: " in done.stdout for host in HOSTS)  # pdsh prefixes each host's output
    one_node = launch_training({**base, "output_dir": str(tmp_path / "one")}, tmp_path / "one.json", free_port())
    assert one_node.returncode == 0, one_node.stdout[-3000:] + one_node.stderr[-3000:]
    weights = [load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors")) for run in ("across", "one")]
    assert_close_to_scale(weights[0], weights[1], 1e-6, "two hosts vs one node")
    assert sorted(tensorboard_scalars(tmp_path / "across" / "tensorboard", "loss/total")) == [1, 2, 3]


def _rank_pids(rank: int, config_path: Path) -> list[int]:
    """Training processes of one global rank of the run of ``config_path`` (by the RANK their launcher gave
    them), so that no other run on this machine is touched."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if str(config_path).encode() in cmdline and f"RANK={rank}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def test_a_dead_host_fails_the_launch_and_the_run_resumes_on_both_hosts(tiny_model, tmp_path, ssh_env):
    steps = 16
    hostfile, _, base = _setup(tmp_path, copies=4, model_name_or_path=str(tiny_model), stop_after_n_steps=steps,
                               save_steps=2, save_total_limit=2, output_dir=str(tmp_path / "run"))
    checkpoints = tmp_path / "run" / "checkpoints"
    command = _multi_node_command(hostfile, base, tmp_path / "run.json")
    launch = subprocess.Popen(command, cwd=ROOT, env=_env(ssh_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (checkpoints / "latest").exists() and time.monotonic() < deadline and launch.poll() is None:
            time.sleep(0.05)
        victims = _rank_pids(1, tmp_path / "run.json")  # every rank of the second host (one slot)
        assert (checkpoints / "latest").exists() and victims and launch.poll() is None
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = launch.communicate(timeout=FAILURE_EXIT_LIMIT_S)
        exited_after = time.monotonic() - killed_at
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
    assert launch.returncode != 0, output[-3000:]
    assert exited_after < FAILURE_EXIT_LIMIT_S
    latest = (checkpoints / "latest").read_text().strip()
    assert int(latest.split("-")[1]) < steps and any((checkpoints / latest).glob("mp_rank_*_model_states.pt"))
    resumed = run_launcher(_multi_node_command(hostfile, {**base, "resume_from_checkpoint": "latest"},
                                               tmp_path / "resume.json"), _env(ssh_env), 480)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (checkpoints / "latest").read_text().strip() == f"step-{steps}"
    print(f"launch exited {exited_after:.1f} s after the second host's rank was killed (from {latest})")
