"""Bad KG/QA input (issue 13 items 1-4, 10): one line per error, every line accounted for, both loaders agree.

Each bad file is loaded by ``load_kg`` (line reader) and ``load_columnar_kg`` (pyarrow fast path with
the line-reader fallback, cached under a temporary ``KALE_RAY_CACHE``):

* ``on_error="error"``: a ``KGFormatError`` whose message is ONE line ``file:line: reason...`` with no
  chained exception (the CLI prints it as it is);
* ``on_error="skip"``: the reject's reason and line, and exactly the good lines' triples.
"""
from __future__ import annotations

import bz2
import gzip
import json
import logging
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kale_ray.core.kg import MAX_LINE_BYTES, KGFormatError, load_kg, read_names
from kale_ray.core.kgstore import build_columnar_kg, load_columnar_kg
from kale_ray.core.qa import QAFormatError, read_qa_jsonl
from kale_ray.core.rejects import Rejects

BOM = b"\xef\xbb\xbf"
GOOD_TSV = b"alice\tknows\tbob\nbob\tknows\tcarol\n"
GOOD = {("alice", "knows", "bob"), ("bob", "knows", "carol")}


def _zst(data: bytes) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as f:
        f.write(data)
    return sink.getvalue().to_pybytes()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KALE_RAY_CACHE", str(tmp_path / "cache"))


def _load(loader: str, path: Path, on_error: str, **kw):
    if loader == "load_kg":
        return load_kg(str(path), on_error=on_error, **kw)
    return load_columnar_kg(str(path), on_error=on_error, **kw)


def _named(kg) -> set[tuple[str, str, str]]:
    ents, rels = list(kg.entities), list(kg.relations)
    return {(ents[h], rels[r], ents[t]) for h, r, t in np.asarray(kg.triples).tolist()}


def _line_rejects(kg) -> list[tuple[str, int]]:
    return sorted((r["reason"], r["line"]) for r in kg.rejects.rows if "line" in r)


def _assert_one_line(e: BaseException, prefix: str) -> str:
    msg = str(e)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.startswith(prefix), (msg, prefix)
    assert e.__cause__ is None and e.__context__ is None, "a chained traceback"
    assert len(traceback.format_exception_only(type(e), e)) == 1
    return msg


