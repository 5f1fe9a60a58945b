"""The known-and-incorrect testbed (issue 15): distractor policies and tiers, open answers, probes in
the question's format, the question-blind baseline and the metrics over them."""
from __future__ import annotations

from collections import defaultdict

import pytest

from kale_ray.core.kg import KnowledgeGraph, load_kg
from kale_ray.core.qa import TIERS, QAExample, generate_questions, normalize, read_qa_jsonl, write_qa_jsonl
from kale_ray.methods.kale.metrics import (blind_pick, choice_prior, question_blind_baseline, score_open_answer,
                                           summarize)


def _index(kg):
    """Raw-triple views, independent of qa._ForwardIndex: (h, r) -> tails, h -> tails, r -> range (names)."""
    tails, out, rng = defaultdict(set), defaultdict(set), defaultdict(set)
    for h, r, t in kg.triples.tolist():
        h, r, t = kg.entities[h], kg.relations[r], kg.entities[t]
        tails[(h, r)].add(t)
        out[h].add(t)
        rng[r].add(kg.entity_name(t))
    return tails, out, rng


def _reach_any(out, start, n):
    frontier = {start}
    for _ in range(n):
        frontier = {t for e in frontier for t in out.get(e, ())}
    return frontier


def _shortcut_kg():
    """A KG where the answer's prior gives it away: every question's gold is one of 4 hub categories
    (50 members each), and the range of ``isa`` also holds 400 rare categories (tails of 4 collectors
    with 100 each: never a question's answer, too many answers)."""
    tr = [(f"p{i:03d}", "isa", f"cat{i % 4}") for i in range(200)]
    tr += [(f"k{j // 100}", "isa", f"rare{j:03d}") for j in range(400)]
    return KnowledgeGraph.from_named_triples(tr)


@pytest.fixture(scope="module")
def nations_kg():
    return load_kg("builtin:nations")


@pytest.fixture(scope="module", params=["reachable", "matched"])
def tiered(request, umls_kg):
    qs = generate_questions(umls_kg, 40, [1, 2, 3], seed=1, distractors=request.param, max_distractor_tier="range")
    return request.param, qs


# --------------------------------------------------------------------------- #
# The question-blind baseline: the test that shows the new generator works
# --------------------------------------------------------------------------- #
def test_blind_baseline_near_one_with_old_policy_near_chance_with_matched():
    kg = _shortcut_kg()
    old = generate_questions(kg, 100, [1], seed=0)  # the default (original) policy
    new = generate_questions(kg, 100, [1], seed=0, distractors="matched")
    assert len(old) == len(new) == 100
    for prior in ("range", "tail", "answer"):
        b_old, b_new = question_blind_baseline(kg, old, prior), question_blind_baseline(kg, new, prior)
        assert b_old["chance"] == b_new["chance"] == 0.25
        assert b_old["accuracy"] >= 0.95
        assert abs(b_new["accuracy"] - 0.25) <= 0.06
        assert b_new["by_hops"]["1"]["n"] == 100
    assert {q.distractor_tier for q in new} == {"range"}


def test_blind_baseline_drops_on_builtin_kgs(umls_kg, nations_kg):
    for kg in (umls_kg, nations_kg):
        old = generate_questions(kg, 60, [1, 2, 3], seed=2)
        new = generate_questions(kg, 60, [1, 2, 3], seed=2, distractors="matched", max_distractor_tier="range",
                                 max_answer_share=0.25)
        b_old, b_new = question_blind_baseline(kg, old), question_blind_baseline(kg, new)
        assert b_new["accuracy"] < b_old["accuracy"] - 0.15, (kg.source, b_old, b_new)


