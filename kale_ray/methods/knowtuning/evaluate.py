"""Fact-level evaluation of KnowTuning: ``evaluate_facts(cfg, test_qas, models, out)``.

For every model: greedy answers to the held-out questions through vLLM (the student's own chat
template, the prompt Stage I and II trained on) -> ``out/<label>/generations.jsonl``. Then one
teacher pass splits every answer of every model into atomic facts (``eval.extractor: teacher``;
an answer whose extraction is rejected is split into sentences, counted), each fact is checked
against the KG (:class:`~kale_ray.methods.knowtuning.factcheck.FactChecker`) -> ``out/<label>/facts.jsonl``,
and the per-model metrics -> ``out/metrics.json``. A model whose generations exist is not
generated again.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from kale_ray.core.prompts import render_chat
from kale_ray.core.rejects import Rejects
from kale_ray.methods.knowtuning import atomic
from kale_ray.methods.knowtuning.data import long_form_messages
from kale_ray.methods.knowtuning.factcheck import FactChecker, aggregate, answer_metrics
from kale_ray.core.io import read_jsonl, write_jsonl
from kale_ray.methods.knowtuning.stage1 import extract_facts, load_kg_cached


def generate_answers(qas: Sequence[dict], model_path: str, cfg, label: str, out: Path,
                     progress: Callable[[str], None]) -> dict[str, dict]:
    from kale_ray.models import load_tokenizer
    from kale_ray.runtime.generate import generate

    path = out / label / "generations.jsonl"
    # A killed evaluation resumes here (its Run.stage record matched); other settings never reach
    # this folder: the stage is refused or its folder deleted first.
    if path.exists():
        return {r["id"]: r for r in read_jsonl(path)}
    t0 = time.perf_counter()
    mcfg = dataclasses.replace(cfg.stage1.train.model, name=model_path)
    tok = load_tokenizer(model_path, mcfg.trust_remote_code)
    rows = [{"key": q["id"], "prompt": render_chat(long_form_messages(q["question"]), tok)} for q in qas]
    gen = dataclasses.replace(cfg.eval.generation, backend="vllm")
    got = generate(rows, model_path, gen, mcfg, tokenizer=tok)
    res = [{"id": q["id"], "question": q["question"], "generation": got[q["id"]]["text"].strip(),
            "tokens": got[q["id"]]["tokens"], "error": got[q["id"]]["error"]} for q in qas]
    write_jsonl(path, res)
    progress(f"[eval:{label}] {len(res)} answers generated in {time.perf_counter() - t0:.0f}s")
    return {r["id"]: r for r in res}


def evaluate_facts(cfg, test_qas: Sequence[dict], models: Mapping[str, str], out: Path,
                   progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Per model label: answers, atomic facts, KG checks and :func:`~kale_ray.methods.knowtuning.factcheck.aggregate`."""
    ev = cfg.eval
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    rejects = Rejects()
    qas = [q for q in test_qas if q.get("subject")]
    for q in test_qas:
        if not q.get("subject"):
            rejects.add("no_subject", id=q["id"], step="eval")
    if ev.max_questions:
        qas = qas[: ev.max_questions]
    gens: dict[str, dict[str, dict]] = {}

    def run(label: str) -> tuple[str, dict, float]:
        t = time.perf_counter()
        return label, generate_answers(qas, models[label], cfg, label, out, progress), time.perf_counter() - t

    t0 = time.perf_counter()
    if ev.parallel_models and len(models) > 1:
        # one vLLM engine per model at the same time: their start-up (most of a small eval) overlaps
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(models)) as pool:
            done = list(pool.map(run, list(models)))
    else:
        done = [run(label) for label in models]
    for label, got, secs in done:
        gens[label] = got
        seconds[f"generate_{label}"] = round(secs, 2)
    seconds["generate_wall"] = round(time.perf_counter() - t0, 2)

    # one extraction pass over every model's answers
    t0 = time.perf_counter()
    pseudo = [{"id": f"{label}|{q['id']}", "question": q["question"]} for label in models for q in qas]
    answers = {f"{label}|{q['id']}": gens[label][q["id"]]["generation"] for label in models for q in qas}
    if ev.extractor == "teacher":
        extracted, ex_rejects, ex_stats = extract_facts(pseudo, cfg, "eval:extract", progress, answers=answers,
                                                        step=ev.extract, fallback="sentences")
    else:
        ex_rejects = Rejects()
        extracted = {k: {"facts": atomic.split_sentences(v), "extractor": "sentences"} for k, v in answers.items()}
        ex_stats = {"items": len(answers), "backend": "sentences"}
    seconds["extract"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    kg = load_kg_cached(cfg.qa.kg)
    checker = FactChecker(kg, ev.min_surface_chars, ev.match_relation)
    results: dict[str, Any] = {}
    for label in models:
        per_answer, rows = [], []
        for q in qas:
            key = f"{label}|{q['id']}"
            facts = extracted.get(key, {}).get("facts", [])
            checks = [checker.check(f, q["subject"]) for f in facts]
            m = answer_metrics(checks, [f["triple"] for f in q["facts"] if f.get("triple")], q["subject"])
            per_answer.append(m)
            rows.append({"id": q["id"], "question": q["question"], "subject": q["subject"],
                         "generation": gens[label][q["id"]]["generation"],
                         "extractor": extracted.get(key, {}).get("extractor", "none"),
                         "checks": [c.to_dict() for c in checks], **m})
        write_jsonl(out / label / "facts.jsonl", rows)
        agg = aggregate(per_answer)
        agg["generation_errors"] = sum(1 for r in gens[label].values() if r["error"])
        agg["empty_answers"] = sum(1 for r in gens[label].values() if not r["generation"])
        agg["mean_answer_tokens"] = (sum(r["tokens"] for r in gens[label].values()) / len(gens[label])
                                     if gens[label] else 0.0)
        agg["by_extractor"] = {k: sum(1 for r in rows if r["extractor"] == k) for k in {r["extractor"] for r in rows}}
        results[label] = agg
    seconds["check"] = round(time.perf_counter() - t0, 2)
    ex_rejects.write_jsonl(out / "extract_rejects.jsonl")
    metrics = {"questions": len(qas), "models": dict(models), "extract": ex_stats,
               "extract_rejected": ex_rejects.counts(), "rejected": rejects.counts(), "results": results,
               "seconds": seconds}
    return metrics
