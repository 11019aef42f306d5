"""The mining rounds' bookkeeping, without training or a model: the Debian subset keeps its rows whole, the BM25
folder replaces the given negatives, the false-negative proxies against a brute-force loop, the hand check's
draw, which steps a part still has to do, and bad input refused in one line before any training."""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import pytest

from benchmarks import ablation
from benchmarks import mining_rounds as rounds
from benchmarks.ablation import arm_config
from benchmarks.mining_rounds import (HAND_CHECK_QUERIES, SUBSET_DRAW, MinedRow, Negative, Step, describe_mining,
                                      false_negative_proxy, hand_check_sample, mine_command, mined_rows,
                                      remaining_steps, run_config, write_bm25, write_given)

INSTRUCTIONS = {"packages": "Given a package summary, retrieve its description:"}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def echo_folder(folder: Path, rows: list[dict]) -> Path:
    """An echo-data folder of one file, ``packages.jsonl``, with its instruction; returns the file."""
    write_lines(folder / "datasets.json", [json.dumps(INSTRUCTIONS)])
    return write_lines(folder / "packages.jsonl", [json.dumps(row) for row in rows])


# ---------------------------------------------------------------------------------------------- the subset
SOURCE_LINES = [
    json.dumps({"query": "q1", "positive": "p1", "negative": "n1", "id": 1, "extra": {"a": [1, 2]}}),
    "",
    "{not json",
    json.dumps({"query": "q2", "positive": "p2"}),  # no negative: round 1 could not train on it
    json.dumps({"query": "q3", "positive": "p3 é", "negative": ["n3a", "n3b"], "lang": "fr"}, ensure_ascii=False),
    json.dumps({"negative": "n4", "positive": "p4", "query": "q4", "id": 4}),  # other key order, kept
    json.dumps({"query": "q5", "positive": "p5", "negative": "n5"}),
]


def test_the_subset_is_a_seeded_draw_of_valid_rows_in_file_order_each_line_as_it_was(tmp_path):
    source = write_lines(tmp_path / "src" / "packages.jsonl", SOURCE_LINES)
    (tmp_path / "src" / "datasets.json").write_text(json.dumps(INSTRUCTIONS))
    valid = [0, 4, 5, 6]  # indices of the lines with a query, a positive and a negative
    drawn = sorted(random.Random(SUBSET_DRAW).sample([i + 1 for i in valid], 3))
    record = write_given(source, 3, tmp_path / "given")
    written = (tmp_path / "given" / "packages.jsonl").read_text(encoding="utf-8").splitlines()
    assert written == [SOURCE_LINES[line - 1] for line in drawn]
    assert write_given(source, 3, tmp_path / "again") == record  # the same rows on every call
    assert (tmp_path / "again" / "packages.jsonl").read_text(encoding="utf-8").splitlines() == written
    assert json.loads((tmp_path / "given" / "datasets.json").read_text()) == INSTRUCTIONS
    assert (record["rows"], record["drawn_from"], record["lines_read"], record["skipped"]) == \
        (3, 4, 6, {"malformed_json": 1, "negative_missing": 1})
    write_given(source, 4, tmp_path / "all")
    assert (tmp_path / "all" / "packages.jsonl").read_text(encoding="utf-8").splitlines() == \
        [SOURCE_LINES[i] for i in valid]


def test_more_rows_than_the_file_holds_is_one_line_and_writes_nothing(tmp_path):
    source = write_lines(tmp_path / "src" / "packages.jsonl", SOURCE_LINES)
    with pytest.raises(SystemExit, match="has 4 valid rows; --rows 5 asks for more"):
        write_given(source, 5, tmp_path / "given")
    assert not (tmp_path / "given").exists()


