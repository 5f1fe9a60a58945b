"""KnowTuning end to end: ``run_knowtuning(cfg)``.

    kale-ray knowtuning --config configs/knowtuning_hpo.yaml

1. **qa**: long-form questions from the KG (or a user's file), each answer with the facts it was
   built from; a seeded held-out split -> ``out/qa/{train,test}.jsonl``
2. **stage1 data** (:mod:`kale_ray.methods.knowtuning.stage1`): atomic facts (teacher), perplexity under
   the student, the alpha most difficult facts, rewritten QA around them -> ``out/stage1/data/``
3. **baseline**: SFT on the original QA only -> ``out/baseline/train/`` (``baseline: sft``)
4. **stage1**: SFT on original + rewritten QA (shuffled together, ``out/stage1/train_rows/``) -> ``out/stage1/train/``
5. **stage2**: comparison pairs (delete / KG-exact revise / shuffle) and DPO from the Stage I model,
   reference precomputed once (:func:`kale_ray.methods.knowtuning.recipe.run_dpo_stage`) -> ``out/stage2/``
6. **eval** (:mod:`kale_ray.methods.knowtuning.evaluate`): answers to the held-out questions by SFT and
   KnowTuning, atomic facts, KG checks -> ``out/eval/``
7. ``out/metrics.json`` and ``out/report.md``: the fact-level metrics side by side, the
   rejects of every step by reason, and the time of every stage.

Each step is a stage of a :class:`~kale_ray.runtime.stages.Run` over ``out`` (its settings and their
hash, chained through the earlier stages, under ``out/stages/``): a rerun with the same settings
reuses every finished stage; one with other settings stops before writing anything, naming the
changed keys (``on_change: error``), or redoes the first changed stage and every later one
(``on_change: overwrite``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kale_ray.config import to_dict
from kale_ray.core.io import read_jsonl, write_json, write_jsonl
from kale_ray.core.rejects import Rejects
from kale_ray.methods.knowtuning.config import KnowTuningDPOJobConfig, KnowTuningJobConfig, PairsConfig
from kale_ray.runtime.stages import without
from kale_ray.runtime.ray import init_ray_for

# Settings that change how fast a generation goes, not what it writes (as in kale_ray.synth.pipeline).
_GEN_SPEED = ("batch_size", "concurrency", "max_concurrency", "http_timeout_s", "num_gpus_per_replica",
              "gpu_memory_utilization", "tensor_parallel_size", "pipeline_parallel_size")
_STAGE1_DATA_OUTPUTS = ["stage1/facts.jsonl", "stage1/facts_rejects.jsonl", "stage1/ppl.jsonl", "stage1/rewrites.jsonl",
                        "stage1/rewrite_rejects.jsonl", "stage1/data", "stage1/summary.json"]


# --------------------------------------------------------------------------- settings per stage


def _teacher_settings(cfg: KnowTuningJobConfig) -> dict[str, Any]:
    """What of the teacher decides a teacher step's output (nothing with the template backend)."""
    if cfg.generation.backend == "template":
        return {"backend": "template"}
    return {"model": without(to_dict(cfg.teacher), ["cache_dir"]), "generation": without(to_dict(cfg.generation),
                                                                                         _GEN_SPEED)}


def qa_settings(cfg: KnowTuningJobConfig) -> dict[str, Any]:
    settings: dict[str, Any] = {"qa": to_dict(cfg.qa)}
    if cfg.qa.answers == "teacher" and cfg.generation.backend != "template":
        x = cfg.stage1.extract
        settings["teacher"] = {**_teacher_settings(cfg), "max_attempts": x.max_attempts,
                               "retry_temperature": x.retry_temperature, "max_tokens": x.max_tokens}
    return settings


