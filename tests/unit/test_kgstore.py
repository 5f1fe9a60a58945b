"""Columnar KG artifact (kale_ray.core.kgstore): parity with load_kg/EntityLinker, sharing, cache, errors."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from kale_ray.core import kgstore
from kale_ray.core.kg import GraphIndex, KGFormatError, builtin_kg_files, load_kg
from kale_ray.core.kgstore import ColumnarKG, ColumnarLinker, build_columnar_kg, load_columnar_kg
from kale_ray.core.paths import path_to_named  # noqa: F401  (duck-typed consumer must import fine)
from kale_ray.core.qa import EntityLinker, generate_questions, link_example, relation_phrase

TRIPLES = [
    ("alga", "isa", "plant"),
    ("plant", "isa", "organism"),
    ("alga", "lives_in", "sea_water"),
    ("fish", "lives_in", "sea_water"),
    ("alga", "isa", "plant"),  # duplicate
    ("fish", "eats", "alga"),
]
NAMES = "alga\tGreen Alga\tseaweed\tpond scum\nfish\tFish\nsea_water\tSea water\tbrine\nghost\tNot in KG\n"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _tsv(rows) -> str:
    return "".join("\t".join(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def umls():
    return load_kg("builtin:umls")


@pytest.fixture(scope="module")
def umls_c(umls):
    return ColumnarKG.from_kg(umls)


def _same(c: ColumnarKG, kg) -> None:
    assert list(c.entities) == kg.entities
    assert c.relations == kg.relations
    assert np.array_equal(np.asarray(c.triples), kg.triples)
    assert dict(c.names.items()) == {k: v for k, v in kg.names.items() if k in kg.entity_index}
    assert {k: list(v) for k, v in c.aliases.items()} == {k: v for k, v in kg.aliases.items() if k in kg.entity_index and v}
    assert c.num_entities == kg.num_entities and c.num_relations == kg.num_relations
    for e in range(kg.num_entities):
        assert c.entity_name(e) == kg.entity_name(e)
        assert c.entity_name(kg.entities[e]) == kg.entity_name(kg.entities[e])
        assert c.entity_index[kg.entities[e]] == e


def test_umls_files_match_load_kg(tmp_path):
    d = tmp_path / "umls"
    d.mkdir()
    for f in builtin_kg_files("umls"):
        shutil.copy(f, d / f.name)
    kg = load_kg(str(d))
    c = build_columnar_kg(str(d))
    _same(c, kg)
    assert c.summary() == kg.summary()
    assert c.index().num_edges == GraphIndex.from_kg(kg).num_edges


def test_builtin_sources(umls):
    c = build_columnar_kg("builtin:umls")
    _same(c, umls)


def test_small_file_with_names_first_appearance(tmp_path):
    kgf = _write(tmp_path, "kg.tsv", _tsv(TRIPLES))
    nf = _write(tmp_path, "names.tsv", NAMES)
    kg = load_kg(str(kgf), names=str(nf))
    c = build_columnar_kg(str(kgf), names=str(nf))
    _same(c, kg)
    assert list(c.entities) == ["alga", "plant", "organism", "sea_water", "fish"]
    assert c.relations == ["isa", "lives_in", "eats"]
    assert c.rejects.counts() == {"duplicate_triple": 1} == kg.rejects.counts()
    assert c.entity_name("alga") == "Green Alga" and c.entity_name(2) == "organism"
    assert c.entity_name("not_there") == "not there"
    assert c.aliases.get("alga") == ["seaweed", "pond scum"] and c.aliases.get("plant", []) == []
    assert c.names.get("ghost") is None and "fish" in c.names
    assert c.verbalize(0, 0, 1) == kg.verbalize(0, 0, 1)
    assert relation_phrase(c, 1) == relation_phrase(kg, 1)


def test_membership(tmp_path, umls, umls_c):
    rng = np.random.default_rng(0)
    for h, r, t in umls.triples[rng.choice(len(umls.triples), 300, replace=False)]:
        assert umls_c.has_triple(h, r, t)
        assert umls_c.has_named_triple(umls.entities[h], umls.relations[r], umls.entities[t])
    fake = rng.integers(0, [umls.num_entities, umls.num_relations, umls.num_entities], size=(2000, 3))
    for h, r, t in fake:
        assert umls_c.has_triple(h, r, t) == umls.has_triple(h, r, t)
    assert not umls_c.has_named_triple("no_such_entity", umls.relations[0], umls.entities[0])
    assert not umls_c.has_named_triple(umls.entities[0], "no_such_rel", umls.entities[0])
    assert not umls_c.has_triple(-1, 0, 0) and not umls_c.has_triple(0, 10**6, 0)
    assert "no_such_entity" not in umls_c.entity_index
    with pytest.raises(KeyError):
        umls_c.entity_index["no_such_entity"]
    assert umls_c.entity_index.get("no_such_entity") is None
    h, r, t = map(int, umls.triples[0])
    assert t in set(umls_c.tails(h, r).tolist())


def test_hash_collisions_are_verified(monkeypatch, tmp_path):
    monkeypatch.setattr(kgstore, "_h64", lambda b: len(b) % 3)  # everything collides
    kgf = _write(tmp_path, "kg.tsv", _tsv(TRIPLES))
    nf = _write(tmp_path, "names.tsv", NAMES)
    kg = load_kg(str(kgf), names=str(nf))
    c = build_columnar_kg(str(kgf), names=str(nf))
    _same(c, kg)
    assert "algae" not in c.entity_index
    assert ColumnarLinker(c).link_mentions("does the seaweed eat fish in brine?") == \
        EntityLinker(kg).link_mentions("does the seaweed eat fish in brine?")


@pytest.mark.parametrize("source", ["builtin:umls", "builtin:nations"])
def test_linking_matches_entity_linker(source):
    kg = load_kg(source)
    c = ColumnarKG.from_kg(kg)
    lin, clin = EntityLinker(kg), ColumnarLinker(c)
    assert clin.max_len == lin.max_len
    examples = generate_questions(kg, 200, [1, 2, 3], seed=0)
    assert examples
    for ex in examples:
        q = ex.question
        assert clin.link_mentions(q) == lin.link_mentions(q)
        for a in ex.all_answers or [ex.answer]:
            assert clin.link_exact(a) == lin.link_exact(a)
    for e in kg.entities:
        for text in (e, kg.entity_name(e), e.upper(), "the " + kg.entity_name(e) + "!"):
            assert clin.link_exact(text) == lin.link_exact(text)
    assert clin.link_exact("zzz no such thing") == [] and clin.link_mentions("") == []


def test_link_example_duck_types(tmp_path):
    kgf = _write(tmp_path, "kg.tsv", _tsv(TRIPLES))
    nf = _write(tmp_path, "names.tsv", NAMES)
    kg, c = load_kg(str(kgf), names=str(nf)), build_columnar_kg(str(kgf), names=str(nf))
    from kale_ray.core.qa import QAExample

    for cls_kg, linker in ((kg, EntityLinker(kg)), (c, ColumnarLinker(c))):
        ex = QAExample(id="1", question="What does the Fish eat?", answer="pond scum")
        ex, why = link_example(ex, linker)
        assert why is None and ex.question_entities == ["fish"] and ex.answer_entities == ["alga"]


def test_to_arrays_from_arrays_no_copy(umls_c):
    meta, arrays = umls_c.to_arrays()
    c2 = ColumnarKG.from_arrays(meta, arrays)
    for k, v in arrays.items():
        assert np.shares_memory(c2.arrays[k], umls_c.arrays[k]) or v.nbytes == 0
    assert np.shares_memory(c2.triples, umls_c.triples)
    idx = c2.index()
    assert np.shares_memory(idx.nbr, arrays["gi_nbr"])
    assert umls_c.nbytes() == sum(a.nbytes for a in arrays.values()) > 0
    assert list(c2.entities) == list(umls_c.entities)


def test_save_open_round_trip(tmp_path, umls, umls_c):
    umls_c.save(tmp_path / "art")
    c = ColumnarKG.open(tmp_path / "art")
    t = c.arrays["triples"]  # a plain ndarray view of the file map (not np.memmap: its slicing is slow)
    assert type(t) is np.ndarray and isinstance(t.base, np.memmap) and not t.flags.writeable
    assert c.path == str(tmp_path / "art")
    _same(c, umls)
    ref = GraphIndex.from_kg(umls)
    idx = c.index(undirected=True)
    for k in ("indptr", "nbr", "rel", "tid", "inv"):
        assert np.array_equal(getattr(idx, k), getattr(ref, k))
    d = c.index(undirected=False)
    assert d.num_edges == len(umls.triples)
    assert c.summary() == umls_c.summary()


def test_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    kgf = _write(tmp_path, "kg.tsv", _tsv(TRIPLES))
    cache = tmp_path / "cache"
    c1 = load_columnar_kg(str(kgf), cache_dir=cache)
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and not [p for p in cache.iterdir() if p.name.startswith(".")]
    calls = []
    real = kgstore.build_columnar_kg
    monkeypatch.setattr(kgstore, "build_columnar_kg", lambda *a, **k: calls.append(1) or real(*a, **k))
    c2 = load_columnar_kg(str(kgf), cache_dir=cache)
    assert calls == [] and isinstance(c2.arrays["triples"].base, np.memmap) and c2.path == str(entries[0])
    assert c2.rejects.counts() == c1.rejects.counts() == {"duplicate_triple": 1}
    assert list(c2.entities) == list(c1.entities)
    # options are part of the key
    load_columnar_kg(str(kgf), cache_dir=cache, undirected=False)
    assert calls == [1]
    # a changed file gives a new key and a rebuild
    kgf.write_text(_tsv(TRIPLES + [("fish", "isa", "animal")]))
    st = kgf.stat()
    os.utime(kgf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    c3 = load_columnar_kg(str(kgf), cache_dir=cache)
    assert calls == [1, 1] and "animal" in c3.entity_index
    assert len([p for p in cache.iterdir()]) == 3


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("KALE_RAY_CACHE", str(tmp_path))
    assert kgstore.default_cache_dir() == tmp_path / "kg"
    monkeypatch.delenv("KALE_RAY_CACHE")
    assert kgstore.default_cache_dir() == Path.home() / ".cache" / "kale_ray" / "kg"


BAD_LINES = [
    ("a\tr\tb\nc\tr\n", 2, "expected 3 columns"),
    ("a\tr\tb\nc\t\td\n", 2, "empty relation"),
    ("a\tr\tb\nx\ty\tz\n" + "c\tr\t" + "d" * (1 << 20) + "\n", 3, "longer than"),
]


@pytest.mark.parametrize("text,line,msg", BAD_LINES)
def test_error_names_file_and_line(tmp_path, text, line, msg):
    kgf = _write(tmp_path, "kg.tsv", text)
    with pytest.raises(KGFormatError) as ei:
        build_columnar_kg(str(kgf))
    assert f"{kgf}:{line}:" in str(ei.value) and msg in str(ei.value)
    with pytest.raises(KGFormatError) as ref:
        load_kg(str(kgf))
    assert str(ei.value) == str(ref.value)


def test_bad_utf8_and_skip_counts(tmp_path):
    kgf = tmp_path / "kg.tsv"
    kgf.write_bytes(b"a\tr\tb\nc\xff\tr\td\ne\tr\n# comment\n\nb\tr\tc\na\tr\tb\n")
    with pytest.raises(KGFormatError, match=rf"{kgf}:2: not valid UTF-8"):
        build_columnar_kg(str(kgf))
    c = build_columnar_kg(str(kgf), on_error="skip")
    kg = load_kg(str(kgf), on_error="skip")
    _same(c, kg)
    assert c.rejects.counts() == kg.rejects.counts() == {"bad_encoding": 1, "malformed_triple": 1, "duplicate_triple": 1}
    lines = sorted(r["line"] for r in c.rejects.rows if "line" in r)
    assert lines == [2, 3] and all(r["file"] == str(kgf) for r in c.rejects.rows if "line" in r)
    assert c.summary() == kg.summary()


def test_fast_path_taken_and_fallbacks(tmp_path):
    clean = _write(tmp_path, "clean.tsv", _tsv(TRIPLES))
    assert kgstore._fast_read(clean) is not None
    for name, text in [
        ("comment.tsv", "# c\n" + _tsv(TRIPLES)),
        ("space.tsv", " a\tr\tb\n"),
        ("cr.tsv", "a\tr\tb\rc\tr\td\n"),
        ("quote.csv", '"a,b",r,c\n'),
        ("x.jsonl", '["a","r","b"]\n'),
    ]:
        assert kgstore._fast_read(_write(tmp_path, name, text)) is None, name
    crlf = _write(tmp_path, "crlf.tsv", _tsv(TRIPLES).replace("\n", "\r\n"))
    assert kgstore._fast_read(crlf) is not None
    _same(build_columnar_kg(str(crlf)), load_kg(str(crlf)))


def test_folder_of_mixed_formats(tmp_path):
    d = tmp_path / "kg"
    d.mkdir()
    _write(d, "a.csv", "head,relation,tail\nalga,isa,plant\nplant,isa,organism\n")
    _write(d, "b.tsv", "# comment\n  alga\tlives_in\tsea_water \n")
    _write(d, "c.jsonl", '{"head": "fish", "relation": "eats", "tail": "alga"}\n["alga","isa","plant"]\n')
    _write(d, "ignored.md", "not a kg\n")
    kg, c = load_kg(str(d)), build_columnar_kg(str(d))
    _same(c, kg)
    assert c.summary() == kg.summary()
    with pytest.raises(FileNotFoundError):
        build_columnar_kg(str(tmp_path / "missing.tsv"))


def test_no_valid_triples(tmp_path):
    kgf = _write(tmp_path, "kg.tsv", "a\tb\n")
    with pytest.raises(KGFormatError, match="no valid triples"):
        build_columnar_kg(str(kgf), on_error="skip")


def test_fast_normalize_matches_qa_normalize():
    from kale_ray.core.qa import normalize

    texts = ["The_Alga-of  a Pond!", "Café au lait", "naïve ÉCOLE", "x\ty\nz", "an apple", "a", "", "__--",
             "Größe", "ﬁne", "α-helix", "C3H8O", "it's the end.", "\u00a0nbsp\u2009thin"]
    for t in texts:
        assert kgstore._norm(t) == normalize(t), t


def test_unicode_names_link_like_entity_linker(tmp_path):
    kgf = _write(tmp_path, "kg.tsv", "café_1\tnear\tÉcole_Normale\nÉcole_Normale\tin\tparis\n")
    nf = _write(tmp_path, "names.tsv", "café_1\tCafé de Flore\tLe Flore\nparis\tParis\tla Ville Lumière\n")
    kg, c = load_kg(str(kgf), names=str(nf)), build_columnar_kg(str(kgf), names=str(nf))
    _same(c, kg)
    lin, clin = EntityLinker(kg), ColumnarLinker(c)
    for q in ["Is the cafe de flore near the ecole normale?", "la ville lumiere", "ÉCOLE NORMALE in Paris", "le flore"]:
        assert clin.link_mentions(q) == lin.link_mentions(q)
        assert clin.link_exact(q) == lin.link_exact(q)


def test_out_of_band_pickle_shares_buffers(umls_c):
    """What ray.put/ray.get do: protocol-5 out-of-band buffers, arrays rebuilt over them without a copy."""
    import pickle

    bufs = []
    blob = pickle.dumps(umls_c.to_arrays(), protocol=5, buffer_callback=bufs.append)
    assert len(blob) < 64 * 1024  # the arrays travel out of band, only meta in the pickle
    raw = [memoryview(b.raw()) for b in bufs]
    meta, arrays = pickle.loads(blob, buffers=raw)
    c = ColumnarKG.from_arrays(meta, arrays)
    backing = [np.frombuffer(r, dtype=np.uint8) for r in raw]
    assert any(np.shares_memory(c.triples, b) for b in backing)
    assert c.has_named_triple(*[umls_c.entities[int(umls_c.triples[5, 0])], umls_c.relations[int(umls_c.triples[5, 1])],
                                umls_c.entities[int(umls_c.triples[5, 2])]])
    assert c.summary() == umls_c.summary()


def _search_views(prep):
    csrs = [prep.multi] + ([prep.simple] if prep.simple is not prep.multi else [])
    return [getattr(c, f) for c in csrs for f in ("indptr", "nbr", "eid", "tid", "deg", "deg2")] + [
        prep.simple_key, prep.entry_relations(None), prep.entry_forward(None)]


def test_search_arrays_shared_zero_copy(umls_c, umls):
    """Workers wrap the artifact's path-search arrays (ps_*): nothing per worker, same paths."""
    import pickle

    from kale_ray.core import paths

    assert kgstore.FORMAT_VERSION >= 2
    assert all(k in umls_c.arrays for k in paths.REQUIRED_SEARCH_ARRAYS + ("ps_entry_rel", "ps_entry_fwd"))
    bufs = []
    blob = pickle.dumps(umls_c.to_arrays(), protocol=5, buffer_callback=bufs.append)
    raw = [memoryview(b.raw()) for b in bufs]
    meta, arrays = pickle.loads(blob, buffers=raw)
    c = ColumnarKG.from_arrays(meta, arrays)
    idx = c.index()
    prep = paths._prepared(idx)[0]
    backing = [np.frombuffer(r, dtype=np.uint8) for r in raw]
    for v in _search_views(prep):
        assert v.size == 0 or any(np.shares_memory(v, b) for b in backing)
    assert isinstance(prep.multi.ipl, memoryview)  # no per-process list of |V| ints
    # identical results to a process-built _Prepared on a fresh index
    ref = GraphIndex.from_kg(umls)
    rw = np.zeros(c.num_relations)
    rw[:3] = 1.0
    for heur in ("bidirectional", "target"):
        params = paths.PathSearchParams(max_hops=3, k=4, heuristic=heur)
        for s, t in [(0, 5), (3, 40), (10, 90), (7, 7)]:
            for w in (None, rw):
                a = paths.find_paths(idx, c.triples, s, t, params, np.random.default_rng(1), relation_weights=w)
                b = paths.find_paths(ref, umls.triples, s, t, params, np.random.default_rng(1), relation_weights=w)
                assert [(p.nodes, p.hops, p.method) for p in a] == [(p.nodes, p.hops, p.method) for p in b]


def test_search_arrays_saved_and_mmapped(tmp_path, umls_c):
    from kale_ray.core import paths

    umls_c.save(tmp_path / "art")
    c = ColumnarKG.open(tmp_path / "art")
    prep = paths._prepared(c.index())[0]
    for v in _search_views(prep):
        assert v.size == 0 or isinstance(v, np.memmap) or isinstance(v.base, np.memmap)
