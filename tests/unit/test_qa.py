"""Questions (kale_ray.core.qa): normalisation, linking, generation, the split, QA JSONL files."""
from __future__ import annotations

import json
import string
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kale_ray.core.kg import KnowledgeGraph
from kale_ray.core.qa import (
    EntityLinker,
    QAExample,
    QAFormatError,
    generate_questions,
    link_example,
    normalize,
    read_qa_jsonl,
    split_questions,
    write_qa_jsonl,
)
from kale_ray.core.rejects import Rejects


# --------------------------------------------------------------------------- #
# normalize
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "text,expected",
    [
        ("Cell Function", "cell function"),
        ("cell_function", "cell function"),
        ("CELL-FUNCTION", "cell function"),
        ("  cell   function!  ", "cell function"),
        ("The cell's function?", "cell s function"),
        ("a cell, an organ and the body", "cell organ and body"),
        ("Café crème", "cafe creme"),
        ("Ångström naïve", "angstrom naive"),
        ("theory of anatomy", "theory of anatomy"),  # articles only as whole words
        ("A", ""),
        ("", ""),
        ("x.y;z", "x y z"),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_normalize_idempotent():
    for t in ["The Cell_Function!", "Café-au-lait", "an apple a day"]:
        assert normalize(normalize(t)) == normalize(t)


# --------------------------------------------------------------------------- #
# EntityLinker
# --------------------------------------------------------------------------- #
@pytest.fixture()
def small_kg():
    kg = KnowledgeGraph.from_named_triples(
        [("cell", "part_of", "organism"), ("cell_function", "process_of", "cell"), ("C9", "isa", "organism")],
        names={"C9": "Plant"},
        aliases={"C9": ["flora", "green plant"]},
    )
    return kg


def test_link_exact(small_kg):
    lk = EntityLinker(small_kg)
    assert lk.link_exact("Cell Function") == ["cell_function"]
    assert lk.link_exact("cell_function") == ["cell_function"]
    assert lk.link_exact("the cell") == ["cell"]
    assert lk.link_exact("plant") == ["C9"]  # display name
    assert lk.link_exact("C9") == ["C9"]  # id
    assert lk.link_exact("Flora") == ["C9"]  # alias
    assert lk.link_exact("cells") == []
    assert lk.link_exact("function") == []


def test_link_mentions_longest_match_wins(small_kg):
    lk = EntityLinker(small_kg)
    assert lk.link_mentions("What does the cell function affect?") == ["cell_function"]
    assert lk.link_mentions("Is a cell part of an organism?") == ["cell", "organism"]
    assert lk.link_mentions("Which green plant ...") == ["C9"]  # multi-word alias
    assert lk.link_mentions("cell function and cell") == ["cell_function", "cell"]
    assert lk.link_mentions("nothing here") == []


def test_link_example_reasons(small_kg):
    lk = EntityLinker(small_kg)
    ex, reason = link_example(QAExample(id="1", question="What is a cell part of?", answer="organism"), lk)
    assert reason is None and ex.question_entities == ["cell"] and ex.answer_entities == ["organism"]
    ex, reason = link_example(QAExample(id="2", question="What is a cell part of?", answer="spaceship"), lk)
    assert reason == "answer_not_linked"
    ex, reason = link_example(QAExample(id="3", question="What is this?", answer="organism"), lk)
    assert reason == "question_not_linked"
    # given entities are kept when they exist; unknown ones are replaced by linking
    ex, reason = link_example(QAExample(id="4", question="cell?", answer="x", question_entities=["C9"],
                                        answer_entities=["nope", "organism"]), lk)
    assert reason is None and ex.question_entities == ["C9"] and ex.answer_entities == ["organism"]
    # every accepted answer is linked
    ex, _ = link_example(QAExample(id="5", question="cell?", answer="organism", all_answers=["organism", "flora"]), lk)
    assert ex.answer_entities == ["organism", "C9"]


# --------------------------------------------------------------------------- #
# generate_questions (on builtin UMLS)
# --------------------------------------------------------------------------- #
def _tails(kg):
    """(head, relation) -> tails, computed from the raw triples (independent of qa._ForwardIndex)."""
    out = defaultdict(set)
    for h, r, t in kg.triples.tolist():
        out[(kg.entities[h], kg.relations[r])].add(kg.entities[t])
    return out


def _reach(tails, start, rels):
    frontier = {start}
    for r in rels:
        frontier = {t for e in frontier for t in tails.get((e, r), ())}
    return frontier


def test_generate_basic_shape(umls_kg, umls_questions):
    qs = umls_questions
    assert len(qs) == 120
    assert len({q.id for q in qs}) == len(qs)
    assert {q.num_hops for q in qs} == {1, 2, 3}
    for q in qs:
        assert len(q.hops) == q.num_hops
        assert q.question_entities == [q.hops[0][0]]
        assert q.answer_entities == [q.hops[-1][2]]
        assert q.answer == umls_kg.entity_name(q.hops[-1][2])
        assert umls_kg.entity_name(q.hops[0][0]) in q.question
        assert q.question.startswith("Which concept X satisfies:") and q.question.endswith("?")


def test_generated_answers_are_exactly_the_reachable_set(umls_kg, umls_questions):
    kg = umls_kg
    tails = _tails(kg)
    for q in umls_questions:
        start = q.question_entities[0]
        rels = [r for _, r, _ in q.hops]
        reach = _reach(tails, start, rels)
        assert q.answer in q.all_answers
        assert sorted(kg.entity_name(e) for e in reach) == sorted(q.all_answers)
        assert 1 <= len(q.all_answers) <= 3  # max_answers
        assert start not in reach


def test_generated_hops_are_kg_triples_and_chain(umls_kg, umls_questions):
    for q in umls_questions:
        for h, r, t in q.hops:
            assert umls_kg.has_named_triple(h, r, t)
        for a, b in zip(q.hops, q.hops[1:]):
            assert a[2] == b[0]
        walk = [q.hops[0][0]] + [t for _, _, t in q.hops]
        assert len(set(walk)) == len(walk)  # the generating walk does not revisit a node


def test_generated_choices(umls_kg, umls_questions):
    for q in umls_questions:
        assert len(q.choices) == 4
        assert len(set(q.choices)) == 4
        accepted = {normalize(a) for a in q.all_answers}
        in_choices = [c for c in q.choices if normalize(c) in accepted]
        assert in_choices == [q.answer]  # exactly one accepted answer, the gold one
        start_name = umls_kg.entity_name(q.question_entities[0])
        for c in q.choices:
            if c != q.answer:
                assert normalize(c) not in accepted
                assert c != start_name


def test_generated_probes(umls_kg, umls_questions):
    tails = _tails(umls_kg)
    for q in umls_questions:
        assert len(q.probes) == len(q.hops)
        for i, (hop, p) in enumerate(zip(q.hops, q.probes)):
            probe = QAExample.from_dict(p)
            h, r, t = hop
            assert probe.id == f"{q.id}-hop{i}"
            assert probe.num_hops == 1 and probe.hops == [hop]
            assert probe.question_entities == [h]
            assert probe.answer == umls_kg.entity_name(t)
            # a 1-hop probe accepts every tail of (h, r)
            assert sorted(probe.all_answers) == sorted(umls_kg.entity_name(x) for x in tails[(h, r)])
            accepted = {normalize(a) for a in probe.all_answers}
            assert [c for c in probe.choices if normalize(c) in accepted] == [probe.answer]
            assert len(probe.choices) == 4


def test_generate_respects_hops_and_options(umls_kg):
    qs = generate_questions(umls_kg, 30, [2], num_choices=3, max_answers=1, seed=11)
    assert qs and all(q.num_hops == 2 for q in qs)
    assert all(len(q.choices) == 3 and q.all_answers == [q.answer] for q in qs)
    open_qs = generate_questions(umls_kg, 10, [1], num_choices=0, seed=11)
    assert open_qs and all(q.choices == [] for q in open_qs)


def test_generate_deterministic(umls_kg):
    a = generate_questions(umls_kg, 25, [1, 2, 3], seed=5)
    b = generate_questions(umls_kg, 25, [1, 2, 3], seed=5)
    c = generate_questions(umls_kg, 25, [1, 2, 3], seed=6)
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    assert [x.id for x in a] != [x.id for x in c]


def test_nations_generation(tmp_path):
    from kale_ray.core.kg import load_kg

    kg = load_kg("builtin:nations")
    qs = generate_questions(kg, 20, [1, 2], num_choices=4, max_answers=3, seed=0)
    tails = _tails(kg)
    for q in qs:
        reach = _reach(tails, q.question_entities[0], [r for _, r, _ in q.hops])
        assert sorted(kg.entity_name(e) for e in reach) == sorted(q.all_answers)


# --------------------------------------------------------------------------- #
# split_questions
# --------------------------------------------------------------------------- #
def test_split_holds_out_questions_not_facts(umls_kg, umls_questions):
    qs = [QAExample.from_dict(q.to_dict()) for q in umls_questions]
    train, test = split_questions(qs, 0.3, seed=1)
    multi = [q for q in qs if q.num_hops >= 2]
    assert len(test) == round(len(multi) * 0.3)
    assert all(q.num_hops >= 2 for q in test)
    test_ids = {q.id for q in test}
    assert not test_ids & {q.id for q in train}
    test_text = {normalize(q.question) for q in test}
    assert not test_text & {normalize(q.question) for q in train}
    # every hop fact of every question (test ones especially) is asked as a 1-hop train question
    one_hop = defaultdict(list)
    for q in train:
        if q.num_hops == 1:
            one_hop[(q.hops[0][0], q.hops[0][1])].append(q)
    for q in qs:
        for h, r, t in q.hops:
            asked = one_hop.get((h, r), [])
            assert asked, f"fact {(h, r, t)} of {q.id} not asked in train"
            assert any(umls_kg.entity_name(t) in p.all_answers and p.question_entities == [h] for p in asked)
    # no question is lost: every non-test question is still in train
    train_ids = {q.id for q in train}
    for q in qs:
        if q.id not in test_ids:
            assert q.id in train_ids


def test_split_deterministic_and_fraction(umls_questions):
    a_train, a_test = split_questions(list(umls_questions), 0.25, seed=0)
    b_train, b_test = split_questions(list(umls_questions), 0.25, seed=0)
    assert [q.id for q in a_test] == [q.id for q in b_test]
    assert [q.id for q in a_train] == [q.id for q in b_train]
    _, none = split_questions(list(umls_questions), 0.0)
    assert none == []
    _, all_multi = split_questions(list(umls_questions), 1.0)
    assert len(all_multi) == sum(q.num_hops >= 2 for q in umls_questions)


# --------------------------------------------------------------------------- #
# QA JSONL
# --------------------------------------------------------------------------- #
def _jsonl(tmp_path, rows, name="qa.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_read_qa_letter_answers_and_choices(tmp_path):
    p = _jsonl(tmp_path, [
        {"question": "Q1?", "answer": "B", "choices": ["red", "green", "blue"], "id": "q1"},
        {"question": "Q2?", "answer": "c", "choices": {"A": "red", "B": "green", "C": "blue"}},
        {"question": "Q3?", "answer": "B", "choices": ["A", "B", "C"]},  # a letter that is itself a choice
        {"question": " Q4? ", "answer": "Paris"},  # open question
        {"question": "Q5?", "answer": "green", "choices": ["Red", "Green"], "answers": ["green", "verde"]},
        {"question": "Q6?", "answer": 42, "choices": [41, 42]},
    ])
    rej = Rejects()
    rows = list(read_qa_jsonl(p, rej))
    assert rej.total() == 0
    assert [r.answer for r in rows] == ["green", "blue", "B", "Paris", "green", "42"]
    assert rows[0].id == "q1" and rows[0].choices == ["red", "green", "blue"]
    assert rows[1].choices == ["red", "green", "blue"]
    assert rows[3].question == "Q4?" and rows[3].choices == [] and rows[3].all_answers == ["Paris"]
    assert rows[4].all_answers == ["green", "verde"]
    assert rows[5].choices == ["41", "42"]
    assert len({r.id for r in rows}) == len(rows)


def test_read_qa_rejects_with_reason_and_line(tmp_path):
    p = _jsonl(tmp_path, [
        {"question": "ok?", "answer": "a", "choices": ["a", "b"]},
        {"question": "Q?", "answer": "purple", "choices": ["red", "green"]},  # line 2
        '{"question": "broken", ',  # line 3
        "",  # line 4 blank
        "[1, 2]",  # line 5
        {"question": "", "answer": "x"},  # line 6
        {"question": "Q?"},  # line 7
        {"question": "Q?", "answer": "Z", "choices": ["a", "b"]},  # line 8: letter out of range
    ])
    rej = Rejects()
    rows = list(read_qa_jsonl(p, rej))
    assert [r.question for r in rows] == ["ok?"]
    by_line = {r["line"]: r["reason"] for r in rej.rows}
    assert by_line == {2: "answer_not_in_choices", 3: "malformed_qa", 5: "malformed_qa", 6: "malformed_qa",
                       7: "malformed_qa", 8: "answer_not_in_choices"}
    assert all(r["file"] == str(p) for r in rej.rows)
    assert rej.counts() == {"answer_not_in_choices": 2, "malformed_qa": 4}


def test_read_qa_error_mode(tmp_path):
    p = _jsonl(tmp_path, [{"question": "ok?", "answer": "a"}, "{nope"], name="users_qa.jsonl")
    with pytest.raises(QAFormatError, match=r"users_qa\.jsonl:2:"):
        list(read_qa_jsonl(p, on_error="error"))


def test_read_qa_bad_utf8(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_bytes(b'{"question": "q?", "answer": "a"}\n{"question": "\xff", "answer": "a"}\n')
    rej = Rejects()
    assert len(list(read_qa_jsonl(p, rej))) == 1
    assert rej.counts() == {"bad_encoding": 1} and rej.rows[0]["line"] == 2


def test_write_then_read_roundtrip(tmp_path, umls_questions):
    p = tmp_path / "out" / "qa.jsonl"
    write_qa_jsonl(umls_questions[:10], p)
    back = list(read_qa_jsonl(p))
    assert [b.to_dict() for b in back] == [q.to_dict() for q in umls_questions[:10]]


# --------------------------------------------------------------------------- #
# Property: the QA reader never loses a line silently
# --------------------------------------------------------------------------- #
_ALPHABET = string.ascii_letters + string.digits + " \t,\"'{}[]:\\" + "é"
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, width=16),
                    st.text(alphabet=_ALPHABET, max_size=6), st.sampled_from(["A", "b", "red", " "]))
_value = st.one_of(_scalar, st.lists(_scalar, max_size=3), st.dictionaries(st.sampled_from(["A", "B", "x"]), _scalar, max_size=3))
_obj = st.dictionaries(
    st.sampled_from(["question", "answer", "choices", "answers", "id", "num_hops", "question_entities",
                     "answer_entities", "hops", "probes", "extra"]),
    _value, max_size=8,
)
_good = st.builds(
    lambda q, choices, k: {"question": q, "answer": choices[k % len(choices)], "choices": choices},
    st.text(alphabet=string.ascii_letters + " ?", min_size=1, max_size=10).filter(str.strip),
    st.lists(st.text(alphabet=string.ascii_letters, min_size=1, max_size=6), min_size=1, max_size=4, unique_by=normalize),
    st.integers(0, 10),
)
_qa_line = st.one_of(
    st.text(alphabet=_ALPHABET, max_size=30),
    _obj.map(json.dumps),
    _good.map(json.dumps),
    st.just(""),
    st.just("  "),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_qa_line, max_size=20))
