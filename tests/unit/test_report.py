"""The report builder (runtime/report) and the four methods' reports on made-up metrics: the lines
users and the integration tests read, the shared number format and the time-per-stage section."""
from __future__ import annotations

import copy
import json
import math

from kale_ray.runtime.report import Markdown, delta, dig, fmt

machine = {"cpus": 16, "platform": "Linux-x"}

def ev_kale(a):
    return {"accuracy": a, "accuracy_ci95": [a - 0.1, a + 0.1], "probe_accuracy": 0.7, "known_and_incorrect_rate": 0.2,
            "known_and_incorrect_given_known": 0.25, "n_questions": 40}
kale = {"eval": {"sft": ev_kale(0.5), "kale": ev_kale(0.575)}, "model": "builtin:tiny",
        "synthesis": {"kg": {"source": "builtin:umls", "entities": 135, "triples": 6000}, "rows_in": 40, "rows_out": 38,
                      "rejected": {"x": 2}, "teacher_counts": {"template": 38}, "teacher_rejected": None,
                      "tokens_generated": 0, "qa": {"train": 30, "test": 10}},
        "machine": machine,
        "train": {"sft": {"steps": 3, "final_loss": 1.23456, "samples_per_s": 4.5, "seconds_per_step": 0.5, "wall_seconds": 12.0},
                  "kale": {"steps": 3, "final_loss": None, "samples_per_s": 3, "seconds_per_step": 0.25, "wall_seconds": 13.5}},
        "timings": {"synthesis": 1.25, "train.sft": 10.0, "total_this_run": 30.55}}
kale2 = copy.deepcopy(kale); del kale2["eval"]["sft"]

def acc(a):
    return {"accuracy": a, "accuracy_ci95": [a - 0.1, a + 0.12], "parse_rate": 0.95, "n": 10}
kard = {"student": "builtin:tiny", "teacher": "builtin:tiny-t", "reranker_encoder": "minilm", "machine": machine,
        "questions": {"train": 30, "test": 10, "test_by_hops": {"2": 6, "3": 4}},
        "kb": {"passages": 500, "per_source": {"kg": 500}},
        "teacher_stage": {"rows": 70, "tokens": 1234}, "verifier": {"verifier": "model", "teacher_rationales_verified": 50,
                                                                   "rejected": {"wrong": 20}, "by_teacher": {"vllm:t": 50}},
        "student_rows": {"rows": 60, "by_teacher": {"vllm:t": 50, "template-fallback": 10}},
        "train": {"noknow": {"steps": 3, "first_loss": 2.5, "final_loss": 1.5, "seconds_per_step": 0.75},
                  "kard": {"steps": 3, "first_loss": 2.25, "final_loss": None, "seconds_per_step": 0.8}},
        "reranker_train": {"rows": 30, "steps": 4, "workers": 2, "first_loss": 0.123456, "final_loss": 0.1, "seconds_per_step": 0.3,
                           "skipped": {}},
        "reranker_eval": {"n": 9, "candidates": 20, "excluded": {"no_reference_rationale": 1},
                          "reference_by_teacher": {"vllm:t": 9}, "bm25_hit@1": 0.333, "bm25_hit@3": 0.5, "bm25_hit@10": 1.0,
                          "reranker_hit@1": 0.444, "reranker_hit@3": None, "reranker_hit@10": 1.0},
        "accuracy": {"a_no_knowledge": acc(0.3), "b_kard_bm25": acc(0.4), "c_kard_reranker": acc(0.5)},
        "timings": {"questions": 0.0, "kb": 2.5, "total_this_run": 10.25}, "reused_stages": ["questions"],
        "stage_seconds_when_run": {"questions": 1.5, "kb": 2.5}}
kard2 = copy.deepcopy(kard); kard2["reused_stages"] = []; kard2["reranker_eval"]["excluded"] = {}

def kc(x):
    return {d: {"mrr": x, "mr": 12.345, "hits@1": x / 2, "hits@3": x, "hits@10": x * 2, "n": 20} for d in ("tail", "head", "both")}
def kq(x):
    return {t: {"accuracy": x, "chance": 0.25, "n": 5, "parsed": 0.8} for t in ("tail", "head", "relation", "triple", "all")}
