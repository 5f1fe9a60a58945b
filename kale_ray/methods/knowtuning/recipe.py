"""KnowTuning end to end: ``run_knowtuning(cfg)``.

    kale-ray knowtuning --config configs/knowtuning_hpo.yaml

1. **qa**: long-form questions from the KG (or a user's file), each answer with the facts it was
   built from; a seeded held-out split -> ``out/qa/{train,test}.jsonl``
2. **stage1 data** (:mod:`kale_ray.methods.knowtuning.stage1`): atomic facts (teacher), perplexity under
   the student, the alpha most difficult facts, rewritten QA around them -> ``out/stage1/data/``
3. **baseline**: SFT on the original QA only -> ``out/baseline/train/`` (``baseline: sft``)
4. **stage1**: SFT on original + rewritten QA (shuffled together, ``out/stage1/train_rows/``) -> ``out/stage1/train/``
5. **stage2**: comparison pairs (delete / KG-exact revise / shuffle) and DPO from the Stage I model,
   reference precomputed once (:func:`kale_ray.methods.knowtuning.stage2.run_dpo_stage`) -> ``out/stage2/``
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

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kale_ray.config import to_dict
from kale_ray.core.io import read_jsonl, write_json, write_jsonl
from kale_ray.core.rejects import Rejects
from kale_ray.methods.knowtuning.config import KnowTuningDPOJobConfig, KnowTuningJobConfig, PairsConfig
from kale_ray.methods.knowtuning.report import write_report
from kale_ray.runtime.stages import stage_config, without
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
    from kale_ray.methods.knowtuning.stage2 import TRAIN_SUMMARY_KEYS
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
    dpo = s2.dpo_stage()
    dpo["train"].model = dataclasses.replace(dpo["train"].model, name=stage1_merged)
    return KnowTuningDPOJobConfig(
        out=str(out / "stage2"), **dpo, ray_address=cfg.ray_address, on_change=cfg.on_change,
        pairs=PairsConfig(kg=cfg.qa.kg, source=str(out / "qa" / "train_facts.jsonl"), beta=s2.beta,
                          kinds=list(s2.kinds), seed=cfg.qa.seed))


def run_knowtuning(cfg: KnowTuningJobConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    from kale_ray.methods.knowtuning.evaluate import evaluate_facts
    from kale_ray.methods.knowtuning.stage2 import run_dpo_stage
    from kale_ray.train.trainer import stage_settings
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
        return stage_config(tcfg, cfg.on_change, data=str(out / data), out_dir=str(out / to))

    def train(name: str, tcfg, run_name: str, to: str) -> dict:
        return run.stage(name, lambda: _train(cfg, tcfg, run_name, progress), settings=stage_settings(tcfg, run_name),
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