# (id, file name, content, error: (line, text in the message) or None when the file loads,
#  skip: [(reason, line)] of the rejects, the triples loaded under skip)
CASES = [
    # item 1: BOM stripped (KG), control characters / NUL in a field are malformed
    ("bom_tsv", "kg.tsv", BOM + GOOD_TSV, None, [], GOOD),
    ("bom_csv", "kg.csv", BOM + b"alice,knows,bob\nbob,knows,carol\n", None, [], GOOD),
    ("bom_jsonl", "kg.jsonl", BOM + b'["alice","knows","bob"]\n{"head":"bob","relation":"knows","tail":"carol"}\n',
     None, [], GOOD),
    ("bom_then_header", "kg.tsv", BOM + b"head\trelation\ttail\n" + GOOD_TSV, None, [("header_row", 1)], GOOD),
    ("nul_tsv", "kg.tsv", GOOD_TSV + b"c\x00d\tknows\te\n", (3, "control character U+0000 (NUL) in head"),
     [("control_character", 3)], GOOD),
    ("nul_trailing", "kg.tsv", GOOD_TSV + b"c\tknows\te\x00\n", (3, "U+0000 (NUL) in tail"),
     [("control_character", 3)], GOOD),
    ("esc_csv", "kg.csv", b"alice,knows,bob\nc,kn\x1bows,e\nbob,knows,carol\n", (2, "U+001B (ESC) in relation"),
     [("control_character", 2)], GOOD),
    ("inner_cr_tsv", "kg.tsv", b"alice\tknows\tbob\nc\rd\tknows\te\nbob\tknows\tcarol\n", (2, "U+000D (CR) in head"),
     [("control_character", 2)], GOOD),
    ("c1_control", "kg.tsv", GOOD_TSV + "c\u0085d\tknows\te\n".encode(), (3, "U+0085"),
     [("control_character", 3)], GOOD),
    ("inner_bom", "kg.tsv", GOOD_TSV + BOM + b"carol\tknows\tdave\n", (3, "U+FEFF (byte-order mark) in head"),
     [("control_character", 3)], GOOD),
    ("nul_escape_jsonl", "kg.jsonl", b'["alice","knows","bob"]\n["bob","knows","carol"]\n["c","r","d\\u0000"]\n',
     (3, "U+0000 (NUL) in tail"), [("control_character", 3)], GOOD),
    ("tab_in_csv_field", "kg.csv", b"alice,knows,bob\nbob,knows,carol\n\"a\tb\",r,c\n", (3, "U+0009 (TAB) in head"),
     [("control_character", 3)], GOOD),
    # item 2: a header on the first data line is skipped and said, never a triple
    ("header_tsv", "kg.tsv", b"head\trelation\ttail\n" + GOOD_TSV, None, [("header_row", 1)], GOOD),
    ("header_hrt_tsv", "kg.tsv", b"H\tR\tT\n" + GOOD_TSV, None, [("header_row", 1)], GOOD),
    ("header_spo_tsv", "kg.tsv", b" Subject \tPredicate\tOBJECT\r\n" + GOOD_TSV, None, [("header_row", 1)], GOOD),
    ("header_csv", "kg.csv", b"head,relation,tail\nalice,knows,bob\nbob,knows,carol\n", None, [("header_row", 1)], GOOD),
    ("header_quoted_csv", "kg.csv", b'"head","relation","tail"\nalice,knows,bob\nbob,knows,carol\n', None,
     [("header_row", 1)], GOOD),
    ("header_after_comment", "kg.tsv", b"# my kg\n\nhead\trelation\ttail\n" + GOOD_TSV, None, [("header_row", 3)], GOOD),
    ("header_twice", "kg.tsv", b"head\trelation\ttail\n" + GOOD_TSV + b"head\trelation\ttail\n", None,
     [("header_row", 1)], GOOD | {("head", "relation", "tail")}),  # only the first data line is a header
    # item 3: JSONL fields must be strings
    ("jsonl_numbers", "kg.jsonl", b'[1,2,3]\n["alice","knows","bob"]\n["bob","knows","carol"]\n',
     (1, "head must be a string, got number 1 (numbers are read only with jsonl_numbers=True)"),
     [("malformed_triple", 1)], GOOD),
    ("jsonl_object_field", "kg.jsonl",
     b'["alice","knows","bob"]\n{"head":"a","relation":"r","tail":{"x":1}}\n["bob","knows","carol"]\n',
     (2, 'tail must be a string, got object {"x": 1}'), [("malformed_triple", 2)], GOOD),
    ("jsonl_list_field", "kg.jsonl", b'["alice","knows","bob"]\n["bob","knows","carol"]\n["a",["r"],"b"]\n',
     (3, "relation must be a string, got array"), [("malformed_triple", 3)], GOOD),
    ("jsonl_null_field", "kg.jsonl", b'{"h":null,"r":"r","t":"b"}\n["alice","knows","bob"]\n["bob","knows","carol"]\n',
     (1, "head must be a string, got null"), [("malformed_triple", 1)], GOOD),
    ("jsonl_bool_field", "kg.jsonl", b'["alice","knows","bob"]\n["bob","knows",true]\n["bob","knows","carol"]\n',
     (2, "tail must be a string, got boolean"), [("malformed_triple", 2)], GOOD),
    ("jsonl_no_keys", "kg.jsonl", b'["alice","knows","bob"]\n{"from":"a","to":"b"}\n["bob","knows","carol"]\n',
     (2, "expected keys head/relation/tail"), [("malformed_triple", 2)], GOOD),
    ("jsonl_scalar", "kg.jsonl", b'["alice","knows","bob"]\n["bob","knows","carol"]\n42\n',
     (3, "expected a JSON object or list, got number"), [("malformed_triple", 3)], GOOD),
    # item 4: the documented errors, one line each
    ("two_columns", "kg.tsv", GOOD_TSV + b"carol\tknows\n", (3, "expected 3 columns (head, relation, tail), got 2"),
     [("malformed_triple", 3)], GOOD),
    ("empty_field", "kg.tsv", b"alice\tknows\tbob\nc\t\td\nbob\tknows\tcarol\n", (2, "empty relation"),
     [("malformed_triple", 2)], GOOD),
    ("non_utf8", "kg.tsv", b"alice\tknows\tbob\nca\xffrol\tknows\tbob\nbob\tknows\tcarol\n", (2, "not valid UTF-8"),
     [("bad_encoding", 2)], GOOD),
    ("long_line", "kg.tsv", GOOD_TSV + b"x" * (MAX_LINE_BYTES + 5) + b"\tr\tb\n",
     (3, f"line longer than {MAX_LINE_BYTES} bytes"), [("line_too_long", 3)], GOOD),
    ("utf16", "kg.tsv", "alice\tknows\tbob\n".encode("utf-16"), (1, "UTF-16 text"), None, None),
    # item 10: compressed triples
    ("gzip", "kg.tsv.gz", gzip.compress(BOM + b"head\trelation\ttail\n" + GOOD_TSV), None, [("header_row", 1)], GOOD),
    ("bz2", "kg.csv.bz2", bz2.compress(b"alice,knows,bob\nbob,knows,carol\n"), None, [], GOOD),
    ("zstd", "kg.jsonl.zst", _zst(b'["alice","knows","bob"]\n["bob","knows","carol"]\n'), None, [], GOOD),
    ("zstd_tsv", "kg.tsv.zst", _zst(GOOD_TSV), None, [], GOOD),
    ("gzip_bad_line", "kg.tsv.gz", gzip.compress(GOOD_TSV + b"a\tb\n"), (3, "expected 3 columns"),
     [("malformed_triple", 3)], GOOD),
    ("gzip_corrupt", "kg.tsv.gz", b"this is not gzip\n", (1, "cannot read gzip data"), None, None),
    ("gzip_truncated", "kg.tsv.gz", gzip.compress(GOOD_TSV + b"carol\tknows\tdave\n" * 50)[:-12],
     (None, "cannot read gzip data"), [("bad_compression", None)], GOOD | {("carol", "knows", "dave")}),
]
LOADERS = ["load_kg", "load_columnar_kg"]


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_file_on_error_error(tmp_path, loader, case):
    _, name, content, error, _, _ = case
    p = tmp_path / name
    p.write_bytes(content)
    if error is None:
        kg = _load(loader, p, "error")
        assert _named(kg) == case[5]
        assert _line_rejects(kg) == sorted(case[4])  # header rows are said even when bad lines stop the load
        return
    line, text = error
    with pytest.raises(KGFormatError) as ei:
        _load(loader, p, "error")
    msg = _assert_one_line(ei.value, f"{p}:{line}: " if line else f"{p}:")
    assert text in msg


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_file_on_error_skip(tmp_path, loader, case):
    _, name, content, error, rejects, triples = case
    p = tmp_path / name
    p.write_bytes(content)
    if triples is None:  # nothing valid: the load stops, one line, saying why
        with pytest.raises(KGFormatError) as ei:
            _load(loader, p, "skip")
        msg = _assert_one_line(ei.value, f"{p}: no valid triples")
        assert ("bad_encoding" if name == "kg.tsv" else "bad_compression") in msg
        return
    kg = _load(loader, p, "skip")
    assert _named(kg) == triples
    got = _line_rejects(kg)
    if rejects and rejects[0][1] is None:  # the line depends on where the data broke
        got = [(reason, None) for reason, _ in got]
    assert got == sorted(rejects, key=str)
    for r in kg.rejects.rows:
        if "line" in r:
            assert r["file"] == str(p) and r["message"] and "\n" not in r["message"]
    if error is not None:  # the reject says what the error says
        (row,) = [r for r in kg.rejects.rows if "line" in r and (r["line"] == error[0] or error[0] is None)]
        assert error[1] in row["message"]


