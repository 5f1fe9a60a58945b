"""KG loading (kale_ray.core.kg): formats, file:line errors, skip-and-count, names, builtins, CSR index."""
from __future__ import annotations

import csv
import io
import json
import string
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kale_ray.core.kg import (
    MAX_LINE_BYTES,
    GraphIndex,
    KGFormatError,
    KnowledgeGraph,
    builtin_kg_files,
    kg_from_networkx,
    load_kg,
    read_names,
    read_triples,
)
from kale_ray.core.rejects import Rejects

GOOD = [("alga", "isa", "plant"), ("plant", "isa", "organism"), ("alga", "lives_in", "water")]


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


# --------------------------------------------------------------------------- #
# Formats
# --------------------------------------------------------------------------- #
def test_read_tsv(tmp_path):
    p = _write(tmp_path / "kg.tsv", "# a comment\n\nalga\tisa\tplant\r\n plant \t isa\torganism\nalga\tlives_in\twater\n")
    assert list(read_triples(p)) == GOOD


def test_read_txt_is_tsv(tmp_path):
    p = _write(tmp_path / "kg.txt", "".join("\t".join(t) + "\n" for t in GOOD))
    assert list(read_triples(p)) == GOOD


def test_read_csv_with_header_and_quotes(tmp_path):
    p = _write(tmp_path / "kg.csv", 'head,relation,tail\nalga,isa,plant\nplant,isa,organism\n"alga","lives_in","water"\n'
               '"x, y",rel,"say ""hi"""\n')
    assert list(read_triples(p)) == GOOD + [("x, y", "rel", 'say "hi"')]


def test_csv_header_only_on_first_line(tmp_path):
    # a "head,relation,tail" row that is not the first line is data
    p = _write(tmp_path / "kg.csv", "alga,isa,plant\nhead,relation,tail\n")
    assert list(read_triples(p)) == [("alga", "isa", "plant"), ("head", "relation", "tail")]


def test_read_jsonl_all_shapes(tmp_path):
    lines = [
        json.dumps({"head": "alga", "relation": "isa", "tail": "plant"}),
        json.dumps({"h": "plant", "r": "isa", "t": "organism"}),
        json.dumps(["alga", "lives_in", "water"]),
        json.dumps({"subject": "s", "predicate": "p", "object": "o"}),
    ]
    p = _write(tmp_path / "kg.jsonl", "\n".join(lines) + "\n")
    assert list(read_triples(p)) == GOOD + [("s", "p", "o")]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_triples(tmp_path / "nope.tsv"))


# --------------------------------------------------------------------------- #
# Malformed lines: error names file:line; skip counts by reason
# --------------------------------------------------------------------------- #
BAD_CASES = [
    # (file name, content bytes, bad line number, reject reason)
    ("two_cols.tsv", b"alga\tisa\tplant\nalga\tisa\nplant\tisa\torganism\n", 2, "malformed_triple"),
    ("four_cols.tsv", b"alga\tisa\tplant\nplant\tisa\torganism\textra\n", 2, "malformed_triple"),
    ("empty_field.tsv", b"alga\tisa\tplant\n\n# c\nalga\t\tplant\n", 4, "malformed_triple"),
    ("blank_field.csv", b"alga,isa,plant\nalga, ,plant\n", 2, "malformed_triple"),
    ("two_cols.csv", b"alga,isa,plant\nplant,organism\n", 2, "malformed_triple"),
    ("bad_utf8.tsv", b"alga\tisa\tplant\nal\xffga\tisa\tplant\n", 2, "bad_encoding"),
    ("long_line.tsv", b"alga\tisa\tplant\nplant\tisa\torganism\n" + b"x" * (MAX_LINE_BYTES + 10) + b"\tisa\tplant\n", 3, "line_too_long"),
    ("bad_json.jsonl", b'{"head": "alga", "relation": "isa", "tail": "plant"}\n{"head": "alga", \n', 2, "malformed_triple"),
    ("wrong_keys.jsonl", b'["alga", "isa", "plant"]\n{"from": "a", "to": "b"}\n', 2, "malformed_triple"),
    ("scalar.jsonl", b'["alga", "isa", "plant"]\n"alga isa plant"\n', 2, "malformed_triple"),
    ("null_field.jsonl", b'["alga", "isa", "plant"]\n["alga", null, "plant"]\n', 2, "malformed_triple"),
    ("bare_cr.csv", b"alga,isa,plant\nal\rga,isa,plant\n", 2, "malformed_triple"),
]


