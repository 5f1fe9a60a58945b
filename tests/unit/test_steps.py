"""Row-level synthesis steps (kale_ray.synth.steps) on builtin UMLS, without Ray."""
from __future__ import annotations

import json

import pytest

from kale_ray.config import PathConfig
from kale_ray.core.kg import GraphIndex, KnowledgeGraph
from kale_ray.core.parse import verify_rationale
from kale_ray.core.prompts import template_rationale
from kale_ray.core.qa import QAExample, normalize
from kale_ray.synth.steps import (
    SynthContext,
    finish_row,
    link_and_search,
    path_entity_names,
    path_params,
    qa_row,
    reject_record,
)


@pytest.fixture(scope="module")
def ctx(umls_kg):
    return SynthContext(umls_kg, GraphIndex.from_kg(umls_kg), PathConfig(max_hops=3, k=3, seed=0))


@pytest.fixture(scope="module")
def searched(umls_questions, ctx):
    qs = [q for q in umls_questions if q.num_hops >= 2][:30]
    return [link_and_search(qa_row(q), ctx) for q in qs]


def _walk_end(path, start):
    """Follow a path's hops in walk direction from ``start`` (a hop may be walked tail->head)."""
    cur = start
    for h, _, t in path:
        if h == cur:
            cur = t
        elif t == cur:
            cur = h
        else:
            return None
    return cur


def test_path_params_from_config():
    cfg = PathConfig(max_hops=2, k=5, heuristic="target", bfs_fallback=False)
    p = path_params(cfg)
    assert (p.max_hops, p.k, p.heuristic, p.bfs_fallback) == (2, 5, "target", False)


def test_qa_row_drops_probes(umls_questions):
    q = umls_questions[0]
    row = qa_row(q)
    assert "probes" not in row
    assert row["id"] == q.id and row["hops"] == q.hops and row["all_answers"] == q.all_answers


def test_link_and_search_paths_are_real_walks(umls_kg, searched, ctx):
    assert searched
    complete = 0
    for row in searched:
        assert row["reject_reason"] == "", row["reject_detail"]
        assert row["paths"] and len(row["paths"]) <= ctx.params.k
        assert len(row["path_methods"]) == len(row["paths"])
        q_ents, a_ents = row["question_entities"], row["answer_entities"]
        assert q_ents == [row["hops"][0][0]]
        assert set(a_ents) >= {row["hops"][-1][2]}
        for path, method in zip(row["paths"], row["path_methods"]):
            assert 1 <= len(path) <= ctx.params.max_hops
            for h, r, t in path:
                assert umls_kg.has_named_triple(h, r, t), (h, r, t)
            ends = [_walk_end(path, s) for s in q_ents]
            ends = [e for e in ends if e is not None]
            assert ends, f"path {path} does not start at a question entity {q_ents}"
            if method != "partial":
                complete += 1
                assert any(e in a_ents for e in ends), f"path {path} does not end at an answer {a_ents}"
        assert row["path_complete"] == (row["path_methods"][0] != "partial")
    assert complete > 0


def test_link_and_search_facts_and_request(umls_kg, searched):
    for row in searched:
        assert row["facts"]
        if row["path_complete"]:
            assert len(row["facts"]) == len({tuple(h) for h in row["paths"][0]})
        first = row["paths"][0]
        for h, _, t in first:
            assert any(umls_kg.entity_name(h) in f and umls_kg.entity_name(t) in f for f in row["facts"])
        msgs = json.loads(row["teacher_messages"])
        body = msgs[1]["content"]
        for f in row["facts"]:
            assert f in body
        assert f"<answer>{row['answer']}</answer>" in body


def test_link_and_search_is_deterministic(umls_questions, ctx):
    q = next(q for q in umls_questions if q.num_hops == 3)
    a = link_and_search(qa_row(q), ctx)
    b = link_and_search(qa_row(q), ctx)
    assert a["paths"] == b["paths"] and a["facts"] == b["facts"]


def test_answer_not_in_kg_is_rejected(umls_questions, ctx):
    q = QAExample.from_dict(umls_questions[0].to_dict())
    row = qa_row(q)
    row.update(answer="a unicorn horn", all_answers=["a unicorn horn"], answer_entities=[])
    out = link_and_search(row, ctx)
    assert out["reject_reason"] == "answer_not_linked"
    assert "unicorn" in out["reject_detail"]
    assert out["paths"] == [] and out["teacher_messages"] == ""
    rec = reject_record(out)
    assert rec["reason"] == "answer_not_linked" and rec["id"] == q.id


def test_question_not_linked(ctx):
    row = qa_row(QAExample(id="zz", question="What is the airspeed velocity of a swallow?", answer="plant"))
    out = link_and_search(row, ctx)
    assert out["reject_reason"] == "question_not_linked"