@pytest.mark.parametrize("loader", LOADERS)
def test_bom_does_not_split_an_entity(tmp_path, loader):
    """The issue's case: a BOM made ``\\ufeffalice`` next to ``alice``."""
    p = tmp_path / "kg.tsv"
    p.write_bytes(BOM + b"alice\tknows\tbob\nbob\tknows\talice\n")
    kg = _load(loader, p, "error")
    assert sorted(kg.entities) == ["alice", "bob"]
    assert not any("\ufeff" in e for e in kg.entities)


@pytest.mark.parametrize("loader", LOADERS)
def test_header_rows_agree_between_loaders(tmp_path, loader):
    p = tmp_path / "kg.tsv"
    p.write_bytes(b"head\trelation\ttail\n" + GOOD_TSV)
    kg = _load(loader, p, "error")
    assert ("head", "relation", "tail") not in _named(kg)
    assert kg.rejects.counts() == {"header_row": 1}
    assert kg.summary()["rejected_lines"] == {"header_row": 1}


@pytest.mark.parametrize("loader", LOADERS)
def test_jsonl_numbers_by_explicit_choice(tmp_path, loader):
    p = tmp_path / "kg.jsonl"
    p.write_bytes(b'[1,2,3]\n{"head":"a","relation":"r","tail":2.5}\n["a","r",true]\n')
    kg = _load(loader, p, "skip", jsonl_numbers=True)
    assert _named(kg) == {("1", "2", "3"), ("a", "r", "2.5")}
    assert _line_rejects(kg) == [("malformed_triple", 3)]  # a boolean is never a field


