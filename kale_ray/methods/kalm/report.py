"""KaLM's ``report.md``: KG completion and KGQA before and after alignment side by side, the
training run and the time per stage (built with :class:`kale_ray.runtime.report.Markdown`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kale_ray.methods.kalm.config import KaLMJobConfig
from kale_ray.runtime.report import Markdown, delta, dig, fmt

_KGQA_TASKS = ("tail", "head", "relation", "triple", "tail_open", "all")


def write_report(out: Path, metrics: dict[str, Any], cfg: KaLMJobConfig) -> None:
    ev = metrics["eval"]
    before, after = ev.get("before"), ev["after"]
    d, kc, t = metrics["data"], cfg.train.kalm, cfg.train
    md = Markdown("KaLM report")
    md.para(f"KG `{d['kg']['source']}`: {d['entities']} entities, {d['relations']} relations; "
            f"{d['train_triples']} training triples ({d['training_rows']} rows with inverses), "
            f"{d['evaluated_test_triples']} test triples evaluated (of {d['test_triples']}). "
            f"Model `{metrics['model']}`, LoRA r={t.lora.r} on {', '.join(t.lora.target_modules)}; "
            f"L = L_exp + {kc.lm_weight} L_LM, tau {kc.tau}, margin {kc.margin}, "
            f"{'gathered' if kc.gather_negatives else 'per-worker'} in-batch negatives "
            f"(micro-batch {t.micro_batch_size} x {t.num_workers} workers). "
            f"Machine: {metrics['machine'].get('cpus')} CPUs.")
    md.section("KG completion (filtered, cosine ranking over all entities)")
    rows = []
    for direction in ("tail", "head", "both"):
        for m in ("mrr", "mr", "hits@1", "hits@3", "hits@10"):
            a, b = dig(before, "kg_completion", direction, m), dig(after, "kg_completion", direction, m)
            n = 1 if m == "mr" else 4
            rows.append([direction, m.upper() if m in ("mr", "mrr") else m, fmt(a, n), fmt(b, n), delta(a, b, n)])
    md.table(["direction", "metric", "before", "after", "change"], rows)
    n_q, n_e = dig(after, "kg_completion", "both", "n"), dig(after, "kg_completion", "num_entities")
    if n_q and n_e:
        md.para(f"{n_q} queries; a random ranking of {n_e} entities has MRR about "
                f"{float(np.mean(1.0 / np.arange(1, n_e + 1))):.4f} and MR about {(n_e + 1) / 2:.1f}.")
    if dig(after, "kgqa"):
        md.section("KGQA (multiple choice, generated through vLLM, greedy)")
        rows = []
        for task in _KGQA_TASKS:
            a, b = dig(before, "kgqa", task, "accuracy"), dig(after, "kgqa", task, "accuracy")
            if b is not None:
                rows.append([task, fmt(a), fmt(b), delta(a, b), fmt(dig(after, "kgqa", task, "chance")),
                             str(dig(after, "kgqa", task, "n"))])
        md.table(["task", "before", "after", "change", "chance", "n"], rows)
        md.para("tail/head/relation: 4 choices, triple: true/false, tail_open: the training instruction "
                "with no choices (right if any known tail of (h, r); chance = share of right entities). "
                "Answers that name no choice count as wrong; parse rate before -> after: "
                + ", ".join(f"{task} {fmt(dig(before, 'kgqa', task, 'parsed'), 2)} -> "
                            f"{fmt(dig(after, 'kgqa', task, 'parsed'), 2)}"
                            for task in _KGQA_TASKS[:4] if dig(after, "kgqa", task)))
    tr = metrics["train"]
    first, last = metrics.get("train_first_step") or {}, metrics.get("train_last_step") or {}
    md.section("Training")
    md.bullets([f"{tr.get('steps')} steps, {tr.get('samples')} rows, {fmt(tr.get('seconds_per_step'), 2)} s/step, "
                f"{fmt(tr.get('wall_seconds'), 1)} s wall; rejected rows: {tr.get('rejected') or 0}",
                f"loss {fmt(first.get('loss'), 4)} -> {fmt(last.get('loss'), 4)}; L_exp {fmt(first.get('exp'), 4)} -> "
                f"{fmt(last.get('exp'), 4)}; L_LM {fmt(first.get('lm'), 4)} -> {fmt(last.get('lm'), 4)}; "
                f"positive-pair cosine {fmt(first.get('pos_cos'), 4)} -> {fmt(last.get('pos_cos'), 4)}; "
                f"unmasked negatives per row {fmt(last.get('negatives'), 1)}"])
    md.timings(metrics["timings"], reused=metrics.get("reused_stages") or [],
               extra=[(f"eval_{label}.{k}", v) for label, e in ev.items() for k, v in (e.get("seconds") or {}).items()])
    md.write(out)