def test_blind_pick_and_baseline_by_hand():
    kg = KnowledgeGraph.from_named_triples([("ann", "r", "xen"), ("bob", "r", "xen"), ("cid", "r", "yam"),
                                            ("xen", "s", "yam")])
    assert choice_prior(kg, "r") == {"ann": 0, "bob": 0, "cid": 0, "xen": 2, "yam": 1}
    assert choice_prior(kg) == {"ann": 0, "bob": 0, "cid": 0, "xen": 2, "yam": 2}
    assert choice_prior(kg, "nope") == {"ann": 0, "bob": 0, "cid": 0, "xen": 0, "yam": 0}
    assert blind_pick(["yam", "xen", "ann"], choice_prior(kg, "r")) == ["xen"]
    assert blind_pick(["yam", "xen", "ann"], choice_prior(kg)) == ["yam", "xen"]  # ties kept
    assert blind_pick([], choice_prior(kg)) == []
    q1 = QAExample(id="1", question="?", answer="yam", choices=["xen", "yam", "ann"], all_answers=["yam"],
                   hops=[["cid", "r", "yam"]], num_hops=1)
    q2 = QAExample(id="2", question="?", answer="xen", choices=["xen", "ann"], all_answers=["xen"],
                   hops=[["ann", "r", "xen"]], num_hops=1)
    q3 = QAExample(id="3", question="?", answer="yam", choices=["yam", "xen"], all_answers=["yam"],
                   hops=[["cid", "r", "xen"], ["xen", "s", "yam"]], num_hops=2)
    b = question_blind_baseline(kg, [q1, q2, q3.to_dict()], "range")
    assert b["n"] == 3 and b["prior"] == "range"
    assert b["by_hops"]["1"] == {"accuracy": 0.5, "chance": (1 / 3 + 1 / 2) / 2, "n": 2}
    assert b["by_hops"]["2"] == {"accuracy": 1.0, "chance": 0.5, "n": 1}  # yam is s's only tail
    assert b["accuracy"] == pytest.approx(2 / 3)
    # an open question guesses among all 5 names: s's range is {yam}, so the range prior gets it
    open_q = QAExample(id="4", question="?", answer="yam", hops=[["cid", "r", "xen"], ["xen", "s", "yam"]], num_hops=2)
    o = question_blind_baseline(kg, [open_q], "range")
    assert o["n"] == 1 and o["accuracy"] == 1.0 and o["chance"] == pytest.approx(1 / 5)
    assert question_blind_baseline(kg, [open_q], "tail")["accuracy"] == 0.5  # xen and yam tie
    assert question_blind_baseline(kg, [open_q], "answer")["accuracy"] == pytest.approx(1 / 5)  # no other question
    t = question_blind_baseline(kg, [q3], "tail")
    assert t["accuracy"] == 0.5  # xen and yam are both twice a tail: the credit is split
    assert question_blind_baseline(kg, [])["n"] == 0
    # the answer prior of the other questions (same hop count and last relation), this one left out
    a = question_blind_baseline(kg, [q1, q2, q3], "answer")
    assert a["by_hops"]["1"]["accuracy"] == 0.25  # q1: xen was the others' gold (0); q2: xen/ann tie (0.5)
    assert a["by_hops"]["2"]["accuracy"] == 0.5  # nobody else: a tie
    with pytest.raises(ValueError, match="prior"):
        question_blind_baseline(kg, [q1], "oracle")


# --------------------------------------------------------------------------- #
# Distractors: range, tiers, never a correct answer
# --------------------------------------------------------------------------- #
def test_default_policy_records_its_tier(umls_questions):
    for q in umls_questions:
        assert q.distractor_tier in ("range", "any")
        for p in q.probes:
            assert p["distractor_tier"] in ("range", "any")


def test_tiered_distractors_share_the_answers_range(umls_kg, tiered):
    policy, qs = tiered
    tails, out, rng = _index(umls_kg)
    assert len(qs) == 40
    for q in qs:
        for ex in [q] + [QAExample.from_dict(p) for p in q.probes]:
            last_rel = ex.hops[-1][1]
            start = ex.question_entities[0]
            distractors = [c for c in ex.choices if c != ex.answer]
            assert len(distractors) == 3 and len(set(ex.choices)) == 4
            assert ex.distractor_tier in ("reachable", "range")  # max_distractor_tier="range"
            assert all(d in rng[last_rel] for d in distractors), (ex.question, distractors)
            if ex.distractor_tier == "reachable":  # every distractor reached from the start in as many hops
                reach = {umls_kg.entity_name(e) for e in _reach_any(out, start, ex.num_hops)}
                assert all(d in reach for d in distractors), (ex.question, distractors)


def test_no_distractor_is_a_correct_answer(umls_kg, tiered):
    _, qs = tiered
    for q in qs:
        for ex in [q] + [QAExample.from_dict(p) for p in q.probes]:
            accepted = {normalize(a) for a in ex.all_answers}
            assert [c for c in ex.choices if normalize(c) in accepted] == [ex.answer]
            assert umls_kg.entity_name(ex.question_entities[0]) not in ex.choices


def test_no_distractor_shares_a_name_or_alias_with_an_answer():
    # "cat0" is the only answer of "p0 isa ?"; "dup" reads as it (same display name) and "alias" by alias
    tr = [("p0", "isa", "cat0")] + [("k", "isa", f"c{i}") for i in range(6)] + [("k", "isa", "dup"), ("k", "isa", "al")]
    kg = KnowledgeGraph.from_named_triples(tr, names={"dup": "cat0"}, aliases={"cat0": ["feline"], "al": ["Feline"]})
    for policy in ("range", "reachable", "matched"):
        for seed in range(15):
            for q in generate_questions(kg, 1, [1], seed=seed, distractors=policy, max_answers=1):
                assert q.choices.count("cat0") == 1 and "al" not in q.choices, (policy, q.choices)


