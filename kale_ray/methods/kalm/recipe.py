"""KaLM end to end: ``run_kalm(cfg)``, a list of ``Run.stage`` calls over ``cfg.out``.

    kale-ray kalm --config configs/kalm_umls.yaml

1. ``prepare``: the KG's train/test split -> training rows (both views, inverse relations,
   triple-completion prompt rendered with the model's chat template) -> ``out/data/``
2. ``test_triples``: the evaluated test triples -> ``out/test_triples.tsv``
3. ``eval_before``: KG completion + KGQA of the base model -> ``out/eval_before/``
4. ``train``: Ray Train + DeepSpeed with ``loss: kalm`` (LoRA on the MLP projections) -> ``out/train/``
5. ``eval_after``: the same evaluation of the merged model -> ``out/eval_after/``
6. ``out/metrics.json`` and ``out/report.md``: before and after side by side, time per stage

Each stage records the settings that decide its output (``out/stages/<name>.json``, chained
through the stages it reads): a rerun with the same settings reuses it, one with other settings
stops with the changed keys (``on_change: error``) or recomputes it and what follows
(``on_change: overwrite``). What a later stage needs is read back from the files a stage wrote,
on a fresh run and a reused one alike.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kale_ray.config import to_dict
from kale_ray.core.io import read_jsonl, write_json, write_jsonl
from kale_ray.methods.kalm.config import KaLMJobConfig
from kale_ray.methods.kalm.data import KGSplit, KGText, prep_summary, seeded_subset, split_kg, training_rows
from kale_ray.methods.kalm.report import write_report
from kale_ray.runtime.stages import stage_config, without
from kale_ray.runtime.ray import init_ray_for

# Eval settings that change how fast, not what comes out.
_NOT_EVAL_OUTPUT = ("embed_with", "embed_threads", "generation.concurrency", "generation.max_concurrency")


@dataclasses.dataclass
class KGViews:
    """The KG, its split and its text: rebuilt from the config (a load and a seeded split, the
    same on every call) wherever a stage that runs needs them, fresh or after reused stages."""

    kg: Any
    split: KGSplit
    text: KGText

    @classmethod
    def load(cls, cfg: KaLMJobConfig) -> KGViews:
        from kale_ray.core.kg import load_kg

        d = cfg.data
        kg = load_kg(d.kg.source, d.kg.names, d.kg.on_error)
        return cls(kg, split_kg(kg, d.split, d.test_fraction, d.seed), KGText.from_kg(kg, d.inverse_text))


def prepare(cfg: KaLMJobConfig, kg: KGViews, model_path: str, out: Path) -> dict:
    """Training rows (``out/data/train.jsonl``) and ``out/data_summary.json``; returns the summary."""
    from kale_ray.core.prompts import render_chat
    from kale_ray.models import load_tokenizer

    d, split, text = cfg.data, kg.split, kg.text
    train = seeded_subset(split.train, d.max_train_triples, d.seed, "train")
    tok = load_tokenizer(model_path, cfg.train.model.trust_remote_code)
    rows = training_rows(train, text, lambda m: render_chat(m, tok), tok.eos_token or "", d.add_inverse,
                         known_triples=split.train)
    write_jsonl(out / "data" / "train.jsonl", rows)
    summary = dict(prep_summary(rows, split, text, trained=len(train)), kg=kg.kg.summary())
    write_json(out / "data_summary.json", summary)
    return summary


def write_test_triples(cfg: KaLMJobConfig, split: KGSplit, out: Path) -> dict:
    """The evaluated test triples (a seeded sample of ``eval.max_test_triples``) -> ``out/test_triples.tsv``."""
    test = seeded_subset(split.test, cfg.eval.max_test_triples, cfg.eval.seed, "test")
    np.savetxt(out / "test_triples.tsv", test, fmt="%d", delimiter="\t", header="head\trelation\ttail (ids)")
    return {"evaluated_test_triples": int(len(test)), "test_triples": int(len(split.test))}


def read_test_triples(out: Path) -> np.ndarray:
    return np.loadtxt(out / "test_triples.tsv", dtype=np.int64, delimiter="\t", ndmin=2).reshape(-1, 3)


def train_config(cfg: KaLMJobConfig, out: Path):
    """The trainer's config: ``loss: kalm`` on ``out/data`` into ``out/train`` (``on_change`` reaches it)."""
    return stage_config(cfg.train, cfg.on_change, loss="kalm", data=str(out / "data"), out_dir=str(out / "train"))


def data_settings(cfg: KaLMJobConfig) -> dict[str, Any]:
    """What decides the training rows: the data section and the model whose chat template renders them."""
    return {"data": without(to_dict(cfg.data), ("kg.undirected_search",)), "model": cfg.train.model.name,
            "trust_remote_code": cfg.train.model.trust_remote_code}