@pytest.mark.parametrize("name,content,lineno,reason", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_malformed_line_raises_with_file_and_line(tmp_path, name, content, lineno, reason):
    p = _write(tmp_path / name, content)
    with pytest.raises(KGFormatError) as ei:
        list(read_triples(p))
    msg = str(ei.value)
    assert name in msg
    assert f"{name}:{lineno}:" in msg


@pytest.mark.parametrize("name,content,lineno,reason", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_malformed_line_skipped_and_counted(tmp_path, name, content, lineno, reason):
    p = _write(tmp_path / name, content)
    rejects = Rejects()
    got = list(read_triples(p, on_error="skip", rejects=rejects))
    assert rejects.counts() == {reason: 1}
    (row,) = rejects.rows
    assert row["line"] == lineno and row["file"] == str(p)
    # the good lines are all loaded
    assert got and ("alga", "isa", "plant") in got
    assert len(rejects.rows[0]["text"]) <= 200


def test_load_kg_raises_with_file_and_line(tmp_path):
    p = _write(tmp_path / "mykg.tsv", "a\tr\tb\nb\tr\nc\tr\td\n")
    with pytest.raises(KGFormatError, match=r"mykg\.tsv:2:"):
        load_kg(str(p))


def test_load_kg_skip_counts_by_reason(tmp_path):
    p = _write(
        tmp_path / "mykg.tsv",
        b"a\tr\tb\n"
        b"b\tr\n"  # malformed
        b"a\tr\tb\n"  # duplicate
        b"\xfe\xfe\tr\tc\n"  # bad utf-8
        b"b\ts\tc\n"
        b"b\t\tc\n"  # empty relation
        b"b\ts\tc\n",  # duplicate
    )
    kg = load_kg(str(p), on_error="skip")
    assert kg.rejects.counts() == {"malformed_triple": 2, "duplicate_triple": 2, "bad_encoding": 1}
    assert len(kg.triples) == 2
    assert kg.has_named_triple("a", "r", "b") and kg.has_named_triple("b", "s", "c")
    assert kg.summary()["rejected_lines"] == kg.rejects.counts()
    lines = sorted(r["line"] for r in kg.rejects.rows if "line" in r)
    assert lines == [2, 4, 6]


def test_duplicate_triples_counted(tmp_path):
    p = _write(tmp_path / "dup.tsv", "a\tr\tb\na\tr\tb\na\tr\tb\nb\tr\ta\n")
    kg = load_kg(str(p))  # duplicates are not a format error
    assert kg.rejects.counts() == {"duplicate_triple": 2}
    assert kg.triples.shape == (2, 3)
    assert len({tuple(t) for t in kg.triples.tolist()}) == 2


def test_load_kg_nothing_valid(tmp_path):
    p = _write(tmp_path / "junk.tsv", "x\ny\n")
    with pytest.raises(KGFormatError, match="no valid triples"):
        load_kg(str(p), on_error="skip")


def test_load_kg_directory(tmp_path):
    d = tmp_path / "kgdir"
    d.mkdir()
    _write(d / "a.tsv", "a\tr\tb\n")
    _write(d / "b.csv", "b,r,c\n")
    _write(d / "c.jsonl", '["c","r","d"]\n')
    _write(d / "readme.md", "not\ta\ttriple file\n")
    kg = load_kg(str(d))
    assert sorted(kg.entities) == ["a", "b", "c", "d"]
    assert len(kg.triples) == 3


def test_triples_are_consistent_ids(tmp_path):
    p = _write(tmp_path / "kg.tsv", "".join("\t".join(t) + "\n" for t in GOOD))
    kg = load_kg(str(p))
    named = {(kg.entities[h], kg.relations[r], kg.entities[t]) for h, r, t in kg.triples.tolist()}
    assert named == set(GOOD)
    assert kg.triples.dtype == np.int64
    assert kg.entity_name("lives_in") == "lives in"  # default name: underscores as spaces
    assert kg.verbalize(kg.entity_index["alga"], kg.relation_index["lives_in"], kg.entity_index["water"]) == "alga lives in water"


# --------------------------------------------------------------------------- #
# Names and aliases
# --------------------------------------------------------------------------- #
def test_names_tsv_with_aliases(tmp_path):
    kgp = _write(tmp_path / "kg.tsv", "C001\tisa\tC002\n")
    names = _write(tmp_path / "names.tsv", "C001\tAlga\talgae\t seaweed \nC002\tPlant\n\n# comment\nC002\tPlant\tflora\n")
    kg = load_kg(str(kgp), names=str(names))
    assert kg.entity_name("C001") == "Alga"
    assert kg.entity_name(kg.entity_index["C002"]) == "Plant"
    assert kg.aliases["C001"] == ["algae", "seaweed"]
    assert kg.aliases["C002"] == ["flora"]
    assert kg.verbalize(0, 0, 1) == "Alga isa Plant"


def test_names_jsonl(tmp_path):
    p = _write(tmp_path / "names.jsonl", json.dumps({"id": "C1", "name": "Alga", "aliases": ["algae"]}) + "\n"
               + json.dumps({"id": "C2", "name": "Plant"}) + "\n")
    names, aliases = read_names(p)
    assert names == {"C1": "Alga", "C2": "Plant"}
    assert aliases == {"C1": ["algae"]}


def test_names_bad_line_file_and_line(tmp_path):
    p = _write(tmp_path / "names.tsv", "C1\tAlga\nC2\n")
    with pytest.raises(KGFormatError, match=r"names\.tsv:2:"):
        read_names(p)
    rej = Rejects()
    names, _ = read_names(p, on_error="skip", rejects=rej)
    assert names == {"C1": "Alga"}
    assert rej.counts() == {"malformed_name": 1} and rej.rows[0]["line"] == 2


def test_names_bad_jsonl_line(tmp_path):
    p = _write(tmp_path / "names.jsonl", '{"id": "C1", "name": "A"}\n{"id": "C2"}\n{oops\n')
    rej = Rejects()
    names, _ = read_names(p, on_error="skip", rejects=rej)
    assert names == {"C1": "A"}
    assert rej.counts() == {"malformed_name": 2}
    assert [r["line"] for r in rej.rows] == [2, 3]


# --------------------------------------------------------------------------- #
# Builtin KGs (pykeen wheel data files)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name,ents,rels,triples", [("umls", 135, 46, 6529), ("nations", 14, 55, 1992)])
def test_builtin_kg_sizes(name, ents, rels, triples):
    kg = load_kg(f"builtin:{name}")
    assert kg.num_entities == ents
    assert kg.num_relations == rels
    assert len(kg.triples) == triples
    assert kg.rejects.total() == 0
    # independently: count distinct lines of the wheel's files
    rows = set()
    for f in builtin_kg_files(name):
        for line in f.read_text().splitlines():
            if line.strip():
                rows.add(tuple(x.strip() for x in line.split("\t")))
    assert len(rows) == triples
    assert len({h for h, _, _ in rows} | {t for _, _, t in rows}) == ents
    assert len({r for _, r, _ in rows}) == rels


def test_builtin_unknown():
    with pytest.raises(ValueError, match="unknown builtin"):
        load_kg("builtin:freebase")


def test_builtin_umls_has_known_fact(umls_kg):
    assert umls_kg.has_named_triple("alga", "isa", "plant") or umls_kg.has_named_triple("alga", "isa", "organism")


# --------------------------------------------------------------------------- #
# GraphIndex (CSR)
# --------------------------------------------------------------------------- #
def _src_of_edges(index: GraphIndex) -> np.ndarray:
    return np.repeat(np.arange(index.num_nodes), np.diff(index.indptr))


@pytest.mark.parametrize("undirected", [True, False])
def test_graph_index_edges_map_to_triples(umls_kg, undirected):
    kg = umls_kg
    idx = GraphIndex.from_kg(kg, undirected=undirected)
    T = kg.triples
    n = len(T)
    assert idx.indptr[0] == 0 and idx.indptr[-1] == idx.num_edges
    assert np.all(np.diff(idx.indptr) >= 0)
    assert idx.num_edges == (2 * n if undirected else n)
    src = _src_of_edges(idx)
    fwd = ~idx.inv
    # every forward edge is its triple: src=head, nbr=tail, rel=relation
    assert np.array_equal(src[fwd], T[idx.tid[fwd], 0])
    assert np.array_equal(idx.nbr[fwd], T[idx.tid[fwd], 2])
    assert np.array_equal(idx.rel[fwd], T[idx.tid[fwd], 1])
    # each triple appears exactly once as a forward edge
    assert sorted(idx.tid[fwd].tolist()) == list(range(n))
    if undirected:
        bwd = idx.inv
        assert np.array_equal(src[bwd], T[idx.tid[bwd], 2])
        assert np.array_equal(idx.nbr[bwd], T[idx.tid[bwd], 0])
        assert np.array_equal(idx.rel[bwd], T[idx.tid[bwd], 1])
        assert sorted(idx.tid[bwd].tolist()) == list(range(n))
        # degree sum equals twice the number of triples
        assert int(np.diff(idx.indptr).sum()) == 2 * n
        deg = np.diff(idx.indptr)
        expect = np.bincount(T[:, 0], minlength=kg.num_entities) + np.bincount(T[:, 2], minlength=kg.num_entities)
        assert np.array_equal(deg, expect)
    else:
        assert not idx.inv.any()
        assert np.array_equal(np.diff(idx.indptr), np.bincount(T[:, 0], minlength=kg.num_entities))


def test_graph_index_neighbors_small():
    kg = KnowledgeGraph.from_named_triples([("a", "r", "b"), ("b", "s", "c"), ("a", "s", "c")])
    idx = GraphIndex.from_kg(kg)
    a, b, c = (kg.entity_index[x] for x in "abc")
    assert sorted(idx.neighbors(a).tolist()) == sorted([b, c])
    assert sorted(idx.neighbors(b).tolist()) == sorted([a, c])
    assert sorted(idx.neighbors(c).tolist()) == sorted([a, b])
    for e in idx.edges(c):
        assert idx.inv[e]  # c is only ever a tail
    d = GraphIndex.from_kg(kg, undirected=False)
    assert d.neighbors(c).tolist() == []


def test_graph_index_isolated_nodes():
    idx = GraphIndex.build(np.array([[0, 0, 1]]), num_nodes=4)
    assert idx.indptr.tolist() == [0, 1, 2, 2, 2]
    assert idx.neighbors(3).tolist() == []


def test_to_networkx_edge_count(umls_kg):
    idx = GraphIndex.from_kg(umls_kg)
    g = idx.to_networkx(umls_kg)
    assert g.number_of_nodes() == umls_kg.num_entities
    assert g.number_of_edges() == len(umls_kg.triples)  # forward triples only, parallel edges kept
    for u, v, key, data in list(g.edges(keys=True, data=True))[:500]:
        assert tuple(umls_kg.triples[key]) == (u, data["relation"], v)


def test_kg_from_networkx_roundtrip():
    nx = pytest.importorskip("networkx")
    g = nx.MultiDiGraph()
    g.add_edge("a", "b", relation="r")
    g.add_edge("a", "b", relation="s")
    g.add_edge("b", "c")
    kg = kg_from_networkx(g)
    assert kg.has_named_triple("a", "r", "b") and kg.has_named_triple("a", "s", "b")
    assert kg.has_named_triple("b", "related_to", "c")
    assert len(kg.triples) == 3


# --------------------------------------------------------------------------- #
# Property tests: no line is ever lost silently
# --------------------------------------------------------------------------- #
# printable text with the separators and quotes that break naive parsers
_ALPHABET = string.ascii_letters + string.digits + " \t,\"'#_-.:;{}[]\\\r" + "éß中"
_field = st.text(alphabet=_ALPHABET, max_size=12)
_raw_line = st.one_of(
    st.text(alphabet=_ALPHABET, max_size=40),  # anything
    st.lists(_field, min_size=1, max_size=5).map("\t".join),  # tab-joined columns
    st.lists(_field, min_size=1, max_size=5).map(",".join),  # comma-joined columns
    st.just(""),
    st.just("   "),
    st.just("# comment"),
)


def _skipped(text: str) -> bool:
    """Blank or comment line (the reader's documented skip rule)."""
    return not text.strip() or text.lstrip().startswith("#")


_CONTROL = set(chr(c) for c in [*range(0x20), *range(0x7F, 0xA0), 0xFEFF])
_HEADERS = {("head", "relation", "tail"), ("h", "r", "t"), ("subject", "predicate", "object")}


def _expected_tsv(text: str):
    parts = [p.strip() for p in text.split("\t")]  # a control character left inside a field: rejected
    if len(parts) == 3 and all(parts) and not any(set(p) & _CONTROL for p in parts):
        return tuple(parts)
    return None


def _tsv_header(lines: list[str]) -> int:
    """Line number of a header row on the first data line (0 if none): skipped, kept as a header_row reject."""
    for i, l in enumerate(lines):
        if not _skipped(l.rstrip("\r")):
            return i + 1 if tuple(p.strip().lower() for p in l.rstrip("\r").split("\t")) in _HEADERS else 0
    return 0


def _check_accounting(path: Path, lines: list[str], on_error="skip"):
    rej = Rejects()
    got = list(read_triples(path, on_error=on_error, rejects=rej))
    rejected_lines = [r["line"] for r in rej.rows]
    assert len(rejected_lines) == len(set(rejected_lines)), "a line was rejected twice"
    assert all(1 <= n <= len(lines) for n in rejected_lines)
    skipped = [i + 1 for i, t in enumerate(lines) if _skipped(t.rstrip("\r"))]
    assert not set(skipped) & set(rejected_lines)
    return got, rejected_lines, skipped


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_raw_line, max_size=25))
def test_property_tsv_never_loses_a_line(tmp_path, lines):
    p = tmp_path / "prop.tsv"
    p.write_bytes(("".join(l + "\n" for l in lines)).encode("utf-8"))
    got, rejected, skipped = _check_accounting(p, lines)
    assert len(got) + len(rejected) + len(skipped) == len(lines)
    # exactly the well-formed 3-column rows are yielded, in order (a first-line header is a reject)
    header = _tsv_header(lines)
    expected = [_expected_tsv(l.rstrip("\r")) for i, l in enumerate(lines) if i + 1 not in skipped and i + 1 != header]
    assert got == [e for e in expected if e is not None]
    bad_lines = [i + 1 for i, l in enumerate(lines)
                 if i + 1 not in skipped and (i + 1 == header or _expected_tsv(l.rstrip("\r")) is None)]
    assert sorted(rejected) == bad_lines


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_raw_line, max_size=25))
@example(lines=["a,b\rc,d", "a,b,c"])
@example(lines=['"a', 'x,"y"z,w'])
def test_property_csv_never_loses_a_line(tmp_path, lines):
    p = tmp_path / "prop.csv"
    p.write_bytes(("".join(l + "\n" for l in lines)).encode("utf-8"))
    got, rejected, skipped = _check_accounting(p, lines)
    assert len(got) + len(rejected) + len(skipped) == len(lines)  # a header row is a header_row reject
    assert all(len(t) == 3 and all(x and x == x.strip() and not set(x) & _CONTROL for x in t) for t in got)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(_field, _field, _field), max_size=20))
