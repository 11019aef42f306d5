"""Mining rounds: given, BM25 and model-mined hard negatives, each trained from the base model alike.

Every run trains the ablation's ``full`` arm (paper format, ``benchmarks.ablation.arm_config``) for ``--steps``
on the same ``--rows`` Debian rows (a seeded draw); only the negatives differ:

- ``given``: the rows' own negatives (round 1; its runs are also the model that mines for round 2);
- ``bm25``: ``--negatives`` BM25 negatives per row (``data_pipeline.mine.mine_bm25``) in place of the given ones;
  the candidates are the rows' positives, the row's own positive excluded (the given negatives may be chosen:
  BM25 sees each row with its positive as its only given negative, which it excludes anyway). A row BM25 finds
  fewer than ``--negatives`` for keeps given negatives to make up the number, as ``debater mine --shortfall
  keep`` does, so every arm trains on the same rows; both cases are counted (``short``, ``kept_given``);
- ``dense-naive``: mined by the seed's round-1 model (its checkpoint at ``--steps``, exported) with
  ``python -m debater mine --relative-margin off`` (top-k, no filter);
- ``dense-aware``: the same model, ``debater mine``'s defaults (positive-aware, relative margin 0.95);
- ``minilm-aware`` (``--teacher``): mined once by all-MiniLM-L6-v2 with the defaults.

Mining truncates texts to 64 tokens, as evaluation does, and shares one embedding cache (``OUT/cache``), so
the second mine of a model encodes nothing. Each run is evaluated at ``--steps`` on the Debian test subset and
on the held-out stdlib-docs set (not Debian, not trained on), next to the untrained base model and MiniLM.

The schedule: a run plans one pass over its rows, so ``--steps`` x global batch may not exceed ``--rows``. The
demo config's cosine decay over that pass would bring the learning rate near zero by step 240 of 250, where the
ablation's 240 steps are the start of a 6,400-step pass at almost full rate; so every run here keeps a constant
rate after the warm-up (``--set lr_scheduler_type=cosine`` restores the decay, for every arm alike).

False-negative proxies, per data folder: the share of its negatives (a mined folder's mined ones, not the given
ones that made a short row up; every negative of the given folder, as the reference) that are near-duplicates
of their row's positive, and the share that score above the positive (model-mined folders only, from their
``mining/*.scores.jsonl``). Near-duplicate: the Jaccard similarity of the two texts' sets of word 5-grams is at
least 0.8 (words of ``debater.mining.normalise_text``, i.e. case, punctuation and spacing ignored; n-grams as
long as the shorter text when it has fewer than 5 words). In Debian many near-duplicates are templated
descriptions that differ only in the package's name, true negatives, so that share overstates the false
negatives; the hand check judges them. ``OUT/hand_check.md`` lists 30 queries (a fixed draw) of each model-mined
folder of the first seed, with the positive, the mined negatives and their scores.

It runs in parts, like the ablation: a finished step (a data folder, a run that reached ``--steps``, a mined
folder) is skipped, an interrupted run resumes; ``--skip-eval`` trains and mines only, ``--eval-only`` evaluates
what is under ``--out`` at the budget it was trained for. Layout: data ``OUT/data/<arm>[-seed<S>]/``, runs
``OUT/<arm>-seed<S>/``, evaluations ``OUT/eval/<set>/``, the result ``OUT/mining_rounds.json``."""
from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from benchmarks.ablation import (BASE_MODEL, TEST_SET, TRAIN_DATA, add_evaluation_options, add_training_options,
                                 arm_config, evaluate_new, exported_checkpoints, left_plateau_at,
                                 minilm_folder, reference_labels, summarise, train_runs)
from benchmarks.common import benchmark_parser, machine_description, write_result
from data_pipeline.mine import mine_bm25, mined_for_lines
from data_pipeline.reader import ReadCounts, read_rows
from data_pipeline.registry import DATASETS_FILE_NAME
from debater.core.errors import UserError
from debater.mine_command import published
from debater.mining import normalise_text
from debater.run_folder import latest_step