def eval_settings(cfg: KaLMJobConfig, kgqa: bool, model: str) -> dict[str, Any]:
    """What decides an evaluation's output: the eval section, the model and how it is embedded."""
    ecfg = dataclasses.replace(cfg.eval, kgqa=cfg.eval.kgqa and kgqa)
    m = cfg.train.model
    return {"eval": without(to_dict(ecfg), _NOT_EVAL_OUTPUT), "model": model,
            "trust_remote_code": m.trust_remote_code, "max_model_len": m.max_model_len,
            "max_embed_len": cfg.train.kalm.max_embed_len, "use_gpu": cfg.train.use_gpu}


def run_kalm(cfg: KaLMJobConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    from kale_ray.methods.kalm.evaluate import evaluate_kalm
    from kale_ray.models import resolve_model
    from kale_ray.runtime.report import machine_info
    from kale_ray.runtime.stages import Run
    from kale_ray.train.trainer import run_training, stage_settings

    out = Path(cfg.out).expanduser().resolve()
    run = Run(out, cfg, on_change=cfg.on_change, progress=progress, label="kalm")
    model_path = resolve_model(cfg.train.model.name, cfg.train.model.cache_dir)
    kg = functools.cache(lambda: KGViews.load(cfg))  # loaded once, and only by a stage that runs
    kg_files = [p for p in (cfg.data.kg.source, cfg.data.kg.names) if p and not str(p).startswith("builtin:")]

    # 1-2. data: training rows, the evaluated test triples
    data = run.stage("prepare", lambda: prepare(cfg, kg(), model_path, out), settings=data_settings(cfg),
                     inputs=kg_files, outputs=["data", "data_summary.json"])
    tests = run.stage("test_triples", lambda: write_test_triples(cfg, kg().split, out), outputs=["test_triples.tsv"],
                      settings={"max_test_triples": cfg.eval.max_test_triples, "seed": cfg.eval.seed})
    data_summary = dict(data, evaluated_test_triples=tests["evaluated_test_triples"])
    progress(f"[kalm] {data_summary['training_rows']} training rows ({data_summary['train_triples']} triples + "
             f"inverses), {data_summary['evaluated_test_triples']} test triples, {data_summary['entities']} entities")

    def evaluate(path: str, label: str, kgqa: bool) -> dict:
        init_ray_for(cfg)
        return evaluate_kalm(path, kg().split, kg().text, read_test_triples(out),
                             dataclasses.replace(cfg.eval, kgqa=cfg.eval.kgqa and kgqa), cfg.train.model,
                             out / f"eval_{label}", label, use_gpu=cfg.train.use_gpu,
                             max_embed_len=cfg.train.kalm.max_embed_len, progress=progress)

    # 3. the base model
    evals: dict[str, dict] = {}
    if cfg.eval_before:
        evals["before"] = run.stage("eval_before", lambda: evaluate(model_path, "before", cfg.kgqa_before),
                                    settings=eval_settings(cfg, cfg.kgqa_before, cfg.train.model.name),
                                    outputs=["eval_before"], after="test_triples")

    # 4. alignment (the trainer keeps its own settings record and checkpoints in out/train: a killed run resumes)
    tcfg = train_config(cfg, out)

    def train() -> dict:
        init_ray_for(cfg)
        progress(f"[kalm] aligning on Ray Train + DeepSpeed ZeRO-{tcfg.zero_stage}, {tcfg.num_workers} workers")
        res = run_training(tcfg, run_name="kalm")
        return {"steps": res.summary.get("steps"), "final_loss": res.summary.get("final_loss")}

    run.stage("train", train, settings=stage_settings(tcfg, "kalm"),
              outputs=["train"], after="prepare")
    merged = str(out / "train" / "merged")
    if not Path(merged).exists():
        raise RuntimeError(f"training wrote no merged model under {out / 'train'} (set train.save_merged=true)")
    train_summary = json.loads((out / "train" / "train_summary.json").read_text())
    history = read_jsonl(out / "train" / "history.jsonl")

    # 5. the aligned model (named by the train stage's settings, upstream)
    evals["after"] = run.stage("eval_after", lambda: evaluate(merged, "after", True),
                               settings=eval_settings(cfg, True, "merged"), outputs=["eval_after"],
                               after=["train", "test_triples"])

    timings = run.timings()
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
        "reused_stages": list(run.reused),
    }
    write_json(out / "metrics.json", metrics)
    write_report(out, metrics, cfg)
    after = evals["after"]["kg_completion"]["both"]
    progress(f"[kalm] done in {timings['total_this_run'] / 60:.1f} min: MRR after {after['mrr']:.4f}"
             + (f" (before {evals['before']['kg_completion']['both']['mrr']:.4f})" if "before" in evals else "")
             + f"; report: {out / 'report.md'}")
    return metrics
