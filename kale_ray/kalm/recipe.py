"""KaLM end to end: ``run_kalm(cfg)``.

    kale-ray kalm --config configs/kalm_umls.yaml

1. data: the KG's train/test split -> training rows (both views, inverse relations,
   triple-completion prompt rendered with the model's chat template) -> ``out/data/``
2. before: KG completion + KGQA of the base model -> ``out/eval_before/``
3. alignment: Ray Train + DeepSpeed with ``loss: kalm`` (LoRA on the MLP projections) -> ``out/train/``
4. after: the same evaluation of the merged model -> ``out/eval_after/``
5. ``out/metrics.json`` and ``out/report.md``: before and after side by side, time per stage

A rerun reuses finished stages (an evaluation with its ``metrics.json``, a training run with
its ``train_summary.json``); delete a stage's folder to redo it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kale_ray.config import dump_config
from kale_ray.kalm.config import KaLMJobConfig
from kale_ray.kalm.data import KGSplit, KGText, seeded_subset, prep_summary, split_kg, training_rows


def _done(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _init_ray(cfg: KaLMJobConfig) -> None:
    from kale_ray.ray_init import init_ray

    init_ray(cfg.ray_address, cfg.train.num_workers)


def prepare(cfg: KaLMJobConfig, model_path: str, out: Path) -> tuple[KGSplit, KGText, np.ndarray, dict]:
    """Split, training rows (``out/data/train.jsonl``), the evaluated test triples; returns a summary."""
    from kale_ray.core.kg import load_kg
    from kale_ray.core.prompts import render_chat
    from kale_ray.models import load_tokenizer

    d = cfg.data
    kg = load_kg(d.kg.source, d.kg.names, d.kg.on_error)
    split = split_kg(kg, d.split, d.test_fraction, d.seed)
    train = seeded_subset(split.train, d.max_train_triples, d.seed, "train")
    test = seeded_subset(split.test, cfg.eval.max_test_triples, cfg.eval.seed, "test")
    text = KGText.from_kg(kg, d.inverse_text)
    tok = load_tokenizer(model_path, cfg.train.model.trust_remote_code)
    rows = training_rows(train, text, lambda m: render_chat(m, tok), tok.eos_token or "", d.add_inverse,
                         known_triples=split.train)
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / "train.jsonl.tmp"
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(data_dir / "train.jsonl")
    np.savetxt(out / "test_triples.tsv", test, fmt="%d", delimiter="\t", header="head\trelation\ttail (ids)")
    summary = dict(prep_summary(rows, split, text, trained=len(train)), kg=kg.summary(),
                   evaluated_test_triples=int(len(test)))
    (out / "data_summary.json").write_text(json.dumps(summary, indent=2))
    return split, text, test, summary


def run_kalm(cfg: KaLMJobConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    from kale_ray.kalm.evaluate import evaluate_kalm
    from kale_ray.models import resolve_model
    from kale_ray.report import machine_info
    from kale_ray.train.trainer import run_training

    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    _init_ray(cfg)

    t = time.perf_counter()
    model_path = resolve_model(cfg.train.model.name, cfg.train.model.cache_dir)
    split, text, test, data_summary = prepare(cfg, model_path, out)
    timings["prepare"] = time.perf_counter() - t
    progress(f"[kalm] {data_summary['training_rows']} training rows ({data_summary['train_triples']} triples + "
             f"inverses), {len(test)} test triples, {data_summary['entities']} entities")

    reused: list[str] = []

    def evaluate(path: str, label: str, kgqa: bool) -> dict:
        done = _done(out / f"eval_{label}" / "metrics.json")
        if done is not None:
            reused.append(f"eval_{label}")
            timings[f"eval_{label}"] = sum(done.get("seconds", {}).values())  # the run that made it
            return done
        t = time.perf_counter()
        ecfg = dataclasses.replace(cfg.eval, kgqa=cfg.eval.kgqa and kgqa)
        res = evaluate_kalm(path, split, text, test, ecfg, cfg.train.model, out / f"eval_{label}", label,
                            use_gpu=cfg.train.use_gpu, max_embed_len=cfg.train.kalm.max_embed_len,
                            progress=progress)
        timings[f"eval_{label}"] = time.perf_counter() - t
        return res

    evals: dict[str, dict] = {}
    if cfg.eval_before:
        evals["before"] = evaluate(model_path, "before", cfg.kgqa_before)

    t = time.perf_counter()
    tcfg = dataclasses.replace(copy.deepcopy(cfg.train), loss="kalm", data=str(out / "data"), out_dir=str(out / "train"))
    train_summary = _done(out / "train" / "train_summary.json")
    if train_summary is None:
        progress(f"[kalm] aligning on Ray Train + DeepSpeed ZeRO-{tcfg.zero_stage}, {tcfg.num_workers} workers")
        res = run_training(tcfg, run_name="kalm")
        train_summary, history, merged = res.summary, res.history, res.merged_dir
        timings["train"] = time.perf_counter() - t
    else:
        reused.append("train")
        history = [json.loads(x) for x in (out / "train" / "history.jsonl").read_text().splitlines() if x]
        merged = str(out / "train" / "merged")
        timings["train"] = float(train_summary.get("wall_seconds") or 0.0)
    if not merged or not Path(merged).exists():
        raise RuntimeError(f"training wrote no merged model under {out / 'train'} (set train.save_merged=true)")

    evals["after"] = evaluate(merged, "after", True)
    timings["total_this_run"] = time.perf_counter() - t_all

    metrics = {
        "model": cfg.train.model.name,
        "machine": machine_info(),
        "data": data_summary,
        "train": {k: train_summary.get(k) for k in ("steps", "samples", "first_loss", "final_loss", "seconds_per_step",
                                                      "samples_per_s", "wall_seconds", "rejected")},
        "train_first_step": history[0] if history else None,
        "train_last_step": history[-1] if history else None,
        "eval": evals,
        "timings": timings,
        "reused_stages": reused,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    write_report(out, metrics, cfg)
    after = evals["after"]["kg_completion"]["both"]
    progress(f"[kalm] done in {timings['total_this_run'] / 60:.1f} min: MRR after {after['mrr']:.4f}"
             + (f" (before {evals['before']['kg_completion']['both']['mrr']:.4f})" if "before" in evals else "")
             + f"; report: {out / 'report.md'}")
    return metrics


# --------------------------------------------------------------------------- report


def _cell(ev: dict | None, *keys: str) -> float | None:
    node: Any = ev
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _delta(a: float | None, b: float | None, digits: int = 4) -> str:
    return "-" if a is None or b is None else f"{b - a:+.{digits}f}"


def write_report(out: Path, metrics: dict[str, Any], cfg: KaLMJobConfig) -> None:
    ev = metrics["eval"]
    before, after = ev.get("before"), ev["after"]
    d = metrics["data"]
    kc = cfg.train.kalm
    lines = [
        "# KaLM report", "",
        f"KG `{d['kg']['source']}`: {d['entities']} entities, {d['relations']} relations; "
        f"{d['train_triples']} training triples ({d['training_rows']} rows with inverses), "
        f"{d['evaluated_test_triples']} test triples evaluated (of {d['test_triples']}). "
        f"Model `{metrics['model']}`, LoRA r={cfg.train.lora.r} on {', '.join(cfg.train.lora.target_modules)}; "
        f"L = L_exp + {kc.lm_weight} L_LM, tau {kc.tau}, margin {kc.margin}, "
        f"{'gathered' if kc.gather_negatives else 'per-worker'} in-batch negatives "
        f"(micro-batch {cfg.train.micro_batch_size} x {cfg.train.num_workers} workers). "
        f"Machine: {metrics['machine'].get('cpus')} CPUs.", "",
        "## KG completion (filtered, cosine ranking over all entities)", "",
        "| direction | metric | before | after | change |", "|---|---|---|---|---|",
    ]
    for direction in ("tail", "head", "both"):
        for m in ("mrr", "mr", "hits@1", "hits@3", "hits@10"):
            a = _cell(before, "kg_completion", direction, m)
            b = _cell(after, "kg_completion", direction, m)
            digits = 1 if m == "mr" else 4
            lines.append(f"| {direction} | {m.upper() if m in ('mr', 'mrr') else m} | {_f(a, digits)} | "
                         f"{_f(b, digits)} | {_delta(a, b, digits)} |")
    n_q = _cell(after, "kg_completion", "both", "n")
    n_e = _cell(after, "kg_completion", "num_entities")
    if n_q and n_e:
        lines += ["", f"{n_q} queries; a random ranking of {n_e} entities has MRR about "
                      f"{float(np.mean(1.0 / np.arange(1, n_e + 1))):.4f} and MR about {(n_e + 1) / 2:.1f}."]
    if _cell(after, "kgqa"):
        lines += ["", "## KGQA (multiple choice, generated through vLLM, greedy)", "",
                  "| task | before | after | change | chance | n |", "|---|---|---|---|---|---|"]
        for task in ("tail", "head", "relation", "triple", "tail_open", "all"):
            a = _cell(before, "kgqa", task, "accuracy")
            b = _cell(after, "kgqa", task, "accuracy")
            if b is None:
                continue
            chance = _cell(after, "kgqa", task, "chance")
            lines.append(f"| {task} | {_f(a, 3)} | {_f(b, 3)} | {_delta(a, b, 3)} | {_f(chance, 3)} | "
                         f"{_cell(after, 'kgqa', task, 'n')} |")
        lines += ["", "tail/head/relation: 4 choices, triple: true/false, tail_open: the training instruction "
                      "with no choices (right if any known tail of (h, r); chance = share of right entities). "
                      "Answers that name no choice count as wrong; parse rate before -> after: "
                      + ", ".join(f"{t} {_f(_cell(before, 'kgqa', t, 'parsed'), 2)} -> "
                                  f"{_f(_cell(after, 'kgqa', t, 'parsed'), 2)}"
                                  for t in ("tail", "head", "relation", "triple") if _cell(after, "kgqa", t))]
    tr = metrics["train"]
    first, last = metrics.get("train_first_step") or {}, metrics.get("train_last_step") or {}
    lines += ["", "## Training", "",
              f"- {tr.get('steps')} steps, {tr.get('samples')} rows, {_f(tr.get('seconds_per_step'), 2)} s/step, "
              f"{_f(tr.get('wall_seconds'), 1)} s wall; rejected rows: {tr.get('rejected') or 0}",
              f"- loss {_f(first.get('loss'))} -> {_f(last.get('loss'))}; L_exp {_f(first.get('exp'))} -> "
              f"{_f(last.get('exp'))}; L_LM {_f(first.get('lm'))} -> {_f(last.get('lm'))}; "
              f"positive-pair cosine {_f(first.get('pos_cos'))} -> {_f(last.get('pos_cos'))}; "
              f"unmasked negatives per row {_f(last.get('negatives'), 1)}",
              "", "## Time per stage (s)", "",
              "Stages reused from an earlier run show that run's time"
              + (f" (reused here: {', '.join(metrics['reused_stages'])})." if metrics.get("reused_stages") else "."),
              "", "| stage | seconds |", "|---|---|"]
    for k, v in metrics["timings"].items():
        lines.append(f"| {k} | {v:.1f} |")
    for label, e in ev.items():
        for k, v in (e.get("seconds") or {}).items():
            lines.append(f"| eval_{label}.{k} | {v:.1f} |")
    lines.append("")
    (out / "report.md").write_text("\n".join(lines))