after = {"kg_completion": {**kc(0.2), "num_entities": 135}, "kgqa": kq(0.4), "seconds": {"embed": 1.25, "kgqa": 3.5}}
before = {"kg_completion": {**kc(0.1), "num_entities": 135}, "seconds": {"embed": 1.0}}
kalm = {"model": "builtin:tiny", "machine": machine,
        "data": {"kg": {"source": "builtin:umls"}, "entities": 135, "relations": 46, "train_triples": 32, "training_rows": 64,
                 "evaluated_test_triples": 20, "test_triples": 600},
        "train": {"steps": 4, "samples": 64, "seconds_per_step": 0.5, "wall_seconds": 8.25, "rejected": None},
        "train_first_step": {"loss": 3.0, "exp": 2.0, "lm": 1.0, "pos_cos": 0.1, "negatives": 7.0},
        "train_last_step": {"loss": 2.0, "exp": 1.5, "lm": 0.5, "pos_cos": 0.3, "negatives": 6.5},
        "eval": {"before": before, "after": after}, "timings": {"prepare": 1.0, "train": 9.0, "total_this_run": 12.0},
        "reused_stages": ["prepare"]}
kalm2 = copy.deepcopy(kalm); del kalm2["eval"]["before"]; kalm2["reused_stages"] = []; del kalm2["eval"]["after"]["kgqa"]
kalm2["train_first_step"] = None

def res(x):
    return {"answers": 2, "facts_per_answer": 3.5, "correct_facts_per_answer": x, "total_correct": 5, "total_incorrect": 2,
            "total_unverifiable": 1, "share_correct": 0.7, "factual_error_rate": 0.3, "unverifiable_share": float("nan"),
            "completeness": 0.5, "completeness_micro": None, "empty_answers": 0, "mean_answer_tokens": 40.25}
kt = {"student": "builtin:tiny", "teacher": "builtin:tiny-t", "machine": machine,
      "qa": {"kg": {"source": "builtin:hpo", "entities": 100, "triples": 900}, "train": 6, "test": 2, "facts_per_answer": 4.0},
      "stage1": {"atomic_facts": 20, "answers": 6, "facts_per_answer": 3.3333, "extract": {"by_extractor": {"teacher": 6}, "passes": 2,
                 "parsed_by_attempt": {"1": 5}, "rejected_by_reason": {}}, "perplexity": {"model": "tiny", "context": "question",
                 "mean": 12.5, "median": 10.0, "difficult_threshold": 15.0}, "alpha": 0.5, "scope": "global", "difficult": 10,
                 "rewrite": {"by_rewriter": {"teacher": 10}, "passes": 1, "rejected_by_reason": {}}, "rows": 16,
                 "seconds": {"extract": 1.5}},
      "stage2": {"pairs": {"pairs": 12, "by_kind": {"delete": 6}, "rejected": {}}, "train": {"steps": 2, "samples": 12, "first_loss": 0.69,
                 "final_loss": 0.6, "seconds_per_step": 0.5, "wall_seconds": 3.0}, "rewards_after": {"reward_accuracy": 0.75,
                 "reward_margin": 0.01234}, "seconds": {"pairs": 0.5, "train": 3.0}},
      "train": {"stage1": {"steps": 3, "samples": 16, "first_loss": 2.0, "final_loss": 1.0, "seconds_per_step": 0.4, "wall_seconds": 5.0}},
      "eval": {"results": {"stage1": res(1.5), "knowtuning": res(2.0)}, "questions": 2, "extract": {"by_extractor": {"sentences": 4}},
               "extract_rejected": None, "seconds": {"generate_wall": 4.0}},
      "timings": {"qa": 0.5, "stage1_data": 3.0, "total_this_run": 20.0}, "reused_stages": ["qa"]}
kt2 = copy.deepcopy(kt); kt2["stage2"] = {}; kt2["reused_stages"] = []



def test_fmt_delta_dig():
    assert fmt(None) == fmt(float("nan")) == fmt(math.inf) == "-"
    assert fmt(0.12345) == "0.123" and fmt(0.12345, 1) == "0.1" and fmt(3) == "3" and fmt("x") == "x"
    assert delta(0.1, 0.25) == "+0.150" and delta(None, 1.0) == "-" and delta(0.5, 0.25, 1) == "-0.2"
    assert dig({"a": {"b": 1}}, "a", "b") == 1 and dig({"a": {}}, "a", "b") is None and dig(None, "a") is None


def test_markdown_blocks_tables_and_timings(tmp_path):
    md = Markdown("T").para("one", "two").section("S").bullets(["x", "y"])
    md.table(["a", "b"], [["r", 0.5], ["s", None]])
    md.timings({"q": 1.25, "total_this_run": 3.0}, reused=["q"], extra=[("eval.gen", 0.5)])
    assert md.write(tmp_path).read_text() == (
        "# T\n\none\ntwo\n\n## S\n\n- x\n- y\n\n| a | b |\n|---|---|\n| r | 0.500 |\n| s | - |\n\n"
        "## Time per stage (s)\n\nStages reused from an earlier run show that run's time (reused here: q).\n\n"
        "| stage | seconds |\n|---|---|\n| q | 1.2 |\n| total_this_run | 3.0 |\n| eval.gen | 0.5 |\n")
    assert "reused" not in Markdown("T").timings({"q": 1.0}).text()
    two = Markdown("T").timings({"q": 0.0, "total_this_run": 2.0}, reused=[], when_run={"q": 1.5}).text()
    assert "This run; the second column" in two and "| q | 0.0 | 1.5 |" in two and "| total_this_run | 2.0 | - |" in two