def test_property_csv_written_rows_roundtrip(tmp_path, rows):
    """Rows written by a CSV writer come back exactly when well-formed; otherwise rejected."""
    rows = [tuple(x.replace("\r", "") for x in r) for r in rows]  # the writer would not quote a bare CR per line
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerows(rows)
    text = buf.getvalue()
    p = tmp_path / "rows.csv"
    p.write_bytes(text.encode("utf-8"))
    lines = text.split("\n")[:-1] if text else []
    assert len(lines) == len(rows)
    got, rejected, skipped = _check_accounting(p, lines)
    assert len(got) + len(rejected) + len(skipped) == len(lines)  # a header row is a header_row reject
    first = next((i for i in range(len(rows)) if i + 1 not in skipped), None)
    expected = []
    for i, r in enumerate(rows):
        stripped = tuple(x.strip() for x in r)
        if i + 1 in skipped or (i == first and tuple(x.lower() for x in stripped) in _HEADERS):
            assert i + 1 in skipped or i + 1 in rejected
            continue
        if all(stripped) and not any(set(x) & _CONTROL for x in stripped):
            expected.append(stripped)
        else:
            assert i + 1 in rejected
    assert got == expected


_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.text(alphabet=_ALPHABET, max_size=8))
_json_line = st.one_of(
    st.text(alphabet=_ALPHABET, max_size=30),  # mostly not JSON
    st.lists(_json_scalar, max_size=4).map(json.dumps),
    st.fixed_dictionaries({"head": _json_scalar, "relation": _json_scalar, "tail": _json_scalar}).map(json.dumps),
    st.dictionaries(st.sampled_from(["h", "r", "t", "x"]), _json_scalar).map(json.dumps),
    _json_scalar.map(json.dumps),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_json_line, max_size=25))
