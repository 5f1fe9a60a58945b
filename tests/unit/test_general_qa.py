"""The held-out general questions (eval.general): the shipped fixture, reading a user's file, the
evaluation's items, the summaries (the multi-hop metrics leave them out), the paired KALE - SFT
difference (the report's table: test_report.py)."""
from __future__ import annotations

import fnmatch
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from kale_ray.config import ConfigError, EvalConfig, KALEJobConfig
from kale_ray.core.parse import is_correct
from kale_ray.core.qa import QAExample, QAFormatError, normalize, read_qa_jsonl
from kale_ray.core.rejects import Rejects
from kale_ray.methods.kale.general import PREDICTIONS, general_file, read_general
from kale_ray.methods.kale.metrics import summarize, summarize_general
from kale_ray.runtime.report import paired_difference, wilson_interval

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "kale_ray" / "data" / "general_qa.jsonl"
CATEGORIES = {"science", "geography", "history", "arithmetic", "language", "common_sense", "units"}


def test_the_fixture_loads_with_the_qa_reader_and_ships_as_package_data():
    rejects = Rejects()
    questions = list(read_qa_jsonl(FIXTURE, rejects))
    assert rejects.total() == 0 and 150 <= len(questions) <= 300
    assert general_file("builtin:general") == FIXTURE.resolve()
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["kale_ray"]
    assert any(fnmatch.fnmatch("data/general_qa.jsonl", p) for p in patterns)


def test_the_fixture_rows_are_well_formed_and_balanced():
    rows = read_general(FIXTURE)
    ids = [q.id for q, _ in rows]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"general-\d{4}", i) for i in ids)
    for q, category in rows:
        assert len(q.choices) == 4 and len({normalize(c) for c in q.choices}) == 4, q.id
        assert q.answer in q.choices and q.all_answers == [q.answer], q.id
        assert category in CATEGORIES, q.id
        # the scorer reads the gold text as that choice, and a wrong choice as wrong
        assert is_correct(q.answer, q.all_answers, q.choices) == (True, q.answer), q.id
        wrong = next(c for c in q.choices if c != q.answer)
        assert is_correct(wrong, q.all_answers, q.choices)[0] is False, q.id
    positions = Counter(q.choices.index(q.answer) for q, _ in rows)
    assert set(positions) == {0, 1, 2, 3} and max(positions.values()) - min(positions.values()) <= len(rows) // 20
    per_category = Counter(c for _, c in rows)
    assert set(per_category) == CATEGORIES and min(per_category.values()) >= 20


def test_the_fixture_is_disjoint_from_the_training_kg():
    """No question or choice names a UMLS semantic type (the entities of builtin:umls)."""
    from kale_ray.core.kg import load_kg

    try:
        kg = load_kg("builtin:umls")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    names = {normalize(kg.entity_name(e)) for e in range(kg.num_entities)}
    for q, _ in read_general(FIXTURE):
        text = normalize(" ".join([q.question, *q.choices]))
        hits = [n for n in names if re.search(rf"(?<!\w){re.escape(n)}(?!\w)", text)]
        assert not hits, (q.id, hits)


def test_general_file_resolves_builtins_paths_and_off(tmp_path):
    assert general_file("") is None
    with pytest.raises(ConfigError, match=r"eval\.general: unknown builtin QA set 'builtin:nope'"):
        general_file("builtin:nope", "eval.general")
    with pytest.raises(FileNotFoundError, match="general: no such QA file"):
        general_file(str(tmp_path / "missing.jsonl"))
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"question": "2 + 2?", "answer": "4", "choices": ["3", "4"]}) + "\n")
    assert general_file(str(mine)) == mine
    (q, category), = read_general(mine)
    assert q.answer == "4" and category == ""


def _bad(tmp_path, *lines: str) -> Path:
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("second, message", [
    ("{not json", r"bad\.jsonl:2: not valid JSON"),
    ('{"id": "a", "question": "q2?", "answer": "x"}', r"bad\.jsonl:2: id 'a' already used on line 1"),
    ('{"id": "b", "question": "q2?", "answer": "x", "category": 3}', r"bad\.jsonl:2: 'category' must be a string"),
    ('{"id": "b", "question": "q2?", "answer": "z", "choices": ["x", "y"]}', r"bad\.jsonl:2: answer 'z' is not one"),
])
def test_a_bad_general_file_names_file_and_line(tmp_path, second, message):
    path = _bad(tmp_path, '{"id": "a", "question": "q?", "answer": "x"}', second)
    with pytest.raises(QAFormatError, match=message):
        read_general(path)