def _report(tmp_path, write, *args):
    write(tmp_path, *args)
    return (tmp_path / "report.md").read_text()


def test_kale_report(tmp_path):
    from kale_ray.methods.kale.report import write_report

    r = _report(tmp_path, write_report, kale)
    assert r.startswith("# KALE demo report\n\nKG: `builtin:umls` (135 entities, 6000 triples)")
    assert "| kale | 0.575 | [0.475, 0.675] | 0.700 | 0.200 | 0.250 | 40 |" in r and "| sft |" in r
    assert "known & incorrect" in r and "KALE - SFT accuracy: **+7.5 points**" in r
    assert "- kale: 3 steps, final loss -, 3 samples/s, 0.250 s/step, 13.500 s" in r
    assert "| stage | seconds |\n|---|---|\n| synthesis | 1.2 |" in r and r.endswith("![plot](plot.png)\n")
    assert "KALE - SFT" not in _report(tmp_path, write_report, kale2)


def _general_metrics(a: float, n: int = 200) -> dict:
    return {"n": n, "accuracy": a, "accuracy_ci95": [a - 0.07, a + 0.07], "parse_rate": 0.9, "skipped": 0,
            "source": "builtin:general",
            "by_category": {"units": {"n": 28, "accuracy": a}, "history": {"n": 28, "accuracy": 0.25}}}


def test_the_report_has_the_general_ability_table(tmp_path):
    from kale_ray.methods.kale.report import write_report

    m = copy.deepcopy(kale)
    m["eval"] = {"base": ev_kale(0.3), **m["eval"]}
    for name, a in (("base", 0.41), ("sft", 0.4), ("kale", 0.375)):
        m["eval"][name]["general"] = _general_metrics(a)
    m["general"] = {"kale_minus_sft": {"n": 200, "diff": -0.025, "ci95": [-0.06, 0.01], "only_a_right": 12,
                                       "only_b_right": 7}}
    write_report(tmp_path, m)
    r = (tmp_path / "report.md").read_text()
    assert "## General ability (held-out general QA, never trained on)" in r
    assert "| model | accuracy [95% CI] | parse rate | n |" in r
    assert "| kale | 0.375 [0.305, 0.445] | 0.900 | 200 |" in r and "| base | 0.410 [0.340, 0.480] | 0.900 | 200 |" in r
    assert "KALE - SFT, paired per question: **-2.5 points** (95% CI [-6.0, +1.0], n=200" in r
    assert "| model | history | units |" in r and "| sft | 0.250 | 0.400 |" in r
    write_report(tmp_path, kale)
    assert "General ability" not in (tmp_path / "report.md").read_text()


def test_kard_report(tmp_path):
    from kale_ray.methods.kard.config import KARDJobConfig
    from kale_ray.methods.kard.report import write_report

    r = _report(tmp_path, write_report, kard, KARDJobConfig())
    assert r.startswith("# KARD report\n\nStudent `builtin:tiny`")
    assert "| (c) KARD | BM25 top-" in r and "| 0.500 | 0.400-0.620 | 0.95 |" in r
    assert "| ranking | hit@1 | hit@3 | hit@10 |" in r and "| reranker | 0.444 | - | 1.000 |" in r
    assert "(excluded: {'no_reference_rationale': 1})" in r
    assert "- student KARD: 3 steps, loss 2.250 -> -, 0.80 s/step" in r
    assert "loss 0.1235 -> 0.1000, 0.30 s/step; skipped none" in r
    assert "This run (reused: questions); the second column" in r and "| total_this_run | 10.2 | - |" in r
    r2 = _report(tmp_path, write_report, kard2, KARDJobConfig())
    assert "This run; the second column" in r2 and "(excluded: none)" in r2