@pytest.mark.parametrize("loader", LOADERS)
def test_empty_file(tmp_path, loader):
    for content in (b"", BOM, b"\n\n  \n"):
        p = tmp_path / "empty.tsv"
        p.write_bytes(content)
        with pytest.raises(KGFormatError) as ei:
            _load(loader, p, "error")
        assert _assert_one_line(ei.value, f"{p}: ") == f"{p}: empty file (no triples)"
        with pytest.raises(KGFormatError) as ei:
            _load(loader, p, "skip")
        assert "'empty_file': 1" in _assert_one_line(ei.value, f"{p}: no valid triples")


@pytest.mark.parametrize("loader", LOADERS)
def test_folder_names_what_it_skips_and_reads_compressed(tmp_path, loader, caplog):
    d = tmp_path / "kgdir"
    (d / "sub").mkdir(parents=True)
    (d / "a.tsv").write_bytes(b"alice\tknows\tbob\n")
    (d / "b.tsv.gz").write_bytes(gzip.compress(b"bob\tknows\tcarol\n"))
    (d / "c.csv.bz2").write_bytes(bz2.compress(b"carol,knows,dave\n"))
    (d / "d.jsonl.zst").write_bytes(_zst(b'["dave","knows","erin"]\n'))
    (d / "e.tsv").write_bytes(b"")
    (d / "README.md").write_text("# my kg\n")
    (d / "notes.tsv.bak").write_text("x\ty\tz\n")
    with caplog.at_level(logging.WARNING):
        kg = _load(loader, d, "skip")
    assert _named(kg) == {("alice", "knows", "bob"), ("bob", "knows", "carol"), ("carol", "knows", "dave"),
                          ("dave", "knows", "erin")}
    skipped = sorted(Path(r["file"]).name for r in kg.rejects.rows if r["reason"] == "skipped_file")
    assert skipped == ["README.md", "notes.tsv.bak", "sub"]
    assert [Path(r["file"]).name for r in kg.rejects.rows if r["reason"] == "empty_file"] == ["e.tsv"]
    assert "README.md" in caplog.text and "sub" in caplog.text
    # on_error=error: the empty file is an error naming it, in one line
    with pytest.raises(KGFormatError) as ei:
        _load(loader, d, "error")
    _assert_one_line(ei.value, f"{d / 'e.tsv'}: empty file")
    # a folder with nothing to read says what it found
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "README.md").write_text("x")
    with pytest.raises(FileNotFoundError, match="not read: README.md"):
        _load(loader, tmp_path / "none", "skip")


def test_columnar_cache_hit_keeps_the_rejects(tmp_path):
    p = tmp_path / "kg.tsv"
    p.write_bytes(BOM + b"head\trelation\ttail\n" + GOOD_TSV + b"a\x00\tr\tb\n")
    first = load_columnar_kg(str(p), on_error="skip")
    again = load_columnar_kg(str(p), on_error="skip")
    assert _line_rejects(first) == _line_rejects(again) == [("control_character", 4), ("header_row", 1)]
    assert list(first.entities) == list(again.entities) == ["alice", "bob", "carol"]


# --------------------------------------------------------------------------- #
# Names files
# --------------------------------------------------------------------------- #
def test_names_file_bom_and_control_characters(tmp_path):
    p = tmp_path / "names.tsv"
    p.write_bytes(BOM + b"alice\tAlice\tAl\nbob\tB\x00b\ncarol\tCarol\n")
    with pytest.raises(KGFormatError) as ei:
        read_names(p)
    assert "control character U+0000 (NUL) in name" in _assert_one_line(ei.value, f"{p}:2: ")
    rej = Rejects()
    names, aliases = read_names(p, on_error="skip", rejects=rej)
    assert names == {"alice": "Alice", "carol": "Carol"} and aliases == {"alice": ["Al"]}
    assert [(r["reason"], r["line"]) for r in rej.rows] == [("control_character", 2)]