def test_an_empty_general_file_is_an_error(tmp_path):
    with pytest.raises(QAFormatError, match=r"bad\.jsonl: no questions"):
        read_general(_bad(tmp_path, "", "  "))


def _question(qid: str) -> QAExample:
    probe = {"question": f"{qid} hop?", "answer": "red", "choices": ["red", "blue"]}
    return QAExample(id=qid, question=f"{qid}?", answer="red", choices=["red", "blue"], num_hops=2,
                     probes=[probe, probe])


def test_the_evaluation_asks_the_general_questions_in_the_same_pass():
    from kale_ray.methods.kale.evaluate import build_items

    n = len(read_general(FIXTURE))
    items = build_items(EvalConfig(), [_question("q1"), _question("q2")])
    kinds = Counter(it["kind"] for it in items)
    assert kinds == {"question": 2, "probe": 4, "general": n}
    general = [it for it in items if it["kind"] == "general"]
    assert general[0]["item_id"] == "general#general-0001" and general[0]["category"] in CATEGORIES
    assert len({it["item_id"] for it in items}) == len(items)
    assert Counter(it["kind"] for it in build_items(EvalConfig(general=""), [_question("q1")])) == {"question": 1,
                                                                                                    "probe": 2}


def _scored(kind: str, qid: str, correct: bool, **kw) -> dict:
    return {"kind": kind, "qid": qid, "item_id": qid, "correct": correct, "parsed": True, "skipped": "",
            "num_hops": 2 if kind == "question" else 1, **kw}


def test_the_multi_hop_summary_ignores_general_items():
    multi = [_scored("question", "q1", False), _scored("probe", "q1", True), _scored("probe", "q1", True),
             _scored("question", "q2", True), _scored("probe", "q2", False)]
    general = [dict(_scored("general", f"general#g{i}", i % 2 == 0, category="units"), num_hops=0) for i in range(6)]
    general.append(dict(general[0], item_id="general#g9", qid="general#g9", skipped="prompt_too_long"))
    assert summarize(multi + general) == summarize(multi)
    assert summarize(multi)["n_known_and_incorrect"] == 1


def test_summarize_general():
    rows = [{"kind": "general", "item_id": f"g{i}", "category": c, "correct": ok, "parsed": parsed, "skipped": ""}
            for i, (c, ok, parsed) in enumerate([("units", True, True), ("units", False, False),
                                                 ("history", True, True), ("", False, True)])]
    rows.append({"kind": "general", "item_id": "g9", "category": "units", "correct": False, "parsed": False,
                 "skipped": "prompt_too_long"})
    g = summarize_general(rows + [_scored("question", "q1", True)])
    assert g["n"] == 4 and g["accuracy"] == 0.5 and g["accuracy_ci95"] == list(wilson_interval(2, 4))
    assert g["parse_rate"] == 0.75 and g["skipped"] == 1
    assert g["by_category"]["units"] == {"n": 2, "accuracy": 0.5, "accuracy_ci95": list(wilson_interval(1, 2)),
                                         "parse_rate": 0.5}
    assert set(g["by_category"]) == {"history", "uncategorised", "units"}
    assert summarize_general([])["n"] == 0


def test_paired_difference():
    a = {"x": True, "y": False, "z": False, "w": True, "only_a": True}
    b = {"x": True, "y": True, "z": True, "w": False, "only_b": False}
    d = paired_difference(a, b)
    assert d["n"] == 4 and d["diff"] == pytest.approx(0.25) and d["only_a_right"] == 1 and d["only_b_right"] == 2
    half = 1.96 * (sum((x - 0.25) ** 2 for x in (0, 1, 1, -1)) / 3) ** 0.5 / 2
    assert d["ci95"] == pytest.approx([0.25 - half, 0.25 + half])
    assert paired_difference({"x": True}, {"x": False}) == {"n": 1, "diff": None, "ci95": [None, None],
                                                            "only_a_right": 1, "only_b_right": 0}


