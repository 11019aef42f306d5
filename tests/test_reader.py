"""Row validation (data_pipeline.reader) and instruction lookup (data_pipeline.registry)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from data_pipeline import reader
from data_pipeline.pieces import split_lines
from data_pipeline.reader import ReadCounts, Row, Skip, parse_line, read_rows
from data_pipeline.registry import (
    DATASETS_FILE_NAME,
    ECHO_INSTRUCTIONS,
    RegistryError,
    instructions_for,
    load_extra_instructions,
)

GOOD = {"query": "q text", "positive": "p text", "negative": "n text"}


def line(**fields) -> str:
    row = dict(GOOD)
    for key, value in fields.items():
        if value is _DROP:
            row.pop(key)
        else:
            row[key] = value
    return json.dumps(row)


_DROP = object()


# --------------------------------------------------------------------------- parse_line


def test_parse_line_accepts_a_good_row_and_wraps_a_single_negative():
    result = parse_line(line(), 7)
    assert isinstance(result, Row)
    assert result == Row(7, "q text", "p text", ["n text"])


def test_parse_line_keeps_a_list_of_negatives_in_order_and_ignores_extra_keys():
    text = json.dumps({**GOOD, "negative": ["a", "b", "c"], "score": 1.0})
    result = parse_line(text, 1)
    assert isinstance(result, Row)
    assert result.negatives == ["a", "b", "c"]


@pytest.mark.parametrize("text, reason", [
    ('{"query": "q", "positive": "p", "negative": "n"', "malformed_json"),
    ("not json at all", "malformed_json"),
    ('{"query": "q",}', "malformed_json"),
    ('["q", "p", "n"]', "not_an_object"),
    ('"just a string"', "not_an_object"),
    ("42", "not_an_object"),
    ("null", "not_an_object"),
    (line(query=_DROP), "query_missing"),
    (line(positive=_DROP), "positive_missing"),
    (line(negative=_DROP), "negative_missing"),
    (line(query=""), "query_empty"),
    (line(query="   \t"), "query_empty"),
    (line(positive=""), "positive_empty"),
    (line(positive="\n "), "positive_empty"),
    (line(query=3), "query_not_string"),
    (line(query=None), "query_not_string"),
    (line(query=["q"]), "query_not_string"),
    (line(positive={"text": "p"}), "positive_not_string"),
    (line(positive=True), "positive_not_string"),
    (line(negative=""), "negative_empty"),
    (line(negative="  "), "negative_empty"),
    (line(negative=[]), "negative_empty"),
    (line(negative=["ok", ""]), "negative_empty"),
    (line(negative=["ok", "  "]), "negative_empty"),
    (line(negative=["ok", 3]), "negative_not_string"),
    (line(negative=[None]), "negative_not_string"),
    (line(negative=[["nested"]]), "negative_not_string"),
    (line(negative=5), "negative_not_string"),
    (line(negative=None), "negative_not_string"),
])
def test_parse_line_skip_reasons(text, reason):
    result = parse_line(text, 11)
    assert isinstance(result, Skip), result
    assert result == Skip(11, reason)


def test_parse_line_reports_the_first_bad_field():
    # query is checked before positive, positive before negative
    assert parse_line("{}", 1).reason == "query_missing"
    assert parse_line(json.dumps({"query": "q"}), 1).reason == "positive_missing"
    assert parse_line(json.dumps({"query": "q", "positive": 1, "negative": []}), 1).reason == "positive_not_string"


# --------------------------------------------------------------------------- read_rows


def write_lines(path: Path, lines: list[bytes | str]) -> Path:
    path.write_bytes(b"".join((x.encode() if isinstance(x, str) else x) + b"\n" for x in lines))
    return path


def test_read_rows_counts_every_skip_and_keeps_line_numbers(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [
        line(query="first"),                       # 1 ok
        "{broken",                                 # 2 malformed_json
        "",                                        # 3 blank: not a row
        '["a list"]',                              # 4 not_an_object
        line(positive=_DROP),                      # 5 positive_missing
        "   ",                                     # 6 blank (spaces)
        line(negative=[]),                         # 7 negative_empty
        line(negative=["x", 1]),                   # 8 negative_not_string
        b'{"query": "caf\xe9", "positive": "p", "negative": "n"}',  # 9 latin-1, not UTF-8
        line(query="last", negative=["a", "b"]),   # 10 ok
        "{also broken",                            # 11 malformed_json
    ])
    counts = ReadCounts()
    rows = list(read_rows(path, counts))

    assert [(r.line, r.query) for r in rows] == [(1, "first"), (10, "last")]
    assert rows[1].negatives == ["a", "b"]
    assert counts.read == 9  # blank lines are not counted
    assert dict(counts.skipped) == {
        "malformed_json": 2, "not_an_object": 1, "positive_missing": 1, "negative_empty": 1,
        "negative_not_string": 1, "not_utf8": 1,
    }
    assert counts.read == len(rows) + sum(counts.skipped.values())
    assert counts.written == 0  # the caller counts what it writes


@pytest.mark.parametrize("bytes_per_piece", [1, 40, 100, 200, 10_000])
def test_pieces_cover_the_file_and_read_the_same_rows_and_skips(tmp_path, bytes_per_piece):
    """Reading piece by piece gives the whole-file rows, line numbers and skip counts."""
    path = write_lines(tmp_path / "data.jsonl", [
        line(query="a"), "{broken", "", line(query="b"), line(positive=""), "  ", line(query="c"),
        b'{"query": "caf\xe9", "positive": "p", "negative": "n"}', line(query="d"), line(query="e"), "[1]",
    ])
    pieces = split_lines(path, bytes_per_piece)
    assert pieces[0].start == 0 and pieces[-1].stop == path.stat().st_size
    assert all(a.stop == b.start and a.first_line + a.lines == b.first_line for a, b in zip(pieces, pieces[1:]))
    assert sum(p.lines for p in pieces) == 11
    if bytes_per_piece == 1:
        assert [p.lines for p in pieces] == [1] * 11
    if bytes_per_piece == 10_000:
        assert len(pieces) == 1
    assert all(p.stop - p.start < bytes_per_piece + 60 for p in pieces)  # a piece ends at the first line end past the target
    whole, parts = ReadCounts(), ReadCounts()
    expected = [(r.line, r.query) for r in read_rows(path, whole)]
    got = []
    for piece in pieces:
        counts = ReadCounts()
        got += [(r.line, r.query) for r in read_rows(path, counts, piece=piece)]
        parts.add(counts)
    assert got == expected == [(1, "a"), (4, "b"), (7, "c"), (9, "d"), (10, "e")]
    assert parts.as_dict() == whole.as_dict()


def test_a_file_without_a_final_newline_is_read_whole_by_pieces(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(line(query="a") + "\n" + line(query="b"))
    pieces = split_lines(path, 1)
    assert [p.lines for p in pieces] == [1, 1]
    assert [r.query for p in pieces for r in read_rows(path, ReadCounts(), piece=p)] == ["a", "b"]


def test_read_rows_accepts_utf8_text_and_crlf_line_endings(tmp_path):
    path = tmp_path / "data.jsonl"
    body = (json.dumps({"query": "café ü", "positive": "日本語", "negative": ["ñ"]}, ensure_ascii=False)
            + "\r\n\r\n" + line() + "\r\n")
    path.write_bytes(body.encode("utf-8"))
    counts = ReadCounts()
    rows = list(read_rows(path, counts))
    assert [r.line for r in rows] == [1, 3]
    assert rows[0].query == "café ü" and rows[0].positive == "日本語" and rows[0].negatives == ["ñ"]
    assert counts.read == 2 and not counts.skipped


def test_read_rows_only_blank_lines_reads_nothing(tmp_path):
    path = write_lines(tmp_path / "blank.jsonl", ["", "  ", "\t", ""])
    counts = ReadCounts()
    assert list(read_rows(path, counts)) == []
    assert counts.read == 0 and not counts.skipped


def test_read_counts_as_dict_is_sorted_and_plain():
    counts = ReadCounts(read=5, written=2)
    counts.skipped["query_missing"] += 2
    counts.skipped["malformed_json"] += 1
    out = counts.as_dict()
    assert out == {"read": 5, "written": 2, "skipped": {"malformed_json": 1, "query_missing": 2}}
    assert list(out["skipped"]) == ["malformed_json", "query_missing"]
    assert type(out["skipped"]) is dict
    json.dumps(out)  # serialisable into the manifest


def test_read_rows_strict_raises_naming_file_and_line(tmp_path):
    path = write_lines(tmp_path / "strict.jsonl", [line(), "", line(query="")])
    counts = ReadCounts()
    seen = []
    with pytest.raises(ValueError) as info:
        for row in read_rows(path, counts, strict=True):
            seen.append(row.line)
    message = str(info.value)
    assert f"{path}:3" in message
    assert "query_empty" in message
    assert seen == [1]


def test_read_rows_strict_raises_on_non_utf8(tmp_path):
    path = write_lines(tmp_path / "bytes.jsonl", [b"\xff\xfe garbage"])
    with pytest.raises(ValueError, match=r"bytes\.jsonl:1"):
        list(read_rows(path, ReadCounts(), strict=True))


def test_read_rows_strict_passes_clean_files(tmp_path):
    path = write_lines(tmp_path / "clean.jsonl", [line(), line(negative=["a", "b"])])
    counts = ReadCounts()
    assert len(list(read_rows(path, counts, strict=True))) == 2
    assert counts.read == 2 and not counts.skipped


def test_read_rows_logs_a_bounded_number_of_skips(tmp_path, caplog):
    path = write_lines(tmp_path / "many.jsonl", ["{bad"] * (reader.MAX_LOGGED_SKIPS + 10))
    counts = ReadCounts()
    with caplog.at_level(logging.WARNING, logger=reader.__name__):
        assert list(read_rows(path, counts)) == []
    warnings = [r for r in caplog.records if r.name == reader.__name__]
    assert len(warnings) == reader.MAX_LOGGED_SKIPS
    assert counts.skipped["malformed_json"] == reader.MAX_LOGGED_SKIPS + 10


# --------------------------------------------------------------------------- registry

ECHO_NAMES = {
    "allnli", "dureader", "eli5_question_answer", "fever", "hotpot_qa", "miracl", "mrtydi",
    "msmarco_passage", "msmarco_document", "nq", "quora_duplicates", "squad", "t2ranking", "trivia_qa",
}


def test_the_fourteen_echo_files_are_known():
    assert set(ECHO_INSTRUCTIONS) == ECHO_NAMES
    for name in ECHO_NAMES:
        options = instructions_for(name, {})
        assert options and all(isinstance(o, str) and o.strip() for o in options), name


@pytest.mark.parametrize("name", ["allnli", "quora_duplicates"])
def test_allnli_and_quora_have_two_alternating_instructions(name):
    options = instructions_for(name, {})
    assert len(options) == 2 and options[0] != options[1]


def test_other_echo_files_have_one_instruction():
    for name in ECHO_NAMES - {"allnli", "quora_duplicates"}:
        assert len(instructions_for(name, {})) == 1, name
    assert instructions_for("msmarco_passage", {}) != instructions_for("msmarco_document", {})


def test_unknown_file_is_an_error_naming_it_and_the_datasets_file():
    with pytest.raises(RegistryError) as info:
        instructions_for("my_private_set", {})
    message = str(info.value)
    assert "my_private_set.jsonl" in message
    assert DATASETS_FILE_NAME in message
    assert isinstance(info.value, ValueError)


def test_datasets_file_string_and_list_entries(tmp_path):
    path = tmp_path / DATASETS_FILE_NAME
    path.write_text(json.dumps({
        "mine": "Given a thing, retrieve another thing:",
        "alternating": ["First instruction:", "Second instruction:"],
        "nq": "Override for nq:",
    }))
    extra = load_extra_instructions(path)
    assert extra == {
        "mine": ["Given a thing, retrieve another thing:"],
        "alternating": ["First instruction:", "Second instruction:"],
        "nq": ["Override for nq:"],
    }
    assert instructions_for("mine", extra) == ["Given a thing, retrieve another thing:"]
    assert instructions_for("alternating", extra) == ["First instruction:", "Second instruction:"]
    assert instructions_for("nq", extra) == ["Override for nq:"]  # the datasets file wins
    assert instructions_for("fever", extra) == ECHO_INSTRUCTIONS["fever"]  # the rest still known
    with pytest.raises(RegistryError, match="other"):
        instructions_for("other", extra)


def test_missing_or_absent_datasets_file_means_no_extra_entries(tmp_path):
    assert load_extra_instructions(None) == {}
    assert load_extra_instructions(tmp_path / "nope.json") == {}


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not valid JSON"),
    ('["a", "b"]', "expected an object"),
    ('"instruction"', "expected an object"),
    ('{"mine": 3}', "'mine'"),
    ('{"mine": null}', "'mine'"),
    ('{"mine": ""}', "'mine'"),
    ('{"mine": "   "}', "'mine'"),
    ('{"mine": []}', "'mine'"),
    ('{"mine": ["ok", 2]}', "'mine'"),
    ('{"mine": ["ok", ""]}', "'mine'"),
    ('{"mine": {"a": "b"}}', "'mine'"),
])
def test_malformed_datasets_file_is_an_error_naming_the_file(tmp_path, content, fragment):
    path = tmp_path / DATASETS_FILE_NAME
    path.write_text(content)
    with pytest.raises(RegistryError) as info:
        load_extra_instructions(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_non_utf8_datasets_file_is_a_registry_error_naming_the_file(tmp_path):
    path = tmp_path / DATASETS_FILE_NAME
    path.write_bytes(b'{"mine": "caf\xe9:"}')  # latin-1, not UTF-8
    with pytest.raises(RegistryError) as info:
        load_extra_instructions(path)
    assert str(path) in str(info.value)