# ---------------------------------------------------------------------------------------------- BM25
BM25_ROWS = [
    {"query": "python web framework", "positive": "django python web framework", "negative": "vim editor",
     "id": "a"},
    {"query": "python web server", "positive": "gunicorn python web server", "negative": "emacs editor",
     "id": "b"},
    {"query": "terminal text editor python", "positive": "vim terminal text editor", "negative": "django python web",
     "id": "c"},
    {"query": "zzz qqq", "positive": "nothing shares a word", "negative": "the given one", "id": "d"},
    # BM25's best for this query (after its own positive) is its given negative, the next row's positive
    {"query": "rust compiler toolchain", "positive": "rustc rust compiler",
     "negative": "cargo rust compiler toolchain", "id": "e"},
    {"query": "cargo rust package manager", "positive": "cargo rust compiler toolchain", "negative": "pip python",
     "id": "f"},
    {"query": "rust book", "positive": "rust language book", "negative": "python book", "id": "g"},
]


def test_bm25_replaces_the_given_negatives_and_never_gives_a_row_its_positive(tmp_path):
    given = echo_folder(tmp_path / "given", BM25_ROWS)
    manifest = write_bm25(given, 1, tmp_path / "bm25")
    written = [json.loads(line) for line in (tmp_path / "bm25" / "packages.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in row.items() if k != "negative"} for row in written] == \
        [{k: v for k, v in row.items() if k != "negative"} for row in BM25_ROWS]
    assert all(len(row["negative"]) == 1 for row in written)  # replaced, not appended to the given one
    assert all(row["positive"] not in row["negative"] for row in written)
    assert written[0]["negative"] == [BM25_ROWS[1]["positive"]]
    assert written[1]["negative"] == [BM25_ROWS[0]["positive"]]
    assert written[4]["negative"] == [BM25_ROWS[5]["positive"]]  # a given negative may be BM25's choice
    assert written[3]["negative"] == ["the given one"]  # nothing in common with any positive: kept
    assert (manifest["rows"], manifest["short"], manifest["kept_given"], manifest["mined"]) == (7, 1, 1, 6)
    assert json.loads((tmp_path / "bm25" / "mining" / "manifest.json").read_text()) == manifest
    assert (tmp_path / "bm25" / "datasets.json").exists()
    sidecar = [json.loads(line) for line in (tmp_path / "bm25" / "mining" / "packages.scores.jsonl").open()]
    assert [record["line"] for record in sidecar] == list(range(1, 8))
    assert [n["how"] for record in sidecar for n in record["negatives"]] == ["mined"] * 3 + ["given"] + ["mined"] * 3


def test_bm25_makes_a_short_row_up_to_k_with_given_negatives(tmp_path):
    rows = [{**row, "negative": [row["negative"], f"second given {i}"]} for i, row in enumerate(BM25_ROWS)]
    write_bm25(echo_folder(tmp_path / "given", rows), 2, tmp_path / "bm25")
    written = [json.loads(line) for line in (tmp_path / "bm25" / "packages.jsonl").read_text().splitlines()]
    assert all(len(row["negative"]) == 2 for row in written)
    assert written[3]["negative"] == ["the given one", "second given 3"]


# ---------------------------------------------------------------------------------------------- the proxies
def shingles(text: str, n: int) -> set:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return set(zip(*(words[i:] for i in range(n))))


def reference_proxy(folder: Path) -> tuple[int, int, int, int]:
    """(near-duplicates, mined negatives, scored above the positive, scored), one negative at a time."""
    rows = [json.loads(line) for line in (folder / "packages.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (folder / "mining" / "packages.scores.jsonl").read_text().splitlines()]
    near = mined = above = scored = 0
    for row, record in zip(rows, records):
        for text, negative in zip(row["negative"], record["negatives"]):
            if negative["how"] != "mined":
                continue
            mined += 1
            n = min(5, len(re.findall(r"[a-z0-9]+", text.lower())),
                    len(re.findall(r"[a-z0-9]+", row["positive"].lower())))
            a, b = shingles(text, n), shingles(row["positive"], n)
            near += len(a & b) / len(a | b) >= 0.8
            if negative["score"] is not None:
                scored += 1
                above += negative["score"] > record["positive_score"]
    return near, mined, above, scored


def mined_folder(folder: Path, rows: list[tuple[str, str, float, list[tuple[str, float | None, str]]]]) -> Path:
    """A folder as ``debater mine`` writes it: rows (query, positive, positive score, [(negative, score, how)])."""
    echo_folder(folder, [{"query": q, "positive": p, "negative": [text for text, _, _ in negatives]}
                         for q, p, _, negatives in rows])
    write_lines(folder / "mining" / "packages.scores.jsonl", [
        json.dumps({"line": line, "positive_score": score, "negatives": [
            {"score": s, "rank": rank if how == "mined" else None, "how": how}
            for rank, (_, s, how) in enumerate(negatives, start=1)]})
        for line, (_, _, score, negatives) in enumerate(rows, start=1)])
    write_lines(folder / "mining" / "manifest.json", ["{}"])
    return folder


LONG = " ".join(f"word{i}" for i in range(30))
NINE = " ".join(f"word{i}" for i in range(9))
HAND_MADE = [
    ("q1", LONG, 0.8, [(LONG.replace("word29", "other"), 0.85, "mined"),  # 25 of 27 5-grams shared: near
                       (LONG.replace("word15", "other"), 0.5, "mined"),  # 21 of 31: not near
                       ("an unrelated text about something else entirely", 0.8, "mined")]),  # equal: not above
    ("q2", "Short Text!", 0.6, [("short, text", 0.7, "mined"),  # two words, the same once normalised
                                ("short text", None, "given")]),  # made up with a given one: not counted
    ("q3", "a positive of six words here", -0.2, [("a positive of six words there", -0.1, "mined")]),
    ("q4", NINE, 0.5, [(NINE.rsplit(" ", 1)[0], None, "mined")]),  # 4 of 5 5-grams: exactly 0.8, near; no score
]


def test_proxies_of_a_hand_made_folder_match_the_brute_force_loop(tmp_path):
    folder = mined_folder(tmp_path / "mined", HAND_MADE)
    proxy = false_negative_proxy(mined_rows(folder))
    near, mined, above, scored = reference_proxy(folder)
    assert (near, mined, above, scored) == (3, 6, 3, 5)  # the reference itself, on the cases above
    assert proxy["queries"] == 4
    assert (proxy["near_duplicate"]["count"], proxy["near_duplicate"]["of"]) == (near, mined)
    assert (proxy["above_positive"]["count"], proxy["above_positive"]["of"]) == (above, scored)
    assert proxy["above_positive"]["share"] == round(above / scored, 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proxies_of_random_folders_match_the_brute_force_loop(tmp_path, seed):
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(8)]
    rows = []
    for q in range(25):
        positive = [rng.choice(vocabulary) for _ in range(rng.randint(1, 12))]
        negatives = []
        for _ in range(rng.randint(1, 3)):
            text = [word if rng.random() > 0.15 else rng.choice(vocabulary) for word in positive]
            text = text[:rng.randint(1, len(text))] if rng.random() < 0.3 else text
            how = "given" if rng.random() < 0.2 else "mined"
            negatives.append((" ".join(text), None if how == "given" or rng.random() < 0.2 else rng.random(), how))
        rows.append((f"q{q}", " ".join(positive), rng.random(), negatives))
    folder = mined_folder(tmp_path / "mined", rows)
    proxy = false_negative_proxy(mined_rows(folder))
    near, mined, above, scored = reference_proxy(folder)
    assert 0 < near < mined and 0 < above < scored  # the draw has both kinds of each
    assert (proxy["near_duplicate"]["count"], proxy["near_duplicate"]["of"]) == (near, mined)
    assert (proxy["above_positive"]["count"], proxy["above_positive"]["of"]) == (above, scored)


def test_bm25_proxy_counts_near_duplicates_and_has_no_scores(tmp_path):
    rows = [{"query": "alpha beta", "positive": "alpha beta gamma", "negative": "x"},
            {"query": "beta gamma", "positive": "Alpha, beta gamma.", "negative": "y"}]  # each the other's near-copy
    write_bm25(echo_folder(tmp_path / "given", rows), 1, tmp_path / "bm25")
    proxy = false_negative_proxy(mined_rows(tmp_path / "bm25"))
    assert proxy["near_duplicate"] == {"count": 2, "of": 2, "share": 1.0} and proxy["above_positive"] is None


# ---------------------------------------------------------------------------------------------- hand check
def rows_of(count: int) -> list[MinedRow]:
    return [MinedRow(line, f"q{line}", f"p{line}", 0.5, [Negative(f"n{line}", 0.4, 1)])
            for line in range(1, count + 1)]


def test_the_hand_check_draws_thirty_seeded_rows_in_file_order_or_all_of_fewer():
    rows = rows_of(100)
    sample = hand_check_sample(rows)
    assert len(sample) == HAND_CHECK_QUERIES == 30 and len({row.line for row in sample}) == 30
    assert [row.line for row in sample] == sorted(row.line for row in sample)
    assert [row.line for row in hand_check_sample(rows_of(100))] == [row.line for row in sample]
    assert [row.line for row in hand_check_sample(rows, draw=1)] != [row.line for row in sample]
    assert [row.line for row in sample] != list(range(1, 31))  # drawn, not the first 30
    assert hand_check_sample(rows_of(12)) == rows_of(12)


def test_hand_check_lists_each_model_mined_folder_of_the_first_seed(tmp_path):
    out = tmp_path / "out"
    many = [(f"q{i}", f"positive {i} text", 0.9, [(f"negative {i} text", 0.95 if i % 2 else 0.3, "mined")])
            for i in range(40)]
    echo_folder(out / "data" / "given", [{"query": q, "positive": p, "negative": "n"} for q, p, _, _ in many])
    for name in ("dense-naive-seed42", "dense-aware-seed42", "dense-naive-seed7", "bm25"):
        mined_folder(out / "data" / name, many)
    proxies = describe_mining(out, 42)
    assert set(proxies) == {"given", "bm25", "dense-naive-seed42", "dense-aware-seed42", "dense-naive-seed7"}
    text = (out / "hand_check.md").read_text()
    sections = re.findall(r"^## (\S+)", text, flags=re.M)
    assert sections == ["dense-naive-seed42", "dense-aware-seed42"]
    for name in sections:
        lines = re.findall(rf"^### {name} \d+: line (\d+)", text, flags=re.M)
        assert len(lines) == 30 and lines == re.findall(r"^### dense-naive-seed42 \d+: line (\d+)", text, flags=re.M)
    assert "score 0.9500; above the positive" in text and "- [ ] false negative" in text


# ---------------------------------------------------------------------------------------------- the plan
def finished_run(run: Path, step: int, adapter: bool = True) -> None:
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(f"step-{step}")
    if adapter:
        (run / "adapter").mkdir()


def test_remaining_steps_skip_what_a_part_finished(tmp_path):
    for name in ("given", "bm25", "dense-naive-seed42", ".dense-aware-seed42.partial"):
        (tmp_path / "data" / name).mkdir(parents=True)
    finished_run(tmp_path / "given-seed42", 240)
    finished_run(tmp_path / "given-seed7", 120)  # interrupted: resumes
    finished_run(tmp_path / "bm25-seed42", 240)
    finished_run(tmp_path / "bm25-seed7", 240, adapter=False)  # its last checkpoint, not yet its adapter
    names = [f"{step.kind} {step.name}" for step in remaining_steps(tmp_path, [42, 7], False, 240)]
    assert names == ["train given-seed7", "mine dense-aware-seed42", "mine dense-naive-seed7",
                     "mine dense-aware-seed7", "train dense-naive-seed42", "train dense-aware-seed42",
                     "train bm25-seed7", "train dense-naive-seed7", "train dense-aware-seed7"]
    with_teacher = [f"{step.kind} {step.name}" for step in remaining_steps(tmp_path, [42, 7], True, 240)]
    assert set(with_teacher) - set(names) == {"mine minilm-aware", "train minilm-aware-seed42",
                                              "train minilm-aware-seed7"}
    assert remaining_steps(tmp_path, [42], False, 120)[0] == Step("mine", "dense-aware", 42)  # a shorter budget
    assert len(remaining_steps(tmp_path / "fresh", [42, 7, 1], True, 240)) == 2 + 3 + 6 + 1 + 12


def options(out: Path, **changes) -> argparse.Namespace:
    values = dict(out=out, steps=240, save_every=60, body=44, batch=None, lr=None, warmup=None, dtype=None,
                  set=[], nproc=2, seeds=[42], rows=2000, negatives=1)
    return argparse.Namespace(**{**values, **changes})


def test_every_run_is_the_ablations_full_arm_and_differs_only_in_its_data(tmp_path):
    args = options(tmp_path, set=[("learning_rate", 0.001)])
    full = arm_config("full", 42, args, tmp_path / "x")
    configs = {arm: run_config(arm, 42, args) for arm in ("given", "bm25", "dense-naive", "dense-aware",
                                                          "minilm-aware")}
    own = ("output_dir", "dataset_file_path", "lr_scheduler_type")
    for arm, config in configs.items():
        assert {k: v for k, v in config.items() if k not in own} == {k: v for k, v in full.items() if k not in own}
        assert config["output_dir"] == str(tmp_path / f"{arm}-seed42") and config["learning_rate"] == 0.001
        assert config["lr_scheduler_type"] == "constant"  # the ablation keeps the config default, cosine
    decaying = options(tmp_path, set=[("lr_scheduler_type", "cosine")])
    assert run_config("bm25", 7, decaying)["lr_scheduler_type"] == "cosine"  # --set still decides
    assert [configs[arm]["dataset_file_path"] for arm in configs] == [
        str(tmp_path / "data" / name) for name in ("given", "bm25", "dense-naive-seed42", "dense-aware-seed42",
                                                   "minilm-aware")]


def test_naive_mining_switches_the_filter_off_and_both_share_one_cache():
    naive = mine_command("m", Path("g"), Path("o1"), Path("c"), 2, rounds.DENSE_FILTERS["dense-naive"])
    aware = mine_command("m", Path("g"), Path("o2"), Path("c"), 2, rounds.DENSE_FILTERS["dense-aware"])
    assert naive[naive.index("--relative-margin") + 1] == "off" and "--relative-margin" not in aware
    for command in (naive, aware):
        assert command[1:4] == ["-m", "debater", "mine"]
        assert (command[command.index("--cache") + 1], command[command.index("-k") + 1]) == ("c", "2")


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def no_training(monkeypatch, tmp_path):
    """Small assets in place of the real ones; training or mining would fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a bad-input test must not get as far as training or mining")

    monkeypatch.setattr(rounds, "train_runs", refuse)
    monkeypatch.setattr(rounds, "mine", refuse)
    monkeypatch.setattr(rounds, "BASE_MODEL", str(tmp_path))
    monkeypatch.setattr(rounds, "SOURCE", write_lines(tmp_path / "src" / "packages.jsonl", SOURCE_LINES))


def test_too_many_rows_is_one_line_and_leaves_no_settings_behind(tmp_path, no_training):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="has 4 valid rows; --rows 9 asks for more"):
        rounds.main(["--out", str(out), "--rows", "9", "--steps", "1", "--nproc", "1", "--skip-eval"])
    assert not (out / rounds.RECORD).exists()


def test_more_steps_than_one_pass_over_the_rows_is_refused(tmp_path, no_training):
    with pytest.raises(SystemExit, match="--steps 240 x global batch 8 is more than --rows 1000") as refused:
        rounds.main(["--out", str(tmp_path / "out"), "--rows", "1000", "--nproc", "2", "--batch", "4",
                     "--skip-eval"])
    assert "\n" not in str(refused.value)


def test_a_missing_asset_is_named_in_one_line(tmp_path, no_training, monkeypatch):
    args = ["--out", str(tmp_path / "out"), "--rows", "3", "--steps", "1", "--nproc", "1", "--batch", "1"]
    monkeypatch.setattr(rounds, "EVAL_SETS", {"stdlib-docs": str(tmp_path / "no-stdlib")})
    with pytest.raises(SystemExit, match="no-stdlib not found: build the assets with `make assets`"):
        rounds.main(args)  # found before training, not after it
    monkeypatch.setattr(rounds, "SOURCE", tmp_path / "absent" / "debian_packages.jsonl")
    with pytest.raises(SystemExit, match="absent/debian_packages.jsonl not found"):
        rounds.main([*args, "--skip-eval"])
    assert not (tmp_path / "out").exists()


def test_a_part_with_other_settings_is_refused(tmp_path, no_training):
    out = tmp_path / "out"
    args = ["--out", str(out), "--steps", "1", "--nproc", "1", "--batch", "1", "--skip-eval"]
    with pytest.raises(AssertionError, match="must not get as far as training"):  # data made, then training
        rounds.main([*args, "--rows", "3"])
    assert json.loads((out / rounds.RECORD).read_text())["settings"]["rows"] == 3
    with pytest.raises(SystemExit, match="holds runs made with other rows"):
        rounds.main([*args, "--rows", "2"])


# ---------------------------------------------------------------------------------------------- the result
def test_the_result_spreads_each_arm_over_seeds_on_both_sets_evaluating_each_model_once(tmp_path, monkeypatch):
    sets = {"debian": tmp_path / "debian-test", "stdlib-docs": tmp_path / "stdlib-test"}
    for folder in sets.values():
        folder.mkdir()
    calls = []

    def fake_evaluate(models, out, max_queries, max_corpus, tasks):
        calls.append((tasks, sorted(models)))
        return ({model: {"scores": {"task": {"ndcg_at_10": score(model, tasks)}}, "seconds": 2.0} for model in models},
                {})

    def score(model: str, tasks: str) -> float:
        return (len(Path(model).parent.parent.name) + (0.5 if "stdlib" in tasks else 0.0)) / 100

    monkeypatch.setattr(rounds, "EVAL_SETS", {name: str(folder) for name, folder in sets.items()})
    monkeypatch.setattr(ablation, "evaluate", fake_evaluate)
    monkeypatch.setattr(rounds, "reference_labels", lambda: {"base/exports/x": "base (untrained)"})
    monkeypatch.setattr(rounds, "exported_checkpoints",
                        lambda run, steps: {steps[0]: str(run / "exports" / f"step-{steps[0]}")})
    monkeypatch.setattr(rounds, "left_plateau_at", lambda run: None)
    out = tmp_path / "out"
    for name in ("given-seed42", "given-seed7", "dense-aware-seed42", "dense-aware-seed7", "bm25-seed42"):
        finished_run(out / name, 240)
    finished_run(out / "bm25-seed7", 120)  # not at the budget yet: left out
    args = options(out, max_queries=200, max_corpus=600)
    first = rounds.result(args, {"train_seconds": {}}, {})
    again = rounds.result(args, {"train_seconds": {}}, {})
    assert [tasks for tasks, _ in calls] == [str(sets["debian"]), str(sets["stdlib-docs"])]  # once per set
    assert len(calls[0][1]) == 6 and again["scores"] == first["scores"]
    debian, stdlib = first["arms"]["debian"], first["arms"]["stdlib-docs"]
    assert set(debian) == {"given", "dense-aware", "bm25"}
    given = [score(str(out / f"given-seed{seed}" / "exports" / "step-240"), "debian") for seed in (42, 7)]
    assert debian["given"]["ndcg_at_10"][240]["mean"] == pytest.approx(sum(given) / 2)
    assert debian["bm25"]["ndcg_at_10"][240]["n"] == 1 and stdlib["dense-aware"]["ndcg_at_10"][240]["n"] == 2
    assert stdlib["given"]["ndcg_at_10"][240]["mean"] == pytest.approx(sum(given) / 2 + 0.005)
    assert first["seeds"] == [7, 42] and first["eval_seconds"] == {"debian": 12, "stdlib-docs": 12}
    assert first["summary"].startswith("mining rounds (240 steps): nDCG@10")
    assert "given 0.1150/0.1200, bm25 0.1100/0.1150, dense-aware 0.1750/0.1800" in first["summary"]