def test_names_jsonl_fields_must_be_strings(tmp_path):
    p = tmp_path / "names.jsonl"
    p.write_bytes(b'{"id":"a","name":"A","aliases":"aa"}\n{"id":1,"name":"One"}\n{"id":"b","name":{"x":1}}\n'
                  b'{"id":"c","name":"C","aliases":["cc"]}\n')
    rej = Rejects()
    names, aliases = read_names(p, on_error="skip", rejects=rej)
    assert names == {"c": "C"} and aliases == {"c": ["cc"]}
    assert [(r["reason"], r["line"]) for r in rej.rows] == [("malformed_name", 1), ("malformed_name", 2),
                                                              ("malformed_name", 3)]
    names, _ = read_names(p, on_error="skip", rejects=Rejects(), jsonl_numbers=True)
    assert names == {"1": "One", "c": "C"}


# --------------------------------------------------------------------------- #
# QA files
# --------------------------------------------------------------------------- #
QA_GOOD = json.dumps({"id": "q1", "question": "Who knows bob?", "answer": "alice"}).encode()
QA_CASES = [
    ("bom", BOM + QA_GOOD + b"\n", None, []),
    ("non_utf8", QA_GOOD + b'\n{"question": "\xff", "answer": "x"}\n', (2, "not valid UTF-8"), [("bad_encoding", 2)]),
    ("utf16", "{}".encode("utf-16") + b"\n" + QA_GOOD + b"\n", (1, "UTF-16 text"), [("bad_encoding", 1)]),
    ("long_line", QA_GOOD + b"\n" + b'{"question": "' + b"x" * MAX_LINE_BYTES + b'", "answer": "a"}\n' + QA_GOOD + b"\n",
     (2, f"line longer than {MAX_LINE_BYTES} bytes"), [("line_too_long", 2)]),
    ("bad_json", QA_GOOD + b"\n{nope\n", (2, "not valid JSON"), [("malformed_qa", 2)]),
    ("huge_int", QA_GOOD + b"\n" + b"1" * 5000 + b"\n", (2, "not valid JSON"), [("malformed_qa", 2)]),
]


@pytest.mark.parametrize("name,content,error,rejects", QA_CASES, ids=[c[0] for c in QA_CASES])
def test_qa_bad_input(tmp_path, name, content, error, rejects):
    p = tmp_path / "qa.jsonl"
    p.write_bytes(content)
    rej = Rejects()
    rows = list(read_qa_jsonl(p, rej, on_error="skip"))
    assert [r.id for r in rows if r.id == "q1"] and all(r.question == "Who knows bob?" for r in rows)
    assert [(r["reason"], r["line"]) for r in rej.rows] == rejects
    assert all("\n" not in r["message"] for r in rej.rows)
    if error is None:
        assert len(list(read_qa_jsonl(p, on_error="error"))) == 1
        return
    with pytest.raises(QAFormatError) as ei:
        list(read_qa_jsonl(p, on_error="error"))
    assert error[1] in _assert_one_line(ei.value, f"{p}:{error[0]}: ")