def test_no_path_between_components():
    kg = KnowledgeGraph.from_named_triples([("alga", "r", "bird"), ("cell", "r", "dog")])
    ctx = SynthContext(kg, GraphIndex.from_kg(kg), PathConfig(max_hops=3))
    out = link_and_search(qa_row(QAExample(id="x", question="What does alga r?", answer="dog")), ctx)
    assert out["question_entities"] == ["alga"] and out["answer_entities"] == ["dog"]
    assert out["reject_reason"] == "no_path" and out["paths"] == []


# --------------------------------------------------------------------------- #
# finish_row
# --------------------------------------------------------------------------- #
def _contradiction_case(searched):
    """A searched row and a generation that names the gold early but concludes a wrong choice."""
    for row in searched:
        accepted = {normalize(a) for a in row["all_answers"]}
        wrong = [c for c in row["choices"]
                 if normalize(c) not in accepted and not any(f" {a} " in f" {normalize(c)} " for a in accepted)]
        if wrong:
            facts = ". ".join(row["facts"])
            gen = f"{facts}. Some say {row['answer']}. So the answer is {wrong[0]}."
            return row, gen
    pytest.skip("no row with a usable wrong choice")


def test_finish_row_contradiction_rejected_without_fallback(umls_kg, searched):
    row, gen = _contradiction_case(searched)
    row = dict(row, generation=gen, gen_error="")
    ents = path_entity_names(umls_kg, row["paths"])
    assert verify_rationale(gen, row["all_answers"], row["choices"], ents) == (False, "contradicts_gold")
    kept, rej = finish_row(row, umls_kg, "vllm", fallback_to_template=False)
    assert kept is None
    assert rej["reason"] == "contradicts_gold" and rej["id"] == row["id"] and rej["generation"] == gen


def test_finish_row_contradiction_falls_back_to_template(umls_kg, searched):
    row, gen = _contradiction_case(searched)
    row = dict(row, generation=gen, gen_error="")
    kept, rej = finish_row(row, umls_kg, "vllm", fallback_to_template=True)
    assert kept is not None and rej is not None
    assert kept["teacher"] == "template-fallback"
    assert kept["rationale"] == template_rationale(row["facts"], row["answer"])
    assert kept["rationale"].endswith(f"So the answer is {row['answer']}.")
    assert rej["reason"] == "contradicts_gold"
    assert kept["id"] == row["id"] and kept["answer"] == row["answer"] and kept["paths"] == row["paths"]


def test_finish_row_good_teacher_kept(umls_kg, searched):
    row = dict(searched[0])
    gen = "<think>let me see</think>" + template_rationale(row["facts"], row["answer"])
    row.update(generation=gen, gen_error="", gen_tokens=17)
    kept, rej = finish_row(row, umls_kg, "vllm", fallback_to_template=False)
    assert rej is None
    assert kept["teacher"] == "vllm"
    assert kept["rationale"] == template_rationale(row["facts"], row["answer"])  # think block removed
    assert kept["gen_tokens"] == 17 and kept["num_hops"] == row["num_hops"]
    assert kept["all_answers"] == row["all_answers"] and kept["choices"] == row["choices"]


def test_finish_row_generation_failed(umls_kg, searched):
    row = dict(searched[0], generation="", gen_error="timeout after 60s")
    kept, rej = finish_row(row, umls_kg, "http", fallback_to_template=False)
    assert kept is None and rej["reason"] == "generation_failed" and "timeout" in rej["detail"]
    kept, rej = finish_row(row, umls_kg, "http", fallback_to_template=True)
    assert kept["teacher"] == "template-fallback" and rej["reason"] == "generation_failed"


def test_finish_row_template_backend_keeps_template(umls_kg, searched):
    row = dict(searched[0], generation="So the answer is nonsense.", gen_error="")
    for fallback in (False, True):
        kept, rej = finish_row(row, umls_kg, "template", fallback_to_template=fallback)
        assert rej is None
        assert kept["teacher"] == "template"
        assert kept["rationale"] == template_rationale(row["facts"], row["answer"])
        for f in row["facts"]:
            assert f[0].upper() + f[1:] in kept["rationale"]
        # the template rationale passes the same verification a teacher's would
        ents = path_entity_names(umls_kg, row["paths"])
        assert verify_rationale(kept["rationale"], row["all_answers"], row["choices"], ents) == (True, "")


# --------------------------------------------------------------------------- #
# per-row seed, relation-following search
# --------------------------------------------------------------------------- #
def test_row_seed_uses_the_whole_id():
    from kale_ray.synth.steps import row_seed

    seeds = {tuple(row_seed(0, f"medqa-{i:04d}")) for i in range(1000)}
    assert len(seeds) == 1000
    assert row_seed(0, "medqa-0001") != row_seed(0, "medqa-0002")
    assert row_seed(0, "x") == row_seed(0, "x") and row_seed(1, "x") != row_seed(0, "x")
    long_a, long_b = "q" * 40 + "a", "q" * 40 + "b"  # differ only past the old 6-byte prefix
    assert row_seed(0, long_a) != row_seed(0, long_b)


