"""KARD's ``report.md``: accuracy of (a) / (b) / (c) on the same held-out questions, the reranker
against BM25, the data, the training runs and the time per stage (built with
:class:`kale_ray.runtime.report.Markdown`)."""
from __future__ import annotations

from pathlib import Path

from kale_ray.methods.kard.config import KARDJobConfig
from kale_ray.runtime.report import Markdown, fmt


def write_report(out: Path, m: dict, cfg: KARDJobConfig) -> None:
    acc, v, rr, q = m["accuracy"], m["verifier"], m["reranker_eval"], m["questions"]
    tr, rt, rc, k = m["train"], m["reranker_train"], cfg.reranker, cfg.knowledge_passages
    md = Markdown("KARD report")
    md.para(f"Student `{m['student']}` (LoRA r={cfg.train.lora.r}, 'sft' loss on Explanation + Answer), teacher "
            f"`{m['teacher']}` ({cfg.teacher.num_rationales} rationales per training question, verifier: "
            f"{v['verifier']}), reranker `{m['reranker_encoder']}` (max-sim, LoRA r={rc.lora.r}, loss "
            f"{rc.loss}, t1={rc.t1}, t2={rc.t2}). Knowledge base: {m['kb']['passages']} passages "
            f"{m['kb']['per_source']}. KG `{cfg.kg.source}`; {q['train']} training questions, {q['test']} held-out "
            f"multiple-choice questions ({cfg.qa.num_choices} choices, by hops {q.get('test_by_hops')}). "
            f"Machine: {m['machine'].get('cpus')} CPUs.")
    md.section(f"Accuracy on the same {q['test']} held-out questions "
               f"({cfg.eval.num_samples} samples, majority vote, {k} passage(s))")
    variants = (("(a) student, reasoning distillation only", "a_no_knowledge", "none"),
                ("(b) KARD", "b_kard_bm25", f"BM25 top-{k} by question"),
                ("(c) KARD", "c_kard_reranker", f"BM25 top-{cfg.eval.retrieve_top} by question, reranked"))
    md.table(["model", "knowledge at inference", "accuracy", "95% CI", "parse rate"],
             [[label, know, fmt(acc[key]["accuracy"]), "-".join(fmt(x) for x in acc[key]["accuracy_ci95"]),
               fmt(acc[key]["parse_rate"], 2)] for label, key, know in variants])
    md.para(f"Chance is {1 / cfg.qa.num_choices:.3f}. One seed; differences inside overlapping CIs are not evidence.")
    md.section("Reranker vs BM25 (the rationale-best passage among the question's BM25 candidates)")
    md.para(f"For each held-out question, the reference is its verified teacher rationale (or the template "
            f"fallback: {rr.get('reference_by_teacher')}); the gold passage is the candidate with the highest BM25 "
            f"score against it, among BM25's top-{rr['candidates']} by question. n={rr['n']} "
            f"(excluded: {rr.get('excluded') or 'none'}).")
    md.table(["ranking", "hit@1", "hit@3", "hit@10"],
             [[label] + [fmt(rr.get(f"{name}_hit@{n}")) for n in (1, 3, 10)]
              for name, label in (("bm25", "BM25 by question"), ("reranker", "reranker"))])
    md.section("Data")
    md.bullets([f"teacher: {m['teacher_stage']['rows']} generations ({m['teacher_stage']['tokens']} tokens); "
                f"verified teacher rationales kept: {v['teacher_rationales_verified']}; rejected by reason: "
                f"{v['rejected'] or 'none'}",
                f"kept rationales by source: {v['by_teacher']} (template-fallback = the exact KG chain, used when "
                "no teacher rationale passed)",
                f"student rows: {m['student_rows']['rows']} ({m['student_rows']['by_teacher']})"])
    md.section("Training")
    md.bullets([*(f"{label}: {tr[name]['steps']} steps, loss {fmt(tr[name]['first_loss'])} -> "
                  f"{fmt(tr[name]['final_loss'])}, {fmt(tr[name]['seconds_per_step'], 2)} s/step"
                  for name, label in (("noknow", "student (a) no knowledge"), ("kard", "student KARD"))),
                f"reranker: {rt['rows']} questions, {rt['steps']} steps on {rt['workers']} Ray Train workers, loss "
                f"{fmt(rt['first_loss'], 4)} -> {fmt(rt['final_loss'], 4)}, {fmt(rt['seconds_per_step'], 2)} s/step; "
                f"skipped {rt.get('skipped') or 'none'}"])
    md.timings(m["timings"], reused=m["reused_stages"], when_run=m["stage_seconds_when_run"])
    md.write(out)