def test_qa_bom_only_at_the_start_of_the_file(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_bytes(BOM + QA_GOOD + b"\n" + BOM + QA_GOOD + b"\n")
    first = len(BOM + QA_GOOD + b"\n")
    rej = Rejects()
    assert len(list(read_qa_jsonl(p, rej, byte_range=(0, first)))) == 1 and not rej.rows
    # a BOM in the middle of a file is not a line start to forgive
    list(read_qa_jsonl(p, rej, byte_range=(first, p.stat().st_size), first_line=2))
    assert [(r["reason"], r["line"]) for r in rej.rows] == [("malformed_qa", 2)]


def test_qa_long_line_keeps_the_byte_ranges(tmp_path):
    p = tmp_path / "qa.jsonl"
    lines = [QA_GOOD, b"y" * (2 * MAX_LINE_BYTES), QA_GOOD.replace(b"q1", b"q3")]
    p.write_bytes(b"".join(x + b"\n" for x in lines))
    cut = len(lines[0]) + 1 + len(lines[1]) + 1
    rej = Rejects()
    a = list(read_qa_jsonl(p, rej, byte_range=(0, cut)))
    b = list(read_qa_jsonl(p, rej, byte_range=(cut, p.stat().st_size), first_line=3))
    assert [r.id for r in a + b] == ["q1", "q3"]
    assert [(r["reason"], r["line"]) for r in rej.rows] == [("line_too_long", 2)]


# --------------------------------------------------------------------------- #
# Property: every line of a random mix is a triple or a reject, exactly once, in both loaders
# --------------------------------------------------------------------------- #
_WORDS = st.sampled_from(["alice", "bob", "carol", "dave", "knows", "likes", "x_1", "é", "中文"])
_GOOD_LINE = st.tuples(_WORDS, _WORDS, _WORDS).map(lambda t: ("good", t))
_BAD_LINE = st.one_of(
    st.tuples(_WORDS, _WORDS).map(lambda t: ("malformed_triple", t)),  # two columns
    st.tuples(_WORDS, _WORDS, _WORDS, _WORDS).map(lambda t: ("malformed_triple", t)),  # four columns
    st.tuples(_WORDS, st.just(""), _WORDS).map(lambda t: ("malformed_triple", t)),  # empty field
    st.tuples(_WORDS, _WORDS, _WORDS, st.sampled_from(["\x00", "\x1b", "\x7f", "\x85", "\ufeff", "\x01"]),
              st.integers(0, 2)).map(lambda t: ("control_character", t)),
    st.tuples(_WORDS, _WORDS).map(lambda t: ("bad_encoding", t)),
    st.sampled_from(["", "   ", "# comment"]).map(lambda s: ("skip", s)),
)
_LINES = st.lists(st.one_of(_GOOD_LINE, _BAD_LINE), max_size=20)


def _render(kind: str, val, sep: str) -> bytes:
    if kind == "good" or kind == "malformed_triple":
        return sep.join(val).encode()
    if kind == "control_character":
        h, r, t, c, at = val
        parts = [h, r, t]
        parts[at] = "a" + c + parts[at]  # inside the field (str.strip would take an edge NEL as whitespace)
        return sep.join(parts).encode()
    if kind == "bad_encoding":
        return val[0].encode() + b"\xff" + sep.encode() + val[1].encode() + sep.encode() + b"z"
    return val.encode()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=_LINES, fmt=st.sampled_from(["tsv", "csv", "tsv.gz"]), bom=st.booleans(), header=st.booleans(),
       crlf=st.booleans())
@example(lines=[("good", ("alice", "knows", "bob"))], fmt="tsv", bom=True, header=True, crlf=False)
@example(lines=[("good", ("alice", "knows", "bob")), ("good", ("alice", "knows", "bob"))], fmt="csv", bom=False,
         header=False, crlf=True)
def test_property_every_line_accounted_once_in_both_loaders(tmp_path, lines, fmt, bom, header, crlf):
    sep = "\t" if fmt.startswith("tsv") else ","
    kinds = ([("header", None)] if header else []) + lines
    raw = [b"head" + sep.encode() + b"relation" + sep.encode() + b"tail" if k == "header" else _render(k, v, sep)
           for k, v in kinds]
    data = (BOM if bom else b"") + b"".join(x + (b"\r\n" if crlf else b"\n") for x in raw)
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    p = work / f"kg.{fmt}"
    p.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    good = [v for k, v in kinds if k == "good"]
    first_data = next((i for i, (k, _) in enumerate(kinds) if k != "skip"), None)
    expected_rejects = sorted(
        ("header_row" if k == "header" else k, i + 1) for i, (k, _) in enumerate(kinds)
        if k not in ("good", "skip") and not (k == "header" and i != first_data))
    if not good:
        for load in (lambda: load_kg(str(p), on_error="skip"),
                     lambda: load_columnar_kg(str(p), on_error="skip", cache_dir=work / "cache")):
            with pytest.raises(KGFormatError, match="no valid triples"):
                load()
        return
    kg = load_kg(str(p), on_error="skip")
    ckg = load_columnar_kg(str(p), on_error="skip", cache_dir=work / "cache")
    ref = build_columnar_kg(str(p), on_error="skip")
    for k in (kg, ckg, ref):
        line_rej = _line_rejects(k)
        assert line_rej == expected_rejects  # every bad line once, with its reason and line
        assert len({ln for _, ln in line_rej}) == len(line_rej)
        assert _named(k) == set(good)
        # every line: a triple, a duplicate of one, a reject with its line, or a blank/comment line
        dups = k.rejects.counts().get("duplicate_triple", 0)
        n_skip = sum(1 for kd, _ in kinds if kd == "skip")
        assert len(k.triples) + dups + len(line_rej) + n_skip == len(kinds)
    # the two loaders agree on everything
    assert list(ckg.entities) == list(kg.entities) == list(ref.entities)
    assert list(ckg.relations) == list(kg.relations)
    assert np.array_equal(np.asarray(ckg.triples), kg.triples)
    assert ckg.summary() == kg.summary() == ref.summary()