SOURCE = Path(TRAIN_DATA) / "debian_packages.jsonl"
EVAL_SETS = {"debian": TEST_SET, "stdlib-docs": "assets/data/stdlib-docs/test"}
GIVEN, BM25, TEACHER = "given", "bm25", "minilm-aware"
DENSE_FILTERS = {"dense-naive": ("--relative-margin", "off"), "dense-aware": ()}  # debater mine's options
SHARED_DATA = (GIVEN, BM25, TEACHER)  # one data folder for every seed
ROUND_SCHEDULE = {"lr_scheduler_type": "constant"}  # see the module's docstring: the budget is a whole pass
MINE_MAX_LENGTH = 64  # tokens, as benchmarks.ablation.evaluate truncates
SHINGLE_WORDS = 5
NEAR_DUPLICATE_JACCARD = 0.8
HAND_CHECK_QUERIES = 30
HAND_CHECK_DRAW = 0  # the seed of the hand check's draw of queries
SUBSET_DRAW = 0  # the seed of the draw of the rows every run trains on
RECORD = "record.json"
SUBSET_RECORD = "subset.json"
MINING_DIR, MANIFEST = "mining", "manifest.json"


class Step(NamedTuple):
    """One unit of work: ``data`` (a folder built here), ``mine`` (a folder ``debater mine`` writes) or
    ``train`` (a run)."""

    kind: str
    arm: str
    seed: int | None = None

    @property
    def name(self) -> str:
        return self.arm if self.seed is None else f"{self.arm}-seed{self.seed}"


@dataclass
class Negative:
    text: str
    score: float | None
    rank: int | None


@dataclass
class MinedRow:
    """A row as the proxies and the hand check see it, with the negatives they count: a mined folder's mined
    ones (not the given ones that made a short row up), or every negative of the given folder."""

    line: int
    query: str
    positive: str
    positive_score: float | None
    negatives: list[Negative]


# ---------------------------------------------------------------------------------------------- the plan
def round2_arms(teacher: bool) -> list[str]:
    return [BM25, *DENSE_FILTERS, *([TEACHER] if teacher else [])]


def all_steps(seeds: list[int], teacher: bool) -> list[Step]:
    """Every step in the order it can run: data, round 1, mining with the round-1 models, round 2."""
    return [Step("data", GIVEN), Step("data", BM25),
            *(Step("train", GIVEN, seed) for seed in seeds),
            *(Step("mine", arm, seed) for seed in seeds for arm in DENSE_FILTERS),
            *([Step("mine", TEACHER)] if teacher else []),
            *(Step("train", arm, seed) for seed in seeds for arm in round2_arms(teacher))]


def data_folder(out: Path, arm: str, seed: int | None) -> Path:
    return out / "data" / (arm if arm in SHARED_DATA else f"{arm}-seed{seed}")


def trained_to(run: Path, steps: int) -> bool:
    """The run has its adapter and a published checkpoint at ``steps`` or later."""
    return (run / "adapter").is_dir() and (latest_step(run) or 0) >= steps


def finished(out: Path, step: Step, steps: int) -> bool:
    """A run that reached ``steps``; a data folder that exists (each is published whole, by a rename)."""
    if step.kind == "train":
        return trained_to(out / step.name, steps)
    return data_folder(out, step.arm, step.seed).is_dir()


def remaining_steps(out: Path, seeds: list[int], teacher: bool, steps: int) -> list[Step]:
    return [step for step in all_steps(seeds, teacher) if not finished(out, step, steps)]


# ---------------------------------------------------------------------------------------------- the data
def copy_instructions(source: Path, folder: Path) -> None:
    if (source / DATASETS_FILE_NAME).exists():
        shutil.copy(source / DATASETS_FILE_NAME, folder / DATASETS_FILE_NAME)