def test_property_jsonl_never_loses_a_line(tmp_path, lines):
    lines = [l.replace("\n", " ") for l in lines]
    p = tmp_path / "prop.jsonl"
    p.write_bytes(("".join(l + "\n" for l in lines)).encode("utf-8"))
    got, rejected, skipped = _check_accounting(p, lines)
    assert len(got) + len(rejected) + len(skipped) == len(lines)
    assert all(len(t) == 3 and all(x and x == x.strip() for x in t) for t in got)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_raw_line, min_size=1, max_size=15))
def test_property_error_mode_names_first_bad_line(tmp_path, lines):
    p = tmp_path / "err.tsv"
    p.write_bytes(("".join(l + "\n" for l in lines)).encode("utf-8"))
    header = _tsv_header(lines)
    bad = [i + 1 for i, l in enumerate(lines)
           if not _skipped(l.rstrip("\r")) and i + 1 != header and _expected_tsv(l.rstrip("\r")) is None]
    if not bad:
        assert len(list(read_triples(p))) == sum(not _skipped(l.rstrip("\r")) for l in lines) - bool(header)
        return
    with pytest.raises(KGFormatError) as ei:
        list(read_triples(p))
    assert f"err.tsv:{bad[0]}:" in str(ei.value)


def test_rejects_counter_and_jsonl(tmp_path):
    r = Rejects(keep=1)
    r.add("a", line=1)
    r.add("a", line=2)
    r.add("b")
    assert r.counts() == {"a": 2, "b": 1} and len(r) == 3 and r.total() == 3
    assert len(r.rows) == 1  # keeps at most `keep` rows, still counts all
    out = tmp_path / "sub" / "rej.jsonl"
    r.write_jsonl(out)
    assert [json.loads(l) for l in out.read_text().splitlines()] == [{"reason": "a", "line": 1}]
    r2 = Rejects()
    r2.extend([{"reason": "x", "line": 3}])
    assert r2.counts() == {"x": 1} and r2.rows == [{"reason": "x", "line": 3}]