def test_fallback_tiers_are_recorded_in_order():
    # "q isa ?" has a range of 2 (the answer and one more): the rest comes from other relations' tails, then any
    tr = [("q", "isa", "A"), ("z", "isa", "B"), ("q", "likes", "t1"), ("z", "likes", "t2"), ("t1", "near", "u")]
    kg = KnowledgeGraph.from_named_triples(tr)
    # entities: q A z B t1 t2 u; tails: A B t1 t2 u; nothing is "any"-only except q and z (heads only)
    for policy in ("reachable", "matched"):
        qs = generate_questions(kg, 10, [1], seed=0, distractors=policy)
        by_q = {q.question: q for q in qs}
        q = by_q["Which concept X satisfies: q is a X?"]
        assert q.distractor_tier == "tail" and "B" in q.choices  # the one same-range entity is always taken
        assert set(q.choices) - {"A", "B"} <= {"t1", "t2", "u"}
        # too few distractors within the allowed tier: the question is not generated at all
        assert generate_questions(kg, 10, [1], seed=0, distractors=policy, max_distractor_tier="range") == []
        three = generate_questions(kg, 10, [1], seed=0, distractors=policy, num_choices=6)
        assert three and {x.distractor_tier for x in three} == {"any"}  # 5 distractors: q or z are needed
    assert TIERS == ("reachable", "range", "tail", "any")


def test_unknown_options_are_refused(umls_kg):
    with pytest.raises(ValueError, match="distractors"):
        generate_questions(umls_kg, 2, [1], distractors="typed")
    with pytest.raises(ValueError, match="max_distractor_tier"):
        generate_questions(umls_kg, 2, [1], max_distractor_tier="none")
    with pytest.raises(ValueError, match="question_format"):
        generate_questions(umls_kg, 2, [1], question_format="yesno")
    with pytest.raises(ValueError, match="max_answer_share"):
        generate_questions(umls_kg, 2, [1], max_answer_share=1.5)


def test_answer_share_caps_one_gold_per_relation(umls_kg):
    qs = generate_questions(umls_kg, 60, [1, 2], seed=4, distractors="matched", max_answer_share=0.25)
    groups = defaultdict(list)
    for q in qs:
        groups[(q.num_hops, q.hops[-1][1])].append(q.answer)
    for answers in groups.values():
        for a in set(answers):
            assert answers.count(a) <= max(1, 0.25 * len(answers)) + 1


def test_new_policies_are_deterministic(umls_kg):
    for policy in ("reachable", "matched"):
        a = generate_questions(umls_kg, 15, [1, 2, 3], seed=9, distractors=policy)
        b = generate_questions(umls_kg, 15, [1, 2, 3], seed=9, distractors=policy)
        assert [x.to_dict() for x in a] == [x.to_dict() for x in b]


def test_distractor_tier_survives_the_qa_file(tmp_path, tiered):
    _, qs = tiered
    write_qa_jsonl(qs[:5], tmp_path / "q.jsonl")
    back = list(read_qa_jsonl(tmp_path / "q.jsonl"))
    assert [q.distractor_tier for q in back] == [q.distractor_tier for q in qs[:5]]
    assert [q.probes for q in back] == [q.probes for q in qs[:5]]


# --------------------------------------------------------------------------- #
# Open answers and probes in the question's format
# --------------------------------------------------------------------------- #
def test_open_questions_carry_names_and_aliases():
    tr = [("tom", "isa", "cat"), ("tom", "isa", "pet"), ("cat", "eats", "mouse")]
    kg = KnowledgeGraph.from_named_triples(tr, names={"cat": "Felis catus"}, aliases={"cat": ["cat", "house cat"],
                                                                                   "pet": ["companion animal"]})
    qs = generate_questions(kg, 5, [1, 2], seed=0, question_format="open")
    q = next(x for x in qs if x.question == "Which concept X satisfies: tom is a X?")
    assert q.choices == [] and q.distractor_tier == ""
    assert q.all_answers[0] == q.answer
    assert set(q.all_answers) == {"Felis catus", "cat", "house cat", "pet", "companion animal"}
    assert score_open_answer("The House-Cat!", q.all_answers)
    assert score_open_answer("companion animal", q.all_answers)  # any correct answer's alias
    assert not score_open_answer("mouse", q.all_answers)
    assert not score_open_answer("", q.all_answers) and not score_open_answer(None, q.all_answers)
    assert not score_open_answer("house", q.all_answers)  # exact match, not containment