@example(lines=['{"question": "q", "answer": "a", "answers": 5}'])
@example(lines=['{"question": "q", "answer": "a", "num_hops": "two"}'])
@example(lines=['{"question": "q", "answer": "a", "question_entities": 3}'])
@example(lines=['{"question": "q", "answer": "a", "probes": ["x"]}'])
def test_property_qa_reader_never_loses_a_line(tmp_path, lines):
    lines = [l.replace("\n", " ") for l in lines]
    p = tmp_path / "prop.jsonl"
    p.write_bytes("".join(l + "\n" for l in lines).encode("utf-8"))
    rej = Rejects()
    got = list(read_qa_jsonl(p, rej))
    blank = sum(1 for l in lines if not l.strip())
    rejected = [r["line"] for r in rej.rows]
    assert len(set(rejected)) == len(rejected)
    assert len(got) + len(rejected) + blank == len(lines)
    for q in got:
        assert isinstance(q.question, str) and q.question.strip() == q.question and q.question
        assert isinstance(q.answer, str) and q.answer.strip()
        assert all(isinstance(c, str) for c in q.choices)
        assert all(isinstance(a, str) for a in q.all_answers) and q.answer in q.all_answers
        if q.choices:
            assert normalize(q.answer) in {normalize(c) for c in q.choices}
        assert isinstance(q.num_hops, int)
        assert all(isinstance(e, str) for e in q.question_entities + q.answer_entities)
        assert isinstance(q.hops, list) and all(isinstance(h, list) for h in q.hops)
        assert isinstance(q.probes, list) and all(isinstance(x, dict) for x in q.probes)
    # the well-formed rows are all read back
    goods = []
    for l in lines:
        try:
            obj = json.loads(l)
        except ValueError:
            continue
        if isinstance(obj, dict) and set(obj) == {"question", "answer", "choices"} and isinstance(obj["choices"], list) \
                and isinstance(obj["question"], str) and obj["question"].strip() and isinstance(obj["answer"], str) \
                and obj["answer"] in obj["choices"] and all(isinstance(c, str) and c for c in obj["choices"]) \
                and len({normalize(c) for c in obj["choices"]}) == len(obj["choices"]):
            goods.append(obj["question"].strip())
    got_q = [q.question for q in got]
    for g in goods:
        assert g in got_q