def write_given(source: Path, rows: int, folder: Path) -> dict:
    """``rows`` valid rows of ``source`` drawn at random (seed ``SUBSET_DRAW``), in file order, each line as it
    is (every field kept), in ``folder`` with the instructions; returns the reading's counts (also in
    ``folder/subset.json``). Drawn, not the first ones: the Debian file runs by source package, so its first
    rows are a few families of near-identical packages (kernels, DPDK, translations), not the file."""
    counts = ReadCounts()
    valid = [row.line for row in read_rows(source, counts)]
    if len(valid) < rows:
        raise SystemExit(f"{source} has {len(valid)} valid rows; --rows {rows} asks for more")
    lines = set(random.Random(SUBSET_DRAW).sample(valid, rows))
    record = {"source": str(source), "rows": rows, "drawn_from": len(valid), "draw_seed": SUBSET_DRAW,
              "lines_read": counts.read, "skipped": dict(counts.skipped)}
    with published(folder) as work:
        with open(source, "rb") as lines_in, open(work / source.name, "wb") as out:
            for number, raw in enumerate(lines_in, start=1):
                if number in lines:
                    out.write(raw if raw.endswith(b"\n") else raw + b"\n")
        copy_instructions(source.parent, work)
        (work / SUBSET_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def json_lines(path: Path) -> list[dict]:
    """The JSON objects of a jsonl file, split at newlines only (as ``read_rows`` numbers its lines)."""
    with open(path, "rb") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def bm25_negatives(rows: list[dict], k: int, scratch: Path) -> tuple[dict[int, list[str]], dict]:
    """line -> up to ``k`` BM25 negatives among the rows' positives, and the miner's counts. The miner skips a
    row's given negatives (it adds to them); these replace them, so it sees each row's positive in their place."""
    positives_only, mined = scratch / "rows.jsonl", scratch / "mined.arrow"
    positives_only.write_text("".join(json.dumps({**row, "negative": row["positive"]}) + "\n" for row in rows),
                              encoding="utf-8")
    counts = mine_bm25(positives_only, k, mined)
    return mined_for_lines(mined, 1, len(rows)), counts.as_dict()


def write_bm25(given: Path, k: int, folder: Path) -> dict:
    """The given file's rows with ``negative`` replaced by their BM25 negatives (a short row made up with given
    ones), a scores sidecar as ``debater mine`` writes (without scores) and the counts in the manifest."""
    totals = {"rows": 0, "short": 0, "kept_given": 0}
    rows = json_lines(given)
    with published(folder) as work, tempfile.TemporaryDirectory() as scratch:
        mined, counts = bm25_negatives(rows, k, Path(scratch))
        (work / MINING_DIR).mkdir()
        with open(work / given.name, "w", encoding="utf-8") as out, \
                open(work / MINING_DIR / f"{given.stem}.scores.jsonl", "w", encoding="utf-8") as sidecar:
            for line, row in enumerate(rows, start=1):
                chosen = mined[line]
                given_negatives = row["negative"] if isinstance(row["negative"], list) else [row["negative"]]
                negatives = chosen + [text for text in given_negatives if text not in chosen][:k - len(chosen)]
                out.write(json.dumps({**row, "negative": negatives}, ensure_ascii=False) + "\n")
                sidecar.write(json.dumps({"line": line, "positive_score": None, "negatives": [
                    {"score": None, "rank": None, "how": "mined" if i < len(chosen) else "given"}
                    for i in range(len(negatives))]}) + "\n")
                totals["rows"] += 1
                totals["short"] += len(chosen) < k
                totals["kept_given"] += len(negatives) - len(chosen)
        copy_instructions(given.parent, work)
        manifest = {"method": "bm25", "k": k, **totals, "mined": counts["added"],
                    "own_positive_excluded": counts["own_positive_excluded"]}
        (work / MINING_DIR / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def mine_command(model: str, given: Path, out: Path, cache: Path, k: int, filters: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "debater", "mine", "--model", model, "--data", str(given), "--out", str(out),
            "--cache", str(cache), "-k", str(k), "--max-length", str(MINE_MAX_LENGTH), *filters]


def mine(step: Step, args: argparse.Namespace) -> tuple[list[str], float]:
    """Mine one folder with ``python -m debater mine`` as users run it; returns (command, seconds)."""
    if step.arm == TEACHER:
        model, filters = minilm_folder(), ()
    else:
        model = exported_checkpoints(args.out / f"{GIVEN}-seed{step.seed}", [args.steps])[args.steps]
        filters = DENSE_FILTERS[step.arm]
    command = mine_command(model, data_folder(args.out, GIVEN, None), data_folder(args.out, step.arm, step.seed),
                           args.out / "cache", args.negatives, filters)
    start = time.perf_counter()
    if subprocess.run(command).returncode:
        raise SystemExit(f"mining {step.name} failed: see its message above")
    return command, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- training
def run_config(arm: str, seed: int, args: argparse.Namespace) -> dict:
    """The ablation's ``full`` arm with this arm's data and a constant learning rate (``--set`` can change it):
    every run of both rounds has one budget and differs from the others only in its data and seed."""
    config = arm_config("full", seed, args, args.out / f"{arm}-seed{seed}")
    config.update({**ROUND_SCHEDULE, **dict(args.set), "dataset_file_path": str(data_folder(args.out, arm, seed))})
    return config


def shared_settings(args: argparse.Namespace) -> dict:
    """What every run and data folder under ``--out`` must share, so that parts run apart stay comparable."""
    config = run_config(GIVEN, args.seeds[0], args)
    for key in ("output_dir", "seed", "dataset_file_path"):
        del config[key]
    return {"rows": args.rows, "rows_draw_seed": SUBSET_DRAW, "negatives": args.negatives, "steps": args.steps,
            "global_batch": config["per_device_train_batch_size"] * args.nproc, "config": config}


def train(steps: list[Step], args: argparse.Namespace, record: dict) -> None:
    """Train ``steps`` (runs), ``--jobs`` at a time; their seconds (summed over parts) and commands recorded."""
    configs = [run_config(step.arm, step.seed, args) for step in steps]
    for config in configs:
        run = Path(config["output_dir"])
        record["commands"][run.name] = f"launch/single_node.sh {run.parent / f'{run.name}.json'} {args.nproc}"
    for name, seconds in train_runs(configs, args.nproc, args.jobs).items():
        record["train_seconds"][name] = record["train_seconds"].get(name, 0) + seconds


def save_record(record: dict, out: Path) -> None:
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def run_steps(todo: list[Step], args: argparse.Namespace, record: dict) -> None:
    """Do the remaining steps in order: data, round 1, mining, round 2. The record is saved once the data exists
    (a refused --rows leaves no settings behind), then after each phase and each mine."""
    if Step("data", GIVEN) in todo:
        write_given(SOURCE, args.rows, data_folder(args.out, GIVEN, None))
    if Step("data", BM25) in todo:
        write_bm25(data_folder(args.out, GIVEN, None) / SOURCE.name, args.negatives, data_folder(args.out, BM25, None))
    save_record(record, args.out)
    train([step for step in todo if step.kind == "train" and step.arm == GIVEN], args, record)
    save_record(record, args.out)
    for step in (step for step in todo if step.kind == "mine"):
        command, seconds = mine(step, args)
        record["commands"][f"mine {step.name}"] = shlex.join(command)
        record["mine_seconds"][step.name] = round(seconds)
        save_record(record, args.out)
    train([step for step in todo if step.kind == "train" and step.arm != GIVEN], args, record)
    save_record(record, args.out)


# ---------------------------------------------------------------------------------------------- the proxies
def given_rows(folder: Path) -> list[MinedRow]:
    """The given folder's rows, every negative counted (they are what round 1 trains on)."""
    return [MinedRow(row.line, row.query, row.positive, None, [Negative(text, None, None) for text in row.negatives])
            for path in sorted(folder.glob("*.jsonl")) for row in read_rows(path, ReadCounts())]


def mined_rows(folder: Path) -> list[MinedRow]:
    """A mined folder's rows with their mined negatives, scores and ranks, from each file's scores sidecar
    (one record per written row, in order)."""
    found = []
    for path in sorted(folder.glob("*.jsonl")):
        sidecar = folder / MINING_DIR / f"{path.stem}.scores.jsonl"
        records = json_lines(sidecar)
        rows = list(read_rows(path, ReadCounts()))
        if len(records) != len(rows):
            raise SystemExit(f"{sidecar} has {len(records)} records for the {len(rows)} rows of {path}: "
                             f"remove {folder} and run again to mine it again")
        found += [MinedRow(record["line"], row.query, row.positive, record["positive_score"],
                           [Negative(text, about["score"], about["rank"])
                            for text, about in zip(row.negatives, record["negatives"]) if about["how"] == "mined"])
                  for row, record in zip(rows, records)]
    return found


def word_shingles(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def near_duplicate(a: str, b: str) -> bool:
    """Word n-gram Jaccard of the normalised texts at least NEAR_DUPLICATE_JACCARD (n = 5, or the shorter text's
    length): a copy with a few words changed is one, a text that merely shares a topic is not."""
    words_a, words_b = normalise_text(a).split(), normalise_text(b).split()
    n = min(SHINGLE_WORDS, len(words_a), len(words_b))
    if n == 0:
        return words_a == words_b
    first, second = word_shingles(words_a, n), word_shingles(words_b, n)
    return len(first & second) / len(first | second) >= NEAR_DUPLICATE_JACCARD


def share(count: int, total: int) -> dict | None:
    return {"count": count, "of": total, "share": round(count / total, 4)} if total else None


def scored(row: MinedRow, negative: Negative) -> bool:
    return None not in (negative.score, row.positive_score)


def above_positive(row: MinedRow, negative: Negative) -> bool:
    return scored(row, negative) and negative.score > row.positive_score


def false_negative_proxy(rows: list[MinedRow]) -> dict:
    """How many negatives are near-duplicates of their row's positive, and how many of the scored ones score
    above it (None when nothing is scored)."""
    pairs = [(row, negative) for row in rows for negative in row.negatives]
    with_scores = [(row, negative) for row, negative in pairs if scored(row, negative)]
    return {"queries": len(rows),
            "near_duplicate": share(sum(near_duplicate(n.text, row.positive) for row, n in pairs), len(pairs)),
            "above_positive": share(sum(above_positive(row, n) for row, n in with_scores), len(with_scores))}


def hand_check_sample(rows: list[MinedRow], count: int = HAND_CHECK_QUERIES,
                      draw: int = HAND_CHECK_DRAW) -> list[MinedRow]:
    """``count`` rows (all when fewer) drawn by a fixed seed, in file order: folders mined from the same rows
    give the same queries."""
    picked = random.Random(draw).sample(range(len(rows)), min(count, len(rows)))
    return [rows[i] for i in sorted(picked)]


def one_line(text: str) -> str:
    return " ".join(text.split())


def score_text(score: float | None) -> str:
    return "-" if score is None else f"{score:.4f}"


def flags(row: MinedRow, negative: Negative) -> str:
    """What the proxies say of one negative, for the person who judges it."""
    return (("; near-duplicate" if near_duplicate(negative.text, row.positive) else "")
            + ("; above the positive" if above_positive(row, negative) else ""))


def hand_check_markdown(samples: dict[str, list[MinedRow]]) -> str:
    lines = ["# Mined negatives to judge by hand", "",
             f"Up to {HAND_CHECK_QUERIES} queries per folder (a fixed draw, seed {HAND_CHECK_DRAW}; the same lines "
             "in every folder). For each mined negative, mark whether it also answers the query (a false negative). "
             f"Flags: near-duplicate (word {SHINGLE_WORDS}-gram Jaccard >= {NEAR_DUPLICATE_JACCARD} with the "
             "positive), above the positive (scores higher than it).", ""]
    for name, rows in samples.items():
        lines += [f"## {name} ({len(rows)} queries)", ""]
        for number, row in enumerate(rows, start=1):
            lines += [f"### {name} {number}: line {row.line}", "", f"- query: {one_line(row.query)}",
                      f"- positive (score {score_text(row.positive_score)}): {one_line(row.positive)}"]
            for negative in row.negatives:
                lines.append(f"- negative (rank {negative.rank}, score {score_text(negative.score)}"
                             f"{flags(row, negative)}): {one_line(negative.text)}")
                lines.append("  - [ ] false negative")
            if not row.negatives:
                lines.append("- no mined negative (given ones made up the row)")
            lines.append("")
    return "\n".join(lines)


def describe_mining(out: Path, seed: int) -> dict:
    """The proxies of every data folder under ``out``, and ``out/hand_check.md`` for ``seed``'s model-mined
    folders (and the teacher's)."""
    folders = sorted(path for path in (out / "data").glob("*") if path.is_dir() and not path.name.startswith("."))
    rows = {folder.name: given_rows(folder) if folder.name == GIVEN else mined_rows(folder) for folder in folders}
    checked = [name for name in (*(f"{arm}-seed{seed}" for arm in DENSE_FILTERS), TEACHER) if name in rows]
    if checked:
        (out / "hand_check.md").write_text(hand_check_markdown({name: hand_check_sample(rows[name])
                                                                for name in checked}), encoding="utf-8")
    return {name: false_negative_proxy(found) for name, found in rows.items()}


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_runs(args: argparse.Namespace) -> tuple[dict, dict, list[Path]]:
    """(scores by set and label, evaluation seconds by set, the runs) of every run that reached ``--steps``, at
    that step, and of the references; each model evaluated once per set, over all parts."""
    runs = sorted(run for run in args.out.glob("*-seed*") if run.is_dir() and trained_to(run, args.steps))
    if not runs:
        raise SystemExit(f"no run under {args.out} has reached step {args.steps}: train first")
    labels = reference_labels()
    for run in runs:
        labels.update({path: f"{run.name}@{step}" for step, path in exported_checkpoints(run, [args.steps]).items()})
    scores, seconds = {}, {}
    for name, tasks in EVAL_SETS.items():
        scores[name], _, seconds[name] = evaluate_new(labels, args.out / "eval" / name, args.max_queries,
                                                      args.max_corpus, tasks)
    return scores, seconds, runs


def summary_line(arms: dict[str, dict], steps: int) -> str:
    means = [f"{arm} " + "/".join(f"{arms[name][arm]['ndcg_at_10'][steps]['mean']:.4f}" for name in EVAL_SETS)
             for arm in (GIVEN, *round2_arms(True)) if arm in arms[next(iter(EVAL_SETS))]]
    return (f"mining rounds ({steps} steps): nDCG@10, mean over seeds, on {'/'.join(EVAL_SETS)}: "
            + ", ".join(means))


# ---------------------------------------------------------------------------------------------- main
def require(paths: list) -> None:
    """A one-line error naming the first missing asset, before any work."""
    for path in paths:
        if not Path(path).exists():
            raise SystemExit(f"{path} not found: build the assets with `make assets`")


def check_arguments(args: argparse.Namespace, settings: dict, record: dict) -> None:
    """Refuse, in one line each, what would fail later or mix runs of other settings into one comparison."""
    if args.rows < 1 or args.negatives < 1:
        raise SystemExit(f"--rows and --negatives must be at least 1, got {args.rows} and {args.negatives}")
    if args.steps * settings["global_batch"] > args.rows:
        raise SystemExit(f"--steps {args.steps} x global batch {settings['global_batch']} is more than --rows "
                         f"{args.rows}: a run trains at most one pass over its rows; raise --rows or lower --steps")
    earlier = record.get("settings", settings)
    if earlier != settings:
        differ = sorted(key for key in settings if settings[key] != earlier.get(key))
        raise SystemExit(f"{args.out} holds runs made with other {', '.join(differ)} ({RECORD}): pass the same "
                         "options, or another --out")


def train_and_mine(args: argparse.Namespace, record: dict) -> None:
    settings = shared_settings(args)
    check_arguments(args, settings, record)
    require([BASE_MODEL, *([] if data_folder(args.out, GIVEN, None).is_dir() else [SOURCE]),
             *([] if args.skip_eval else EVAL_SETS.values())])
    record.update(settings=settings, train_machine=machine_description())
    todo = remaining_steps(args.out, args.seeds, args.teacher, args.steps)
    print(f"{len(todo)} steps to do: {', '.join(f'{step.kind} {step.name}' for step in todo) or 'none'}", flush=True)
    run_steps(todo, args, record)


def result(args: argparse.Namespace, record: dict, proxies: dict) -> dict:
    require(EVAL_SETS.values())
    scores, eval_seconds, runs = evaluate_runs(args)
    plateau = {run.name: left_plateau_at(run) for run in runs}
    arms = {name: summarise(set_scores, plateau) for name, set_scores in scores.items()}
    bm25 = data_folder(args.out, BM25, None) / MINING_DIR / MANIFEST
    given = data_folder(args.out, GIVEN, None) / SUBSET_RECORD
    return {"name": "mining_rounds", **record, "seeds": sorted({int(run.name.split("-seed")[1]) for run in runs}),
            "subset": json.loads(given.read_text()) if given.exists() else None,
            "bm25": json.loads(bm25.read_text()) if bm25.exists() else None,
            "eval_sets": EVAL_SETS, "eval_subset": {"queries": args.max_queries, "corpus": args.max_corpus},
            "eval_seconds": eval_seconds, "scores": scores, "arms": arms, "false_negative_proxy": proxies,
            "near_duplicate": f"word {SHINGLE_WORDS}-gram Jaccard >= {NEAR_DUPLICATE_JACCARD} with the positive",
            "hand_check": str(args.out / "hand_check.md"), "summary": summary_line(arms, args.steps)}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("mining_rounds", __doc__, model=False)
    add_training_options(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7, 1],
                        help="seeds of both rounds; the first one's mined folders go into hand_check.md")
    parser.add_argument("--rows", type=int, default=2000,
                        help="valid Debian rows every run trains on, drawn at random (seed 0)")
    parser.add_argument("--negatives", "-k", type=int, default=1,
                        help="negatives mined per row (training uses the config's negatives_per_query first ones)")
    parser.add_argument("--teacher", action="store_true", help="add the arm mined by all-MiniLM-L6-v2")
    add_evaluation_options(parser)
    args = parser.parse_args(argv)
    record_path = args.out / RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else \
        {"train_seconds": {}, "mine_seconds": {}, "commands": {}}
    try:
        if not args.eval_only:
            train_and_mine(args, record)
        elif not record_path.exists():
            raise SystemExit(f"nothing trained under {args.out} (no {RECORD}): run without --eval-only first")
        else:
            args.steps = record["settings"]["steps"]  # the budget every run there was trained for
        proxies = describe_mining(args.out, args.seeds[0])
        if args.skip_eval:
            print(f"trained and mined; hand check in {args.out / 'hand_check.md'}; evaluate with --eval-only "
                  f"--out {args.out}")
            return 0
        write_result(result(args, record, proxies), args.out / "mining_rounds", BASE_MODEL)
    except UserError as error:  # a missing package or asset found by the functions reused here
        raise SystemExit(str(error)) from None
    return 0