def _shortcut_kg():
    # the shortest path alpha -> gamma is one "trades_with" hop; the question asks for
    # "located_in" then "borders" (alpha -> beta -> gamma)
    return KnowledgeGraph.from_named_triples([
        ("alpha", "trades_with", "gamma"), ("alpha", "located_in", "beta"), ("beta", "borders", "gamma"),
        ("delta", "trades_with", "beta"), ("delta", "borders", "alpha"),
    ])


@pytest.mark.parametrize("heuristic", ["bidirectional", "landmark", "target"])
def test_question_relations_steer_the_search(heuristic):
    kg = _shortcut_kg()
    row = qa_row(QAExample(id="q1", question="Which concept X satisfies: alpha is located in A, and A borders X?",
                           answer="gamma", question_entities=["alpha"]))
    on = SynthContext(kg, GraphIndex.from_kg(kg), PathConfig(max_hops=3, k=2, heuristic=heuristic))
    out = link_and_search(row, on)
    assert out["reject_reason"] == ""
    assert out["paths"][0] == [["alpha", "located_in", "beta"], ["beta", "borders", "gamma"]]
    assert out["path_methods"][0] == "relation" and out["path_mode"] == "relation"
    assert out["path_follows_question"] is True
    off = SynthContext(kg, GraphIndex.from_kg(kg), PathConfig(max_hops=3, k=2, heuristic=heuristic,
                                                               follow_question_relations=False))
    out2 = link_and_search(row, off)
    assert out2["paths"][0] == [["alpha", "located_in", "beta"], ["beta", "borders", "gamma"]]  # re-ranked
    assert out2["path_mode"] == heuristic and "relation" not in out2["path_methods"]
    # a question about another relation: the shortcut does not follow it
    row3 = qa_row(QAExample(id="q3", question="What does alpha frobnicate?", answer="gamma",
                            question_entities=["alpha"]))
    out3 = link_and_search(row3, on)
    assert out3["paths"][0] == [["alpha", "trades_with", "gamma"]]
    assert out3["path_follows_question"] is False and out3["path_mode"] == heuristic
    kept, _ = finish_row(out, kg, "template", False)
    assert kept["path_follows_question"] is True and kept["path_mode"] == "relation"


def test_relation_words_match_phrases_not_substrings():
    from kale_ray.synth.steps import RelationWords

    kg = KnowledgeGraph.from_named_triples([("a1", "part_of", "b1"), ("a1", "part", "b1"), ("a1", "isa", "b1")])
    rw = RelationWords(kg)
    rel = kg.relation_index
    chain = rw.chain("Which concept X satisfies: foo is part of A, and A is a X?")
    assert chain == [{rel["part_of"]}, {rel["isa"]}]  # "part" inside "is part of" is not a mention
    assert rw.chain("What is the cause of this? It is red.") == []  # a bare "is" is not "is a"
    w = rw.weights(chain, max_hops=3)
    assert w.shape == (2, 3) and w[0, rel["part_of"]] == 1 and w[1, rel["isa"]] == 1 and w.sum() == 2
    assert rw.weights(chain, max_hops=1).shape == (3,)
    assert rw.weights([], max_hops=3) is None


def test_context_accepts_a_prebuilt_linker(umls_kg):
    from kale_ray.core.qa import EntityLinker

    linker = EntityLinker(umls_kg)
    ctx = SynthContext(umls_kg, GraphIndex.from_kg(umls_kg), PathConfig(), linker=linker)
    assert ctx.linker is linker
    assert PathConfig().heuristic == "bidirectional" and PathConfig().follow_question_relations is True


# --------------------------------------------------------------------------- bad input (issue 13 items 7-9, 11)
def test_duplicate_id_record_names_file_line_and_first_line():
    from kale_ray.synth.steps import duplicate_id_record

    rec = duplicate_id_record({"id": "t1", "question": "q?", "answer": "a"}, "qa.jsonl", 5, 2)
    assert rec["reason"] == "duplicate_id" and rec["file"] == "qa.jsonl" and rec["line"] == 5
    assert rec["first_line"] == 2 and "qa.jsonl:5: id 't1' already used on line 2" == rec["detail"]


def test_teacher_failure_reason_keeps_the_error_kind():
    from kale_ray.synth.steps import teacher_failure_reason

    assert teacher_failure_reason({"reason": "generation_failed", "detail": "http_500: boom"}) == \
        "generation_failed (http_500)"
    assert teacher_failure_reason({"reason": "generation_failed", "detail": "engine died: x"}) == "generation_failed"
    assert teacher_failure_reason({"reason": "not_grounded", "detail": "text"}) == "not_grounded"