@pytest.mark.parametrize("fmt,policy", [("mc", "range"), ("mc", "matched"), ("open", "matched")])
def test_probes_are_in_the_questions_format(umls_kg, fmt, policy):
    qs = generate_questions(umls_kg, 20, [2, 3], seed=3, question_format=fmt, distractors=policy)
    _, _, rng = _index(umls_kg)
    assert qs
    for q in qs:
        assert len(q.probes) == q.num_hops
        for p in q.probes:
            assert len(p["choices"]) == len(q.choices) == (4 if fmt == "mc" else 0)
            assert bool(p["distractor_tier"]) == (fmt == "mc")
            if fmt == "open":
                assert p["all_answers"][0] == p["answer"]
            else:  # the probe's distractors are of its relation's range too (the same kind)
                if policy == "matched" and p["distractor_tier"] in ("reachable", "range"):
                    assert all(c in rng[p["hops"][0][1]] for c in p["choices"])


# --------------------------------------------------------------------------- #
# Metrics: known & incorrect on equal terms, per hop count
# --------------------------------------------------------------------------- #
def _pred(kind, qid, correct, hops=2, choices=None):
    p = {"kind": kind, "qid": qid, "correct": correct, "parsed": True, "skipped": "", "num_hops": hops}
    if choices is not None:
        p["choices"] = choices
    return p


def test_known_and_incorrect_by_hops_and_format_mismatch():
    mc, mc3 = ["a", "b", "c", "d"], ["a", "b", "c"]
    preds = [
        _pred("question", "q1", False, 2, mc), _pred("probe", "q1", True, 1, mc), _pred("probe", "q1", True, 1, mc),
        _pred("question", "q2", True, 2, mc), _pred("probe", "q2", True, 1, mc), _pred("probe", "q2", False, 1, mc),
        _pred("question", "q3", False, 3, []), _pred("probe", "q3", True, 1, []), _pred("probe", "q3", True, 1, []),
        # probes not in the question's format (open, or another number of choices): left out, counted
        _pred("question", "q4", False, 2, mc), _pred("probe", "q4", True, 1, []), _pred("probe", "q4", True, 1, mc),
        _pred("question", "q5", False, 2, mc), _pred("probe", "q5", True, 1, mc3),
    ]
    m = summarize(preds)
    assert m["n_questions"] == 5
    assert m["n_with_probes"] == 3 and m["n_probe_format_mismatch"] == 2
    assert m["n_known"] == 2 and m["n_known_and_incorrect"] == 2
    assert m["known_and_incorrect_rate"] == 2 / 3
    by = m["known_and_incorrect_by_hops"]
    assert by["2"] == {"n_with_probes": 2, "n_known": 1, "n_known_and_incorrect": 1, "accuracy": 0.5,
                       "probe_accuracy": 0.75, "known_and_incorrect_rate": 0.5}
    assert by["3"]["known_and_incorrect_rate"] == 1.0 and by["3"]["probe_accuracy"] == 1.0


def test_summarize_without_formats_is_unchanged():
    preds = [_pred("question", "q1", False), _pred("probe", "q1", True), _pred("question", "q2", True)]
    m = summarize(preds)
    assert m["n_with_probes"] == 1 and m["n_known_and_incorrect"] == 1 and m["n_probe_format_mismatch"] == 0


# --------------------------------------------------------------------------- #
# The config keys (qa.question_format, qa.distractors, qa.max_distractor_tier, qa.max_answer_share)
# --------------------------------------------------------------------------- #
def test_qa_config_keys(umls_kg):
    from kale_ray.config import ConfigError, QAConfig, load_config

    default = QAConfig()
    assert (default.question_format, default.distractors, default.max_distractor_tier, default.max_answer_share) == \
        ("mc", "range", "any", 0.0)  # the original generator
    cfg = load_config(QAConfig, None, ["distractors=matched", "max_distractor_tier=range", "max_answer_share=0.25",
                                       "question_format=open"])
    assert (cfg.distractors, cfg.max_distractor_tier, cfg.max_answer_share, cfg.question_format) == \
        ("matched", "range", 0.25, "open")
    qs = generate_questions(umls_kg, 5, [1, 2], cfg.num_choices, cfg.max_answers, cfg.seed,
                            question_format=cfg.question_format, distractors=cfg.distractors,
                            max_distractor_tier=cfg.max_distractor_tier, max_answer_share=cfg.max_answer_share)
    assert qs and all(q.choices == [] for q in qs)
    with pytest.raises(ConfigError, match="max_answer_share"):
        load_config(QAConfig, None, ["max_answer_share=2"])
    with pytest.raises(ConfigError, match="distractors"):
        load_config(QAConfig, None, ["distractors=typed"])