def test_the_recipe_pairs_sft_and_kale_per_general_question(tmp_path):
    from kale_ray.core.io import write_jsonl
    from kale_ray.methods.kale.recipe import _general

    for name, right in (("sft", [True, False, False]), ("kale", [True, True, False])):
        write_jsonl(tmp_path / f"eval_{name}" / PREDICTIONS,
                    [{"item_id": f"general#{i}", "correct": ok, "skipped": ""} for i, ok in enumerate(right)]
                    + [{"item_id": "general#9", "correct": True, "skipped": "prompt_too_long"}])
    evals = {"sft": {"general": {}}, "kale": {"general": {}}}
    d = _general(tmp_path, evals)["kale_minus_sft"]
    assert d["n"] == 3 and d["diff"] == pytest.approx(1 / 3) and d["only_b_right"] == 1
    assert _general(tmp_path, {"sft": {}, "kale": {"general": {}}}) == {}


def test_preflight_reads_a_users_general_file(tmp_path):
    from kale_ray.runtime.preflight import PreflightError, check_general_parses, input_files

    path = _bad(tmp_path, '{"question": "q?", "answer": "x", "choices": ["x", "y"]}', "[1]")
    cfg = KALEJobConfig(eval=EvalConfig(general=str(path)))
    assert ("eval.general", str(path)) in input_files("kale", cfg)
    assert not [k for k, _ in input_files("kale", KALEJobConfig()) if k == "eval.general"]
    with pytest.raises(QAFormatError, match=r"bad\.jsonl:2: expected a JSON object"):
        check_general_parses("eval.general", str(path))
    with pytest.raises(PreflightError, match="eval.general: no such QA file"):
        check_general_parses("eval.general", str(tmp_path / "none.jsonl"))
    check_general_parses("eval.general", "builtin:general")


def test_evaluate_writes_the_general_section_apart(tmp_path, monkeypatch):
    """evaluate() end to end with a fake model and generator: one pass, the general items in their own
    predictions file and metrics section, the multi-hop metrics as without them."""
    import sys
    import types

    import kale_ray.runtime.generate as generate_mod
    from kale_ray.core.qa import write_qa_jsonl
    from kale_ray.methods.kale.evaluate import evaluate

    class Tok:
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return json.dumps(messages)

    fake = types.SimpleNamespace(resolve_model=lambda name, cache_dir=None: name,
                                 load_tokenizer=lambda path, trust_remote_code=False: Tok())
    monkeypatch.setitem(sys.modules, "kale_ray.models", fake)
    general = {f"general#{q.id}": q for q, _ in read_general(FIXTURE)}
    calls = []

    def fake_generate(rows, model_path, gen, model, tokenizer=None, **kw):
        calls.append(len(rows))  # every item (test question, probe, general question) in one call
        return {r["key"]: {"text": general[r["key"]].answer if r["key"] in general and i % 2 == 0 else "red",
                           "tokens": 1, "error": ""} for i, r in enumerate(rows)}

    monkeypatch.setattr(generate_mod, "generate", fake_generate)
    test = tmp_path / "test.jsonl"
    write_qa_jsonl([_question("q1"), _question("q2")], test)
    cfg = EvalConfig(data=str(test), out_dir=str(tmp_path / "eval"))
    m = evaluate(cfg, progress=lambda s: None)
    assert calls == [6 + len(general)]
    assert m["n_questions"] == 2 and m["accuracy"] == 1.0 and m["n_probes"] == 4 and m["skipped"] == {}
    g = m["general"]
    assert g["n"] == len(general) and g["skipped"] == 0 and g["source"] == "builtin:general"
    assert g["accuracy"] == pytest.approx(0.5, abs=0.05) and sum(c["n"] for c in g["by_category"].values()) == g["n"]
    preds = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 6 and all(json.loads(p)["kind"] != "general" for p in preds)
    assert len((tmp_path / "eval" / PREDICTIONS).read_text().splitlines()) == len(general)
    assert "general" not in evaluate(EvalConfig(data=str(test), out_dir=str(tmp_path / "off"), general=""),
                                     progress=lambda s: None)