def test_answer_linked(umls_kg):
    from kale_ray.core.qa import EntityLinker
    from kale_ray.synth.steps import answer_linked

    linker = EntityLinker(umls_kg)
    assert answer_linked(QAExample(id="a", question="q?", answer="fish"), linker)
    assert answer_linked(QAExample(id="b", question="q?", answer="nope", answer_entities=["fish"]), linker)
    assert not answer_linked(QAExample(id="c", question="q?", answer="a unicorn horn"), linker)
    assert answer_linked(QAExample(id="d", question="q?", answer="zzz", all_answers=["zzz", "fish"]), linker)


def test_duplicate_id_lines_finds_every_reuse_in_one_small_scan(tmp_path):
    from kale_ray.synth.ids import dups_by_shard, duplicate_id_lines

    lines = [
        '\ufeff{"id": "t1", "question": "a?", "answer": "x"}',  # 1: BOM on the first line
        '{"question": "b?", "answer": "x", "id": "t2"}',  # 2: id not the first key
        '{"id":"t1","question":"c?","answer":"x"}',  # 3: compact: reuses t1
        '{"id": "q\\"1", "question": "d?", "answer": "x"}',  # 4: an escape in the id
        '{"id": 7, "question": "e?", "answer": "x"}',  # 5: a number id
        '{"question": "f?", "answer": "x", "probes": [{"id": "t1"}]}',  # 6: "id" only nested: no id
        '{"id": "q\\"1", "question": "g?", "answer": "x"}',  # 7: reuses q"1
        '{"id": "7", "question": "h?", "answer": "x"}',  # 8: reuses 7 (read as the text "7")
        '{nope',  # 9
        '',  # 10
        '{"id": "t2", "question": "i?", "answer": "x"}',  # 11: reuses t2
        '{"id": "", "question": "j?", "answer": "x"}',  # 12: empty id: a generated one
        '{"id": "", "question": "k?", "answer": "x"}',  # 13
    ]
    p = tmp_path / "qa.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dups = duplicate_id_lines(str(p))
    assert dups == {"t1": (1, [1, 3]), 'q"1': (4, [4, 7]), "7": (5, [5, 8]), "t2": (2, [2, 11])}
    assert duplicate_id_lines(str(p), max_lines=6) == {"t1": (1, [1, 3])}
    by_shard = dups_by_shard(dups, [(0, 10, 1), (10, 20, 5), (20, 30, 9)])
    assert json.loads(by_shard[0]) == {"t1": [1, [1, 3]], 'q"1': [4, [4]], "t2": [2, [2]]}
    assert json.loads(by_shard[1]) == {'q"1': [4, [7]], "7": [5, [5, 8]]}
    assert json.loads(by_shard[2]) == {"t2": [2, [11]]}


def test_question_warnings_small_kg():
    from kale_ray.config import SynthConfig
    from kale_ray.synth.pipeline import question_warnings

    cfg = SynthConfig()
    cfg.qa.num_questions = 60
    info = {"requested": 60, "generated": 45, "generated_by_hops": {"1": 40, "2": 5}, "test": 4, "test_unlinked": 0}
    w = question_warnings(cfg, info)
    assert len(w) == 3, w
    assert "45 questions generated of qa.num_questions=60" in w[0]
    assert "no 3-hop questions" in w[1]
    assert "test split has 4 questions (fewer than 30)" in w[2]
    info.update(generated=60, generated_by_hops={"1": 20, "2": 20, "3": 20}, test=40)
    assert question_warnings(cfg, info) == []


def test_eval_reports_accuracy_without_unlinked_answers(tmp_path):
    from kale_ray.methods.kale.evaluate import unlinked_ids, with_linked
    from kale_ray.methods.kale.metrics import summarize

    p = tmp_path / "test.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "question": "q?", "answer": "x", "answer_linked": True},
        {"id": "b", "question": "q?", "answer": "y", "answer_linked": False},
        {"id": "c", "question": "q?", "answer": "z"},
    ]) + "\n")
    assert unlinked_ids(p) == {"b"}
    scored = [{"qid": q, "item_id": q, "kind": "question", "correct": ok, "parsed": True, "skipped": "", "num_hops": 2}
              for q, ok in (("a", True), ("b", False), ("c", False))]
    m = with_linked(summarize(scored), scored, unlinked_ids(p))
    assert m["n_answer_unlinked"] == 1 and m["n_questions"] == 3
    assert m["linked"]["n_questions"] == 2 and m["linked"]["accuracy"] == 0.5
    assert "linked" not in with_linked(summarize(scored), scored, set())