def stage1_data_settings(cfg: KnowTuningJobConfig) -> dict[str, Any]:
    s1 = cfg.stage1
    return {"stage1": without(to_dict(s1), ["train", "ppl_batch_size", "ppl_with"]),
            "student": {"model": without(to_dict(s1.train.model), ["cache_dir"]), "max_seq_len": s1.train.max_seq_len},
            "teacher": _teacher_settings(cfg)}


def stage2_settings(cfg: KnowTuningJobConfig) -> dict[str, Any]:
    """Stage II's config (its own stages record the rest under ``out/stage2/stages/``)."""
    from kale_ray.train.trainer import _NOT_OUTPUT_SETTINGS

    return without(to_dict(cfg.stage2), ["reference_with", *[f"train.{k}" for k in _NOT_OUTPUT_SETTINGS
                                                             if k != "max_steps"]])


def eval_settings(cfg: KnowTuningJobConfig, models: dict[str, str]) -> dict[str, Any]:
    return {"eval": without(to_dict(cfg.eval), ["parallel_models", *[f"generation.{k}" for k in _GEN_SPEED]]),
            "models": sorted(models), "teacher": _teacher_settings(cfg) if cfg.eval.extractor == "teacher" else None}


# --------------------------------------------------------------------------- stages


def build_qa(cfg: KnowTuningJobConfig, out: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """Questions + reference facts -> ``out/qa/``; teacher-written answers with ``qa.answers: teacher``."""
    from kale_ray.methods.knowtuning import atomic
    from kale_ray.methods.knowtuning.longform import kg_long_form_qa, read_long_form_jsonl, split_qa
    from kale_ray.methods.knowtuning.stage1 import load_kg_cached

    q = cfg.qa
    kg = load_kg_cached(q.kg)
    rejects = Rejects()
    if q.source == "kg":
        qas = kg_long_form_qa(kg, q.num_questions, q.facts_per_answer, np.random.default_rng([q.seed, 0]),
                              q.relations, q.min_facts, q.max_facts, q.question_template)
    else:
        qas = read_long_form_jsonl(q.source, kg, rejects)
    if q.test_file:
        train = qas
        test = read_long_form_jsonl(q.test_file, kg, rejects, prefix="test-")
    else:
        train, test = split_qa(qas, q.test_fraction, q.seed)
    if len(train) < 2:
        raise ValueError(f"{len(train)} training questions (rejected: {rejects.counts()}); KnowTuning needs >= 2")
    answer_stats: dict[str, Any] = {"mode": q.answers}
    if q.answers == "teacher" and cfg.generation.backend != "template":
        from kale_ray.methods.knowtuning.teacher import teacher_step

        init_ray_for(cfg)
        items = [{"key": x["id"], "facts": [f["text"] for f in x["facts"]],
                  "messages": atomic.answer_messages(x["question"], [f["text"] for f in x["facts"]])} for x in train]
        res = teacher_step(items, lambda it, text: atomic.parse_long_answer(text, it["facts"]), cfg.teacher,
                           cfg.generation, cfg.stage1.extract.max_attempts, cfg.stage1.extract.retry_temperature,
                           cfg.stage1.extract.max_tokens, None, "qa:answers", progress)
        for x in train:
            x["answer_source"] = "teacher" if x["id"] in res.parsed else "template-fallback"
            x["answer"] = res.parsed.get(x["id"], x["answer"])
        for r in res.rejected:
            rejects.add(r["reason"], id=r["key"], step="answers", generation=r.get("generation", ""))
        answer_stats.update(res.stats, by_source=dict(Counter(x["answer_source"] for x in train)))
    write_jsonl(out / "qa" / "train.jsonl", train)
    write_jsonl(out / "qa" / "test.jsonl", test)
    # Stage II's pair builder reads {id, question, facts: [{text, triple}]}
    write_jsonl(out / "qa" / "train_facts.jsonl", [{"id": x["id"], "question": x["question"], "facts": x["facts"]}
                                                   for x in train])
    rejects.write_jsonl(out / "qa" / "rejects.jsonl")
    summary = {"source": q.source, "kg": kg.summary(), "train": len(train), "test": len(test),
               "facts_per_answer": float(np.mean([len(x["facts"]) for x in train + test])),
               "with_subject": sum(1 for x in train + test if x.get("subject")), "answers": answer_stats,
               "rejected": rejects.counts(), "example": train[0]}
    write_json(out / "qa" / "summary.json", summary)
    return summary


def _train(cfg: KnowTuningJobConfig, tcfg, run_name: str, progress: Callable[[str], None]) -> dict[str, Any]:
    """One SFT run of ``tcfg`` (data and out_dir set): its summary and merged model."""
    from kale_ray.methods.knowtuning.recipe import TRAIN_SUMMARY_KEYS
    from kale_ray.train.trainer import run_training

    init_ray_for(cfg)
    progress(f"[knowtuning] {run_name}: {tcfg.loss} on Ray Train + DeepSpeed ZeRO-{tcfg.zero_stage}, "
             f"{tcfg.num_workers} workers")
    res = run_training(tcfg, run_name=run_name)
    return {"summary": {k: res.summary.get(k) for k in TRAIN_SUMMARY_KEYS}, "merged": res.merged_dir}


def _model(merged: str | None, what: str, where: Path) -> str:
    if not merged or not Path(merged).exists():
        raise RuntimeError(f"{what}: no merged model under {where} (set save_merged=true)")
    return merged


def write_baseline_rows(out: Path) -> dict[str, int]:
    """The baseline's SFT rows: the original QA only."""
    rows = read_jsonl(out / "stage1" / "data" / "train.jsonl")
    return {"rows": write_jsonl(out / "baseline" / "data" / "train.jsonl", [r for r in rows if r["kind"] == "original"])}


def write_stage1_rows(cfg: KnowTuningJobConfig, out: Path) -> dict[str, int]:
    """Stage I's SFT rows. The trainer keeps the rows' order (a resume skips exactly the rows it trained
    on), so original and rewritten QA are mixed here, with a seeded shuffle: else the rewrites would all
    come last."""
    rows = read_jsonl(out / "stage1" / "data" / "train.jsonl")
    order = np.random.default_rng([cfg.stage1.train.seed, 2]).permutation(len(rows))
    return {"rows": write_jsonl(out / "stage1" / "train_rows" / "train.jsonl", [rows[i] for i in order])}


def dpo_config(cfg: KnowTuningJobConfig, out: Path, stage1_merged: str) -> KnowTuningDPOJobConfig:
    """Stage II's job: pairs from the training QA's facts, DPO from the Stage I model."""
    s2 = cfg.stage2
    return KnowTuningDPOJobConfig(
        out=str(out / "stage2"),
        pairs=PairsConfig(kg=cfg.qa.kg, source=str(out / "qa" / "train_facts.jsonl"), beta=s2.beta,
                          kinds=list(s2.kinds), seed=cfg.qa.seed),
        train=dataclasses.replace(copy.deepcopy(s2.train),
                                  model=dataclasses.replace(s2.train.model, name=stage1_merged)),
        reference_batch_size=s2.reference_batch_size, reference_with=s2.reference_with, score_after=s2.score_after,
        ray_address=cfg.ray_address, on_change=cfg.on_change)


def run_knowtuning(cfg: KnowTuningJobConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    from kale_ray.methods.knowtuning.evaluate import evaluate_facts
    from kale_ray.methods.knowtuning.recipe import run_dpo_stage, train_on_change, train_settings
    from kale_ray.methods.knowtuning.stage1 import build_stage1_rows
    from kale_ray.models import resolve_model
    from kale_ray.runtime.report import machine_info
    from kale_ray.runtime.stages import Run

    out = Path(cfg.out).expanduser().resolve()
    run = Run(out, cfg, on_change=cfg.on_change, stop_after=cfg.stop_after, progress=progress, label="knowtuning")

    def result(**parts: Any) -> dict[str, Any]:
        return {**parts, "timings": run.timings(), "reused_stages": run.reused}

    def stage1_data() -> dict:
        init_ray_for(cfg)
        info = build_stage1_rows(cfg, read_jsonl(out / "qa" / "train.jsonl"), out / "stage1", progress)
        write_json(out / "stage1" / "summary.json", info)
        return info

    def train_cfg(tcfg, data: str, to: str):
        return dataclasses.replace(copy.deepcopy(tcfg), data=str(out / data), out_dir=str(out / to),
                                   on_change=train_on_change(cfg.on_change, tcfg))

    def train(name: str, tcfg, run_name: str, to: str) -> dict:
        return run.stage(name, lambda: _train(cfg, tcfg, run_name, progress), settings=train_settings(tcfg, run_name),
                         outputs=[to])

    def dpo_stage() -> dict:
        init_ray_for(cfg)
        progress("[knowtuning] stage2: comparison pairs -> reference pass -> DPO")
        return run_dpo_stage(dpo_cfg, progress)

    def evaluate() -> dict:
        init_ray_for(cfg)
        ev = evaluate_facts(cfg, read_jsonl(out / "qa" / "test.jsonl"), models, out / "eval", progress)
        write_json(out / "eval" / "metrics.json", ev)
        return ev

    qa_files = [f for f in (None if cfg.qa.source == "kg" else cfg.qa.source, cfg.qa.test_file) if f]
    qa = run.stage("qa", lambda: build_qa(cfg, out, progress), settings=qa_settings(cfg), content_inputs=qa_files,
                   outputs=["qa"])
    progress(f"[knowtuning] {qa['train']} training / {qa['test']} held-out long-form questions")
    if run.stops_after("qa"):
        return result(qa=qa)
    s1 = run.stage("stage1_data", stage1_data, settings=stage1_data_settings(cfg), outputs=_STAGE1_DATA_OUTPUTS)
    if run.stops_after("stage1_data"):
        return result(qa=qa, stage1=s1)

    models: dict[str, str] = {}
    if cfg.eval.include_base:
        models["base"] = resolve_model(cfg.stage1.train.model.name, cfg.stage1.train.model.cache_dir)
    trained: dict[str, dict] = {}
    if cfg.baseline == "sft":  # beside Stage I (after its data): switching the baseline on or off redoes only eval
        run.stage("baseline_rows", lambda: write_baseline_rows(out), settings={}, outputs=["baseline/data"],
                  after="stage1_data")
        t = train("baseline_sft", train_cfg(cfg.stage1.train, "baseline/data", "baseline/train"), "baseline_sft",
                  "baseline/train")
        trained["sft"], models["sft"] = t["summary"], _model(t["merged"], "baseline_sft", out / "baseline" / "train")
    run.stage("stage1_rows", lambda: write_stage1_rows(cfg, out), settings={"seed": cfg.stage1.train.seed},
              outputs=["stage1/train_rows"], after="stage1_data")
    t = train("stage1_train", train_cfg(cfg.stage1.train, "stage1/train_rows", "stage1/train"), "stage1",
              "stage1/train")
    trained["stage1"], stage1_merged = t["summary"], _model(t["merged"], "stage1", out / "stage1" / "train")
    if cfg.baseline == "none":
        models["stage1"] = stage1_merged
    if run.stops_after("stage1"):
        return result(qa=qa, stage1=s1, train=trained, models=models)

    dpo_cfg = dpo_config(cfg, out, stage1_merged)
    stage2 = run.stage("stage2", dpo_stage, settings=stage2_settings(cfg), outputs=["stage2"], after="stage1_train")
    models["knowtuning"] = _model(stage2.get("merged"), "stage2", out / "stage2")
    if run.stops_after("stage2"):
        return result(qa=qa, stage1=s1, train=trained, stage2=stage2, models=models)

    ev = run.stage("eval", evaluate, settings=eval_settings(cfg, models), outputs=["eval"],
                   after=["qa", "stage2", *(["baseline_sft"] if "sft" in models else [])])
    timings = run.timings()
    metrics = {
        "teacher": cfg.teacher.name, "student": cfg.stage1.train.model.name, "machine": machine_info(),
        "qa": {k: v for k, v in qa.items() if k != "example"}, "qa_example": qa.get("example"),
        "stage1": s1, "train": trained,
        "stage2": {k: stage2.get(k) for k in ("pairs", "reference", "train", "rewards_after", "seconds")},
        "eval": ev, "timings": timings, "reused_stages": run.reused,
    }
    write_json(out / "metrics.json", metrics)
    write_report(out, metrics)
    res = ev["results"]
    progress("[knowtuning] done in {:.1f} min; ".format(timings["total_this_run"] / 60) + "; ".join(
        f"{k}: {v['correct_facts_per_answer']:.2f} correct facts/answer, error rate {v['factual_error_rate']:.3f}"
        for k, v in res.items()) + f"; report: {out / 'report.md'}")
    return metrics


# --------------------------------------------------------------------------- report


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _examples(eval_dir: Path, labels: list[str], n: int = 2) -> list[str]:
    """The first ``n`` held-out questions: each model's answer and the verdict on each of its facts."""
    per = {}
    for label in labels:
        path = eval_dir / label / "facts.jsonl"
        if path.exists():
            per[label] = [json.loads(x) for x in path.read_text().splitlines()[:n] if x.strip()]
    if not per:
        return []
    lines = ["### Examples", ""]
    for i in range(min(len(v) for v in per.values())):
        first = next(iter(per.values()))[i]
        lines.append(f"**{first['question']}**")
        for label, rows in per.items():
            r = rows[i]
            verdicts = ", ".join(f"{f['status']}" for f in r["checks"]) or "no facts"
            text = r["generation"].replace("\n", " ")
            lines.append(f"- {label}: \"{text[:400]}{'...' if len(text) > 400 else ''}\" -> {verdicts}")
        lines.append("")
    return lines


def write_report(out: Path, m: dict[str, Any]) -> None:
    ev, qa, s1, s2 = m["eval"], m["qa"], m["stage1"], m["stage2"]
    labels = list(ev["results"])
    rows = [("answers", "answers", 0), ("atomic facts per answer", "facts_per_answer", 2),
            ("**# correct facts per answer**", "correct_facts_per_answer", 2),
            ("total correct / incorrect / unverifiable", None, 0),
            ("**share correct** (of verifiable)", "share_correct", 3),
            ("**factual error rate** (of verifiable)", "factual_error_rate", 3),
            ("unverifiable share (of all facts)", "unverifiable_share", 3),
            ("**completeness** (reference facts covered, mean)", "completeness", 3),
            ("completeness (micro)", "completeness_micro", 3), ("empty answers", "empty_answers", 0),
            ("mean answer tokens", "mean_answer_tokens", 1)]
    lines = ["# KnowTuning report", "",
             f"KG `{qa['kg']['source']}` ({qa['kg']['entities']} entities, {qa['kg']['triples']} triples); "
             f"{qa['train']} training / {qa['test']} held-out long-form questions, "
             f"{_f(qa['facts_per_answer'], 1)} reference facts per answer. Student `{m['student']}`, "
             f"teacher `{m['teacher']}`. Machine: {m['machine'].get('cpus')} CPUs.", "",
             f"## Fact-level evaluation on the same {ev['questions']} held-out questions", "",
             "| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for title, key, d in rows:
        if key is None:
            cells = [f"{r['total_correct']} / {r['total_incorrect']} / {r['total_unverifiable']}"
                     for r in ev["results"].values()]
        else:
            cells = [_f(r.get(key), d) if d else str(r.get(key)) for r in ev["results"].values()]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += ["", "A fact is checked by linking the KG entities it names (names + exact synonyms) and looking up the "
                  "triple between the question's subject and each of them (either direction). Correct = every such "
                  "triple is in the KG; incorrect = one is not; unverifiable = it names no entity but the subject "
                  "(counted apart, not in the shares). Completeness = share of the question's reference triples "
                  "whose entity a correct fact names.",
              f"Fact extraction of the answers: {ev['extract'].get('by_extractor', ev['extract'])}; rejected "
              f"extractions by reason: {ev.get('extract_rejected') or {}}.", ""]
    lines += _examples(out / "eval", labels)
    lines += [
              "## Stage I: fine-grained knowledge augmentation", "",
              f"- atomic facts: {s1['atomic_facts']} from {s1['answers']} answers "
              f"({_f(s1['facts_per_answer'], 2)} per answer); extractor: {s1['extract'].get('by_extractor')}; "
              f"teacher passes {s1['extract'].get('passes', 0)}, parsed by attempt "
              f"{s1['extract'].get('parsed_by_attempt', {})}; rejected by reason: {s1['extract'].get('rejected_by_reason')}",
              f"- perplexity under `{s1['perplexity']['model']}` (context: {s1['perplexity']['context']}): "
              f"mean {_f(s1['perplexity']['mean'], 2)}, median {_f(s1['perplexity']['median'], 2)}; "
              f"difficult (alpha {s1['alpha']}, {s1['scope']}): {s1['difficult']} facts, ppl >= "
              f"{_f(s1['perplexity']['difficult_threshold'], 2)}",
              f"- rewrites: {s1['rewrite'].get('by_rewriter')} (teacher passes {s1['rewrite'].get('passes', 0)}); "
              f"rejected by reason: {s1['rewrite'].get('rejected_by_reason')}",
              f"- SFT rows: {s1['rows']}", "", "## Training", "",
              "| run | steps | rows seen | loss first -> last | s/step | wall s |", "|---|---|---|---|---|---|"]
    for k, t in m["train"].items():
        lines.append(f"| {k} (sft) | {t['steps']} | {t['samples']} | {_f(t['first_loss'])} -> {_f(t['final_loss'])} | "
                     f"{_f(t['seconds_per_step'], 2)} | {_f(t['wall_seconds'], 1)} |")
    t2 = s2.get("train") or {}
    lines.append(f"| stage2 (dpo) | {t2.get('steps')} | {t2.get('samples')} | {_f(t2.get('first_loss'))} -> "
                 f"{_f(t2.get('final_loss'))} | {_f(t2.get('seconds_per_step'), 2)} | {_f(t2.get('wall_seconds'), 1)} |")
    pairs = s2.get("pairs") or {}
    ra = s2.get("rewards_after") or {}
    lines += ["", f"Stage II pairs: {pairs.get('pairs')} ({pairs.get('by_kind')}), skipped by reason "
                  f"{pairs.get('rejected')}; implicit-reward accuracy after DPO on its training pairs "
                  f"{_f(ra.get('reward_accuracy'))}, margin {_f(ra.get('reward_margin'), 4)}.", "",
              "## Time per stage (s)", "",
              "Stages reused from an earlier run show that run's time"
              + (f" (reused here: {', '.join(m['reused_stages'])})." if m.get("reused_stages") else "."), "",
              "| stage | seconds |", "|---|---|"]
    for k, v in m["timings"].items():
        lines.append(f"| {k} | {v:.1f} |")
    for k, v in (s1.get("seconds") or {}).items():
        lines.append(f"| stage1_data.{k} | {v:.1f} |")
    for k, v in (s2.get("seconds") or {}).items():
        lines.append(f"| stage2.{k} | {v:.1f} |")
    for k, v in (ev.get("seconds") or {}).items():
        lines.append(f"| eval.{k} | {v:.1f} |")
    lines.append("")
    (out / "report.md").write_text("\n".join(lines))
