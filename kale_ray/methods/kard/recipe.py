"""KARD end to end: ``run_kard(cfg)``.

    kale-ray kard --config configs/kard_umls.yaml

1. questions: generated multi-hop multiple-choice questions from the KG (or users' QA files) -> ``out/qa/``
2. knowledge base: passages (KG neighbourhoods, HPO terms, users' JSONL) + BM25 index -> ``out/kb/``
3. teacher: vLLM through Ray Data writes ``teacher.num_rationales`` rationales per training question
   given the gold answer (one per test question, the reference for the reranker's hit@k) -> ``out/teacher/``
4. verifier: a model reading question + rationale must put the highest likelihood on the gold choice
   (Ray Data actor); rejects with reasons; template fallback flagged -> ``out/rationales/``
5. retrieval (Ray Data, BM25): rationale -> knowledge for training; question -> reranker candidates
6. students on Ray Train + DeepSpeed ('sft' loss): (a) Question -> Explanation + Answer,
   KARD: Question + Knowledge -> Explanation + Answer, same rationales / steps / seed -> ``out/student_*``
7. reranker on Ray Train: max-sim MiniLM + LoRA, KL to the BM25-vs-rationale distribution -> ``out/reranker/``
8. inference + evaluation on the held-out questions: BM25 top-N by question -> rerank -> top passage(s)
   -> student samples -> majority vote: (a) no knowledge, (b) KARD + BM25, (c) KARD + reranker;
   reranker hit@1/3 vs BM25 -> ``out/eval/``, ``out/metrics.json``, ``out/report.md``

Each stage is a ``Run.stage`` (kale_ray.runtime.stages): it writes its files under ``out`` and returns
a small info dict; what later stages need is read back from those files (the same path whether the
stage ran or was reused). A rerun with the same settings reuses finished stages; with other settings
it stops at the first changed stage naming the keys (or, with ``on_change=overwrite``, redoes that
stage and every later one).

The stages themselves (and the helpers naming what decides each) are in
:mod:`kale_ray.methods.kard.stages`; the report in :mod:`kale_ray.methods.kard.report`.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

from kale_ray.config import to_dict
from kale_ray.core.io import read_jsonl, write_json
from kale_ray.methods.kard import stages
from kale_ray.methods.kard.config import KARDJobConfig
from kale_ray.methods.kard.rerank_train import NOT_OUTPUT_SETTINGS as RERANKER_NOT_OUTPUT
from kale_ray.methods.kard.report import write_report
from kale_ray.runtime.stages import Run, without


def run_kard(cfg: KARDJobConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    from kale_ray.core.kg import load_kg
    from kale_ray.runtime.report import machine_info
    from kale_ray.train.trainer import stage_settings

    out = Path(cfg.out).expanduser().resolve()
    run = Run(out, cfg, on_change=cfg.on_change, progress=progress, label="kard")
    kg = functools.cache(lambda: load_kg(cfg.kg.source, cfg.kg.names, cfg.kg.on_error))  # only if a stage runs
    qa, ev, rc, tc = cfg.qa, cfg.eval, cfg.reranker, cfg.teacher

    qa_info = run.stage("questions", lambda: stages.stage_questions(cfg, kg(), out, progress), outputs=["qa"],
                        settings={"qa": to_dict(qa), "kg": to_dict(cfg.kg), "eval.max_questions": ev.max_questions,
                                  "max_train_questions": cfg.max_train_questions},
                        inputs=stages.user_files(qa.source, qa.test_file, cfg.kg.source, cfg.kg.names))
    train, test = stages.read_questions(out)
    kb_info = run.stage("kb", lambda: stages.stage_kb(cfg, kg(), out, progress), settings=to_dict(cfg.kb),
                        inputs=stages.user_files(*cfg.kb.sources), outputs=["kb"])
    passages = read_jsonl(out / "kb" / "passages.jsonl")
    teacher_info = run.stage("teacher", lambda: stages.stage_teacher(cfg, train, test, out, progress),
                             settings={"model": stages.model_settings(tc.model),
                                       "generation": stages.gen_settings(tc.generation),
                                       "num_rationales": tc.num_rationales}, outputs=["teacher"])
    gens = read_jsonl(out / "teacher" / "generations.jsonl")
    verify_info = run.stage("verify", lambda: stages.stage_verify(cfg, kg(), train, test, gens, out, progress),
                            settings={"verifier": tc.verifier, "length_normalise": tc.length_normalise,
                                      "verifier_model": tc.verifier_model and stages.model_settings(tc.verifier_model),
                                      "require_mention": tc.require_mention,
                                      "fallback_to_template": tc.fallback_to_template},
                            outputs=["rationales"])
    kept = stages.read_kept(out)
    retr_info = run.stage("retrieval", lambda: stages.stage_retrieval(cfg, train, test, kept, out, progress),
                          settings={"knowledge_passages": cfg.knowledge_passages, "retrieve_top": ev.retrieve_top,
                                    "candidates_by_rationale": rc.candidates_by_rationale,
                                    "candidates_by_question": rc.candidates_by_question},
                          outputs=["retrieval"])
    retrieval = json.loads((out / "retrieval" / "retrieval.json").read_text())
    rows_info = run.stage("student_rows", lambda: stages.stage_student_rows(cfg, train, kept, passages, retrieval, out),
                          settings={"knowledge_passages": cfg.knowledge_passages, "model": cfg.train.model.name,
                                    "trust_remote_code": cfg.train.model.trust_remote_code},
                          outputs=["rows"])
    trained = {name: run.stage(f"train_{name}", lambda name=name: stages.stage_train_student(cfg, name, out, progress),
                               settings=stage_settings(stages.train_config(cfg, name, out), f"kard-{name}"),
                               outputs=[f"student_{name}"])
               for name in ("noknow", "kard")}
    rr_info = run.stage("reranker", lambda: stages.stage_reranker(cfg, train, kept, passages, retrieval, out, progress),
                        settings={**without(to_dict(rc), RERANKER_NOT_OUTPUT), "use_gpu": cfg.train.use_gpu},
                        outputs=["reranker"])
    rr_eval = run.stage("rerank_test",
                        lambda: stages.stage_test_knowledge(cfg, test, kept, passages, retrieval, out, progress),
                        settings={"retrieve_top": ev.retrieve_top}, outputs=["eval/knowledge"])
    knowledge = read_jsonl(out / "eval" / "knowledge" / "knowledge.jsonl")
    evals = {}
    for name, variants in (("noknow", ["none"]), ("kard", ["bm25", "reranker"])):
        evals[name] = run.stage(
            f"eval_{name}", lambda name=name, variants=variants: stages.stage_eval(
                cfg, name, str(out / f"student_{name}" / "merged"), test, passages, knowledge, variants, out, progress),
            settings={"eval": without(to_dict(ev), [f"generation.{k}" for k in stages.GEN_NOT_OUTPUT]),
                      "knowledge_passages": cfg.knowledge_passages, "model": stages.model_settings(cfg.train.model),
                      "variants": variants},
            outputs=[f"eval/{name}"])
    ev_a, ev_k = evals["noknow"], evals["kard"]
    timings = {name: (run.seconds[name] if name in run.ran else 0.0) for name in run.seconds}
    timings["total_this_run"] = round(run.total_seconds(), 2)

    metrics = {
        "student": cfg.train.model.name, "teacher": tc.model.name, "reranker_encoder": rc.model,
        "machine": machine_info(),
        "questions": qa_info, "kb": kb_info, "teacher_stage": teacher_info, "verifier": verify_info,
        "retrieval": retr_info, "student_rows": rows_info,
        "train": {name: {k: t.get(k) for k in stages.TRAIN_SUMMARY} for name, t in trained.items()},
        "reranker_train": rr_info, "reranker_eval": rr_eval,
        "accuracy": {"a_no_knowledge": ev_a["variants"]["none"], "b_kard_bm25": ev_k["variants"]["bm25"],
                     "c_kard_reranker": ev_k["variants"]["reranker"]},
        "eval": evals,
        "timings": timings, "reused_stages": list(run.reused),
        "stage_seconds_when_run": dict(run.seconds),
    }
    write_json(out / "metrics.json", metrics)
    write_report(out, metrics, cfg)
    acc = metrics["accuracy"]
    progress(f"[kard] done in {timings['total_this_run'] / 60:.1f} min: accuracy "
             f"(a) {acc['a_no_knowledge']['accuracy']:.3f}, (b) {acc['b_kard_bm25']['accuracy']:.3f}, "
             f"(c) {acc['c_kard_reranker']['accuracy']:.3f}; "
             f"report: {out / 'report.md'}")
    return metrics
