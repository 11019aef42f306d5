"""Build the embedded default data set from Debian package descriptions.

Query = a package's short description, positive = its long description, hard
negative = the most similar long description (TF-IDF cosine) of another
source package. The held-out test set is BEIR-format and split by source
package, so no source package is on both sides. The indexes are fetched with
apt into a private lists folder (the machine's configured sources), so the
system's own apt state is never touched.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.beir_writer import write_beir, write_jsonl
from data_pipeline.registry import DATASETS_FILE_NAME
from data_pipeline.stage_tokenize import write_atomic
from debater.core.errors import UserError

log = logging.getLogger(__name__)
TRAIN_FILE_STEM = "debian_packages"
INSTRUCTION = "Given the one-line summary of a Debian package, retrieve the package's full description:"
TEST_PERCENT = 10
MIN_LONG_WORDS = 12
MIN_SHORT_WORDS = 2
APT_HELPER = "/usr/lib/apt/apt-helper"


@dataclass
class Package:
    name: str
    source: str
    short: str
    long: str


def fetch_indexes(apt_dir: Path) -> tuple[list[Path], list[Path]]:
    """apt-get update into a private folder; return (Translation-en files, Packages files)."""
    apt_dir = apt_dir.resolve()
    lists = apt_dir / "lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (apt_dir / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None:
        raise UserError("apt-get not found: the Debian data set needs a Debian-based machine")
    command = ["apt-get", "update", "-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={apt_dir / 'cache'}",
               "-o", "Acquire::Languages=en", "-o", "APT::Sandbox::User=root", "-o", "Debug::NoLocking=1"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"apt-get update failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    translations = sorted(p for p in lists.iterdir() if "_i18n_Translation-en" in p.name)
    packages = sorted(p for p in lists.iterdir() if re.search(r"_Packages(\.\w+)?$", p.name))
    if not translations:
        raise UserError(f"apt fetched no Translation-en index into {lists}")
    return translations, packages


def read_index(path: Path) -> str:
    """Decompress an apt index whatever its compression, with apt's own helper."""
    done = subprocess.run([APT_HELPER, "cat-file", str(path)], capture_output=True, check=True)
    return done.stdout.decode("utf-8", errors="replace")


def parse_stanzas(text: str):
    """Yield deb822 stanzas as dicts; continuation lines are kept with their leading space."""
    for block in text.split("\n\n"):
        fields, key = {}, None
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


def long_description(continuation: str) -> str:
    """Debian's long description: ' .' lines are paragraph breaks; lines are re-flowed."""
    paragraphs, current = [], []
    for line in continuation.splitlines()[1:]:
        stripped = line.strip()
        if stripped == ".":
            paragraphs.append(" ".join(current))
            current = []
        elif stripped:
            current.append(stripped)
    paragraphs.append(" ".join(current))
    return "\n".join(p for p in paragraphs if p)


def load_packages(translations: list[Path], packages: list[Path]) -> list[Package]:
    source_of: dict[str, str] = {}
    for path in packages:
        for stanza in parse_stanzas(read_index(path)):
            name = stanza.get("Package")
            if name and name not in source_of:
                source_of[name] = stanza.get("Source", name).split(" ")[0] or name
    seen, result = set(), []
    for path in translations:
        for stanza in parse_stanzas(read_index(path)):
            name, desc = stanza.get("Package"), stanza.get("Description-en")
            if not name or not desc or name in seen:
                continue
            seen.add(name)
            short, _, rest = desc.partition("\n")
            result.append(Package(name, source_of.get(name, name), short.strip(), long_description("\n" + rest)))
    return result


def select_pairs(packages: list[Package]) -> tuple[list[Package], dict[str, int]]:
    """Keep unambiguous pairs: long enough, unique query text, unique document text."""
    dropped = {"short_long_too_short": 0, "duplicate_query": 0, "duplicate_document": 0}
    norm = lambda s: re.sub(r"\s+", " ", s.lower()).strip()  # noqa: E731
    query_count: dict[str, int] = {}
    for p in packages:
        query_count[norm(p.short)] = query_count.get(norm(p.short), 0) + 1
    kept, docs = [], set()
    for p in packages:
        if len(p.long.split()) < MIN_LONG_WORDS or len(p.short.split()) < MIN_SHORT_WORDS:
            dropped["short_long_too_short"] += 1
        elif query_count[norm(p.short)] > 1:
            dropped["duplicate_query"] += 1
        elif norm(p.long) in docs:
            dropped["duplicate_document"] += 1
        else:
            docs.add(norm(p.long))
            kept.append(p)
    return kept, dropped


def is_test_source(source: str) -> bool:
    return int(hashlib.sha1(source.encode()).hexdigest(), 16) % 100 < TEST_PERCENT


def hard_negatives(pairs: list[Package], chunk: int = 1024) -> list[int]:
    """For each pair, the index of the most TF-IDF-similar long description of another source package."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    matrix = TfidfVectorizer(sublinear_tf=True, min_df=2, max_df=0.05, stop_words="english").fit_transform(
        [p.long for p in pairs]).astype(np.float32).tocsr()
    sources = np.array([p.source for p in pairs])
    transposed = matrix.T.tocsc()
    best = np.empty(len(pairs), dtype=np.int64)
    for start in tqdm(range(0, len(pairs), chunk), desc="mining hard negatives", unit=" chunks"):
        scores = (matrix[start:start + chunk] @ transposed).toarray()
        stop = start + scores.shape[0]
        scores[sources[start:stop, None] == sources[None, :]] = -1.0  # never the same source package
        best[start:stop] = scores.argmax(axis=1)
    return best.tolist()


def build_debian_data(out_dir: Path) -> dict:
    """Build train (echo-data format) and test (BEIR format) under ``out_dir``; idempotent."""
    summary_path = out_dir / "summary.json"
    if summary_path.exists():
        log.info("Debian data already built at %s", out_dir)
        return json.loads(summary_path.read_text())
    log.info("fetching Debian package indexes with apt")
    translations, package_lists = fetch_indexes(out_dir / "apt")
    packages = load_packages(translations, package_lists)
    pairs, dropped = select_pairs(packages)
    train = [p for p in pairs if not is_test_source(p.source)]
    test = [p for p in pairs if is_test_source(p.source)]
    negatives = hard_negatives(train)
    echo = out_dir / "echo-data"
    write_jsonl(echo / f"{TRAIN_FILE_STEM}.jsonl",
                ({"query": p.short, "positive": p.long, "negative": train[n].long} for p, n in zip(train, negatives)))
    write_atomic(echo / DATASETS_FILE_NAME, lambda tmp: tmp.write_text(json.dumps({TRAIN_FILE_STEM: INSTRUCTION})))
    write_beir(out_dir / "test", [(p.name, p.short, p.long) for p in test], INSTRUCTION)
    summary = {"packages_read": len(packages), "pairs": len(pairs), "dropped": dropped, "train_pairs": len(train),
               "test_pairs": len(test), "train_sources": len({p.source for p in train}),
               "test_sources": len({p.source for p in test}), "indexes": [p.name for p in translations]}
    write_atomic(summary_path, lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    return summary