def test_kalm_report(tmp_path):
    from kale_ray.methods.kalm.config import KaLMJobConfig
    from kale_ray.methods.kalm.report import write_report

    r = _report(tmp_path, write_report, kalm, KaLMJobConfig())
    assert "| both | MRR | 0.1000 | 0.2000 | +0.1000 |" in r and "| tail | MR | 12.3 | 12.3 | +0.0 |" in r
    assert "## KGQA" in r and "| triple | - | 0.400 | - | 0.250 | 5 |" in r and "| tail_open |" not in r
    assert "parse rate before -> after: tail - -> 0.80, head" in r
    assert "20 queries; a random ranking of 135 entities" in r
    assert "unmasked negatives per row 6.5" in r and "(reused here: prepare)." in r
    assert "| eval_after.kgqa | 3.5 |" in r and "| eval_before.embed | 1.0 |" in r
    r2 = _report(tmp_path, write_report, kalm2, KaLMJobConfig())
    assert "## KGQA" not in r2 and "| both | MRR | - | 0.2000 | - |" in r2 and "show that run's time.\n" in r2
    assert "loss - -> 2.0000" in r2


def test_knowtuning_report(tmp_path):
    from kale_ray.methods.knowtuning.report import write_report

    for label in ("stage1", "knowtuning"):
        (tmp_path / "eval" / label).mkdir(parents=True)
        rows = [{"question": f"Q{j}?", "generation": "A fact.\nAnother " + "x" * (450 * j),
                 "checks": [{"status": "correct"}] * j} for j in range(3)]
        (tmp_path / "eval" / label / "facts.jsonl").write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    r = _report(tmp_path, write_report, kt)
    assert "| metric | stage1 | knowtuning |\n|---|---|---|\n| answers | 2 | 2 |" in r and "factual error rate" in r
    assert "| total correct / incorrect / unverifiable | 5 / 2 / 1 | 5 / 2 / 1 |" in r
    assert "| unverifiable share (of all facts) | - | - |" in r and "| completeness (micro) | - | - |" in r
    assert "### Examples\n\n**Q0?**\n- stage1: \"A fact. Another \" -> no facts" in r
    assert "x" * 383 + "...\" -> correct" in r
    assert "| stage1 (sft) | 3 | 16 | 2.000 -> 1.000 | 0.40 | 5.0 |" in r
    assert "| stage2 (dpo) | 2 | 12 | 0.690 -> 0.600 | 0.50 | 3.0 |" in r and "margin 0.0123." in r
    assert "| stage1_data.extract | 1.5 |\n| stage2.pairs | 0.5 |" in r and "| eval.generate_wall | 4.0 |" in r
    r2 = _report(tmp_path, write_report, kt2)
    assert "| stage2 (dpo) | None | None | - -> - | - | - |" in r2 and "Stage II pairs: None (None)" in r2


def test_kale_gate_reads_sft_metrics():
    from kale_ray.methods.kale.metrics import gate

    shortcut = gate({"accuracy": 0.9, "probe_accuracy": 0.73, "known_and_incorrect_rate": 0.035, "n_with_probes": 9})
    assert not shortcut["multi_hop_at_most_hop_fact"] and not shortcut["passed"]
    good = gate({"accuracy": 0.5, "probe_accuracy": 0.8, "known_and_incorrect_rate": 0.2, "n_with_probes": 9})
    assert good["passed"] and good["known_and_incorrect_enough"]
    assert not gate({"accuracy": 0.5, "probe_accuracy": 0.8, "known_and_incorrect_rate": 0.05, "n_with_probes": 9})["passed"]
    assert gate(None) == {}


def test_kale_report_shows_the_gate_blind_baselines_and_hops(tmp_path):
    from kale_ray.methods.kale.metrics import gate
    from kale_ray.methods.kale.report import write_report

    m = json.loads(json.dumps(kale))
    m["eval"]["sft"]["known_and_incorrect_by_hops"] = {
        "2": {"accuracy": 0.5, "probe_accuracy": 0.75, "known_and_incorrect_rate": 0.25, "n_with_probes": 8}}
    m["eval"]["sft"]["n_with_probes"] = 40
    m["gate"] = gate(m["eval"]["sft"])
    m["question_blind"] = {"range": {"accuracy": 0.45, "chance": 0.25, "n": 40,
                                     "by_hops": {"2": {"accuracy": 0.5, "chance": 0.25, "n": 40}}}}
    r = _report(tmp_path, write_report, m)
    assert "## Testbed gate (SFT)" in r and "gate: " in r
    assert "| range | 0.450 | 0.250 | 0.500 | 40 |" in r
    assert "| sft | 0.500 / 0.750 / 0.250 (n=8) |" in r


def test_kale_gate_needs_hop_probes():
    from kale_ray.methods.kale.metrics import gate

    assert gate({"accuracy": 0.5, "probe_accuracy": 0.0, "known_and_incorrect_rate": 0.0, "n_with_probes": 0}) == {}
