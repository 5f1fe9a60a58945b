"""KnowTuning end to end: ``run_knowtuning(cfg)``.

    kale-ray knowtuning --config configs/knowtuning_hpo.yaml

1. **qa**: long-form questions from the KG (or a user's file), each answer with the facts it was
   built from; a seeded held-out split -> ``out/qa/{train,test}.jsonl``
2. **stage1 data** (:mod:`kale_ray.knowtuning.stage1`): atomic facts (teacher), perplexity under
   the student, the alpha most difficult facts, rewritten QA around them -> ``out/stage1/data/``
3. **baseline**: SFT on the original QA only -> ``out/baseline/train/`` (``baseline: sft``)
4. **stage1**: SFT on original + rewritten QA (shuffled together, ``out/stage1/train_rows/``) -> ``out/stage1/train/``
5. **stage2**: comparison pairs (delete / KG-exact revise / shuffle) and DPO from the Stage I model,
   reference precomputed once (:func:`kale_ray.knowtuning.recipe.run_dpo_stage`) -> ``out/stage2/``
6. **eval** (:mod:`kale_ray.knowtuning.evaluate`): answers to the held-out questions by SFT and
   KnowTuning, atomic facts, KG checks -> ``out/eval/``
7. ``out/metrics.json`` and ``out/report.md``: the fact-level metrics side by side, the
   rejects of every step by reason, and the time of every stage.

A rerun reuses every finished stage (each writes its summary last); delete a stage's folder to redo it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kale_ray.config import dump_config
from kale_ray.core.rejects import Rejects
from kale_ray.knowtuning.config import KnowTuningDPOJobConfig, KnowTuningJobConfig, PairsConfig


def _done(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def _init_ray(cfg: KnowTuningJobConfig) -> None:
    from kale_ray.llm import QUIET_ENV
    from kale_ray.ray_init import init_ray

    init_ray(cfg.ray_address, cfg.stage1.train.num_workers, runtime_env=QUIET_ENV)


# --------------------------------------------------------------------------- stages


def build_qa(cfg: KnowTuningJobConfig, out: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """Questions + reference facts -> ``out/qa/``; teacher-written answers with ``qa.answers: teacher``."""
    from kale_ray.knowtuning import atomic
    from kale_ray.knowtuning.longform import kg_long_form_qa, read_long_form_jsonl, split_qa
    from kale_ray.knowtuning.stage1 import load_kg_cached, write_jsonl

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
        from kale_ray.knowtuning.teacher import teacher_step

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
    _write_json(out / "qa" / "summary.json", summary)
    return summary


def _train(tcfg, data_dir: Path, out_dir: Path, run_name: str, progress) -> tuple[dict, str, bool]:
    """``(train summary, merged folder, reused)``: a run with its ``train_summary.json`` is reused."""
    from kale_ray.train.trainer import run_training

    done = _done(out_dir / "train_summary.json")
    if done is None:
        cfg = dataclasses.replace(copy.deepcopy(tcfg), data=str(data_dir), out_dir=str(out_dir))
        progress(f"[knowtuning] {run_name}: {cfg.loss} on Ray Train + DeepSpeed ZeRO-{cfg.zero_stage}, "
                 f"{cfg.num_workers} workers")
        res = run_training(cfg, run_name=run_name)
        done, merged, reused = res.summary, res.merged_dir, False
    else:
        merged, reused = str(out_dir / "merged"), True
    if not merged or not Path(merged).exists():
        raise RuntimeError(f"{run_name}: no merged model under {out_dir} (set save_merged=true)")
    return done, merged, reused


def run_knowtuning(cfg: KnowTuningJobConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    from kale_ray.knowtuning.evaluate import evaluate_facts
    from kale_ray.knowtuning.recipe import run_dpo_stage
    from kale_ray.knowtuning.stage1 import build_stage1_rows, read_jsonl, write_jsonl
    from kale_ray.models import resolve_model
    from kale_ray.report import machine_info

    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    timings: dict[str, float] = {}
    reused: list[str] = []
    t_all = time.perf_counter()
    _init_ray(cfg)

    def stage(name: str, path: Path, fn: Callable[[], dict]) -> dict:
        done = _done(path)
        if done is not None:
            reused.append(name)
            timings[name] = float(done.get("_seconds", 0.0))
            return done
        t = time.perf_counter()
        res = fn()
        res["_seconds"] = round(time.perf_counter() - t, 2)
        _write_json(path, res)
        timings[name] = res["_seconds"]
        return res

    qa = stage("qa", out / "qa" / "summary.json", lambda: build_qa(cfg, out, progress))
    train_qas, test_qas = read_jsonl(out / "qa" / "train.jsonl"), read_jsonl(out / "qa" / "test.jsonl")
    progress(f"[knowtuning] {len(train_qas)} training / {len(test_qas)} held-out long-form questions")
    if cfg.stop_after == "qa":
        return {"qa": qa, "timings": timings, "reused_stages": reused}
    s1 = stage("stage1_data", out / "stage1" / "summary.json",
               lambda: build_stage1_rows(cfg, train_qas, out / "stage1", progress))

    if cfg.stop_after == "stage1_data":
        return {"qa": qa, "stage1": s1, "timings": timings, "reused_stages": reused}
    trained: dict[str, dict] = {}
    models: dict[str, str] = {}
    if cfg.eval.include_base:
        models["base"] = resolve_model(cfg.stage1.train.model.name, cfg.stage1.train.model.cache_dir)
    if cfg.baseline == "sft":
        rows = [r for r in read_jsonl(out / "stage1" / "data" / "train.jsonl") if r["kind"] == "original"]
        write_jsonl(out / "baseline" / "data" / "train.jsonl", rows)
        t = time.perf_counter()
        summ, merged, was = _train(cfg.stage1.train, out / "baseline" / "data", out / "baseline" / "train",
                                   "baseline_sft", progress)
        timings["baseline_sft"] = float(summ.get("wall_seconds") or 0.0) if was else time.perf_counter() - t
        reused += ["baseline_sft"] if was else []
        trained["sft"], models["sft"] = summ, merged
    # The trainer keeps the rows' order (a resume skips exactly the rows it trained on), so original and
    # rewritten QA are mixed here, with a seeded shuffle: else the rewrites would all come last.
    rows = read_jsonl(out / "stage1" / "data" / "train.jsonl")
    order = np.random.default_rng([cfg.stage1.train.seed, 2]).permutation(len(rows))
    write_jsonl(out / "stage1" / "train_rows" / "train.jsonl", [rows[i] for i in order])
    t = time.perf_counter()
    summ, stage1_merged, was = _train(cfg.stage1.train, out / "stage1" / "train_rows", out / "stage1" / "train",
                                      "stage1", progress)
    timings["stage1_train"] = float(summ.get("wall_seconds") or 0.0) if was else time.perf_counter() - t
    reused += ["stage1_train"] if was else []
    trained["stage1"] = summ
    if cfg.baseline == "none":
        models["stage1"] = stage1_merged

    if cfg.stop_after == "stage1":
        return {"qa": qa, "stage1": s1, "train": trained, "models": models, "timings": timings,
                "reused_stages": reused}
    s2 = cfg.stage2
    dpo_cfg = KnowTuningDPOJobConfig(
        out=str(out / "stage2"),
        pairs=PairsConfig(kg=cfg.qa.kg, source=str(out / "qa" / "train_facts.jsonl"), beta=s2.beta,
                          kinds=list(s2.kinds), seed=cfg.qa.seed),
        train=dataclasses.replace(copy.deepcopy(s2.train),
                                  model=dataclasses.replace(s2.train.model, name=stage1_merged)),
        reference_batch_size=s2.reference_batch_size, reference_with=s2.reference_with, score_after=s2.score_after,
        ray_address=cfg.ray_address)
    stage2 = _done(out / "stage2" / "summary.json")
    if stage2 is None:
        progress("[knowtuning] stage2: comparison pairs -> reference pass -> DPO")
        t = time.perf_counter()
        stage2 = run_dpo_stage(dpo_cfg)
        timings["stage2"] = time.perf_counter() - t
    else:
        reused.append("stage2")
        timings["stage2"] = float(sum((stage2.get("seconds") or {}).values()))
    if not stage2.get("merged") or not Path(stage2["merged"]).exists():
        raise RuntimeError(f"stage2 wrote no merged model under {out / 'stage2'}")
    models["knowtuning"] = stage2["merged"]
    if cfg.stop_after == "stage2":
        return {"qa": qa, "stage1": s1, "train": trained, "stage2": stage2, "models": models, "timings": timings,
                "reused_stages": reused}

    ev = stage("eval", out / "eval" / "metrics.json", lambda: evaluate_facts(cfg, test_qas, models, out / "eval",
                                                                             progress))
    timings["total_this_run"] = time.perf_counter() - t_all
    metrics = {
        "teacher": cfg.teacher.name, "student": cfg.stage1.train.model.name, "machine": machine_info(),
        "qa": {k: v for k, v in qa.items() if k != "example"}, "qa_example": qa.get("example"),
        "stage1": s1, "train": {k: {x: v.get(x) for x in ("steps", "samples", "first_loss", "final_loss",
                                                           "seconds_per_step", "wall_seconds", "rejected")}
                                for k, v in trained.items()},
        "stage2": {k: stage2.get(k) for k in ("pairs", "reference", "train", "rewards_after", "seconds")},
        "eval": ev, "timings": timings, "reused_stages": reused,
    }
    _write_json(out / "metrics.json", metrics)
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
