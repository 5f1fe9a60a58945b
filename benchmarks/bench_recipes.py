"""Side-by-side method-vs-baseline tables for KnowTuning, KARD and KaLM, one recipe run each.

    python benchmarks/bench_recipes.py                                  # all three, the README's configurations
    python benchmarks/bench_recipes.py --method kalm                    # one of knowtuning, kard, kalm
    python benchmarks/bench_recipes.py --method kard --out runs/kard_umls   # a finished run of the same config
    python benchmarks/bench_recipes.py --quick                          # tiny models: the machinery only (minutes)

Each method runs its whole recipe (the same function as ``kale-ray <method>``) on the configuration
its README section quotes, under ``runs/bench_recipes/<method>`` unless ``--out`` names another
directory. Recipes reuse finished stages, so a rerun (or ``--out`` pointing at a finished run of the
same configuration) reads the stored results instead of training again; the result file then lists
those stages under ``reused_stages`` and their original ``stage_seconds``, so it always says how the
numbers were obtained.

Comparisons (the baseline measured in the same run, on the same held-out items):
* **KnowTuning** vs SFT on the original QA (HPO): facts per answer that are exact HPO triples,
  share of checked facts correct, factual error rate, completeness; paired bootstrap 95% interval
  of the per-question difference in correct facts.
* **KARD**: (a) the student without knowledge, (b) KARD + BM25 knowledge, (c) KARD + reranked
  knowledge (UMLS questions, HPO + KG passages): accuracy with Wilson intervals and paired
  differences per question; the reranker's hit@k of the rationale-best passage vs BM25 alone.
* **KaLM**: filtered KG completion (MRR, MR, Hits@1/3/10) and KGQA accuracy of the model before
  vs after alignment (UMLS), and a random ranking's MRR.

Writes ``benchmarks/results/<method>.json`` (key ``full`` or ``quick``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Load, machine, now, versions, write_result  # noqa: E402

TINY = "builtin:tiny-llama"
_TINY_TRAIN = ["model.name=" + TINY, "num_workers=2", "max_steps=2", "micro_batch_size=2", "max_seq_len=160",
               "lora.r=4", "lora.alpha=8", "warmup_steps=0"]

# method -> config file, the README's overrides (full), the tiny overrides (quick)
METHODS: dict[str, dict[str, Any]] = {
    "knowtuning": {
        "config": "configs/knowtuning_hpo.yaml",
        "full": [],
        "quick": ["qa.num_questions=8", "qa.facts_per_answer=3", f"teacher.name={TINY}", "teacher.max_model_len=512",
                  "stage1.extract.max_attempts=1", "stage1.extract.max_tokens=24", "stage1.rewrite.max_attempts=1",
                  "stage1.rewrite.max_tokens=24", "eval.generation.max_tokens=24", "eval.extractor=sentences",
                  *[f"stage1.train.{x}" for x in _TINY_TRAIN], *[f"stage2.train.{x}" for x in _TINY_TRAIN]],
    },
    "kard": {
        "config": "configs/kard_umls.yaml",
        "full": [],
        "quick": ["qa.num_questions=40", "max_train_questions=12", "kb.max_hpo_terms=200",
                  f"teacher.model.name={TINY}", "teacher.model.max_model_len=512", "teacher.num_rationales=2",
                  "teacher.generation.max_tokens=16", f"train.model.name={TINY}", "train.model.max_model_len=512",
                  "train.max_steps=2", "train.micro_batch_size=4", "train.max_seq_len=256", "reranker.num_layers=1",
                  "reranker.max_steps=2", "reranker.batch_size=2", "eval.num_samples=2",
                  "eval.generation.max_tokens=16", "eval.retrieve_top=10", "eval.max_questions=6"],
    },
    "kalm": {
        "config": "configs/kalm_umls.yaml",
        # the run quoted in the README (a CPU budget: 40 steps, a seeded 250-triple test sample)
        "full": ["train.max_steps=40", "eval.kgqa_per_task=40", "eval.max_test_triples=250"],
        "quick": [f"train.model.name={TINY}", "train.max_steps=2", "train.micro_batch_size=4",
                  "eval.kgqa_per_task=4", "eval.max_test_triples=20"],
    },
}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def paired_bootstrap(diffs: list[float], n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Mean of per-item differences and a percentile bootstrap 95% interval (items resampled)."""
    n = len(diffs)
    if n == 0:
        return {"n": 0, "mean": None, "ci95": [None, None]}
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return {"n": n, "mean": sum(diffs) / n, "ci95": [means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]],
            "bootstrap_resamples": n_boot, "seed": seed}


def paired_binary(a: dict[str, bool], b: dict[str, bool]) -> dict[str, Any]:
    """b - a on the shared items: mean difference with a 95% normal interval, and the discordant counts."""
    common = sorted(set(a) & set(b))
    d = [int(b[k]) - int(a[k]) for k in common]
    n = len(d)
    if n < 2:
        return {"n": n, "diff": None, "ci95": [None, None]}
    m = sum(d) / n
    half = 1.96 * statistics.stdev(d) / math.sqrt(n)
    return {"n": n, "diff": m, "ci95": [m - half, m + half], "only_b_right": d.count(1), "only_a_right": d.count(-1)}


# --------------------------------------------------------------------------- per-method tables


def table_knowtuning(m: dict, out: Path) -> dict[str, Any]:
    res = m["eval"]["results"]
    base = "sft" if "sft" in res else "stage1"
    keys = [("correct_facts_per_answer", "correct facts per answer (exact HPO triples)", "higher"),
            ("share_correct", "share of checked facts correct", "higher"),
            ("factual_error_rate", "factual error rate", "lower"),
            ("completeness", "completeness (reference facts covered)", "higher"),
            ("unverifiable_share", "share of facts unverifiable", "—"),
            ("facts_per_answer", "facts per answer", "—")]
    rows = [{"metric": label, "key": k, "better": better, "baseline": res[base].get(k),
             "method": res["knowtuning"].get(k),
             "diff": (res["knowtuning"][k] - res[base][k]) if res[base].get(k) is not None
             and res["knowtuning"].get(k) is not None else None} for k, label, better in keys]
    per_q = {label: {r["id"]: r for r in _jsonl(out / "eval" / label / "facts.jsonl")} for label in (base, "knowtuning")}
    common = sorted(set(per_q[base]) & set(per_q["knowtuning"]))
    diff_correct = paired_bootstrap([per_q["knowtuning"][q]["correct"] - per_q[base][q]["correct"] for q in common])
    return {"baseline": base, "method": "knowtuning", "n_questions": res["knowtuning"].get("answers"),
            "rows": rows, "paired_correct_facts_per_question": diff_correct,
            "totals": {k: {f: res[k].get(f) for f in ("total_facts", "total_correct", "total_incorrect",
                                                     "total_unverifiable")} for k in (base, "knowtuning")},
            "headline": (f"correct facts per answer {res[base]['correct_facts_per_answer']:.3f} ({base}) -> "
                         f"{res['knowtuning']['correct_facts_per_answer']:.3f} (KnowTuning), paired diff "
                         f"{diff_correct['mean']:+.3f} [{diff_correct['ci95'][0]:+.3f}, {diff_correct['ci95'][1]:+.3f}]"
                         if diff_correct["n"] else "no held-out answers")}


def table_kard(m: dict, out: Path) -> dict[str, Any]:
    acc = m["accuracy"]
    names = {"a_no_knowledge": "(a) student, reasoning distillation only", "b_kard_bm25": "(b) KARD + BM25 knowledge",
             "c_kard_reranker": "(c) KARD + reranked knowledge"}
    rows = [{"model": names[k], "key": k, "accuracy": acc[k]["accuracy"], "ci95": acc[k]["accuracy_ci95"],
             "n": acc[k]["n"], "parse_rate": acc[k].get("parse_rate")} for k in names]
    preds = _jsonl(out / "eval" / "noknow" / "predictions.jsonl") + _jsonl(out / "eval" / "kard" / "predictions.jsonl")
    by = {v: {p["qid"]: bool(p["correct"]) for p in preds if p["variant"] == v} for v in ("none", "bm25", "reranker")}
    rr = m["reranker_eval"]
    hits = [{"k": k, "bm25": rr.get(f"bm25_hit@{k}"), "reranker": rr.get(f"reranker_hit@{k}")} for k in (1, 3, 10)]
    c_a = paired_binary(by["none"], by["reranker"])
    return {"rows": rows, "paired": {"c_minus_a": c_a, "b_minus_a": paired_binary(by["none"], by["bm25"]),
                                     "c_minus_b": paired_binary(by["bm25"], by["reranker"])},
            "reranker_hits": hits, "reranker_n": rr.get("n"), "reranker_candidates": rr.get("candidates"),
            "headline": (f"accuracy (a) {acc['a_no_knowledge']['accuracy']:.3f}, (b) {acc['b_kard_bm25']['accuracy']:.3f}, "
                         f"(c) {acc['c_kard_reranker']['accuracy']:.3f} on {acc['a_no_knowledge']['n']} questions; "
                         f"reranker hit@3 {rr.get('reranker_hit@3')} vs BM25 {rr.get('bm25_hit@3')}")}


def table_kalm(m: dict, out: Path) -> dict[str, Any]:
    before, after = m["eval"].get("before"), m["eval"]["after"]
    rows = []
    for direction in ("tail", "head", "both"):
        for metric in ("mrr", "mr", "hits@1", "hits@3", "hits@10"):
            b = before["kg_completion"][direction][metric] if before else None
            a = after["kg_completion"][direction][metric]
            rows.append({"direction": direction, "metric": metric, "before": b, "after": a,
                         "diff": None if b is None else a - b, "better": "lower" if metric == "mr" else "higher"})
    n_ent = after["kg_completion"]["num_entities"]
    random_mrr = sum(1.0 / r for r in range(1, n_ent + 1)) / n_ent
    kgqa = [{"task": t, "before": (before or {}).get("kgqa", {}).get(t, {}).get("accuracy"),
             "after": after.get("kgqa", {}).get(t, {}).get("accuracy"), "n": after.get("kgqa", {}).get(t, {}).get("n"),
             "chance": after.get("kgqa", {}).get(t, {}).get("chance")} for t in (after.get("kgqa") or {})]
    both_b = before["kg_completion"]["both"] if before else None
    both_a = after["kg_completion"]["both"]
    return {"completion": rows, "kgqa": kgqa, "num_entities": n_ent, "random_mrr": random_mrr,
            "n_queries": both_a["n"],
            "headline": (f"MRR {both_b['mrr']:.3f} -> {both_a['mrr']:.3f}, Hits@10 {both_b['hits@10']:.3f} -> "
                         f"{both_a['hits@10']:.3f} ({both_a['n']} queries, random MRR {random_mrr:.3f})"
                         if both_b else f"MRR after {both_a['mrr']:.3f}")}


def _runner(method: str) -> tuple[type, Callable[..., dict], Callable[[dict, Path], dict]]:
    if method == "knowtuning":
        from kale_ray.methods.knowtuning.config import KnowTuningJobConfig
        from kale_ray.methods.knowtuning.recipe import run_knowtuning

        return KnowTuningJobConfig, run_knowtuning, table_knowtuning
    if method == "kard":
        from kale_ray.methods.kard.config import KARDJobConfig
        from kale_ray.methods.kard.recipe import run_kard

        return KARDJobConfig, run_kard, table_kard
    from kale_ray.methods.kalm.config import KaLMJobConfig
    from kale_ray.methods.kalm.recipe import run_kalm

    return KaLMJobConfig, run_kalm, table_kalm


def run_method(method: str, size: str, out: Path, extra: list[str]) -> dict[str, Any]:
    import dataclasses

    from kale_ray.config import load_config

    cls, run, table = _runner(method)
    spec = METHODS[method]
    overrides = spec[size] + [f"out={out}"] + extra
    cfg = load_config(cls, ROOT / spec["config"], overrides)
    load = Load()
    t = time.perf_counter()
    m = run(cfg, progress=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t
    tab = table(m, out)
    print(f"[{method}] {tab['headline']}", flush=True)
    reused = m.get("reused_stages") or []
    import ray

    if ray.is_initialized():
        ray.shutdown()
    return {
        "benchmark": f"{method}: method vs baseline, side by side in one recipe run",
        "date": now(), "size": size, "commit": _git_commit(),
        "command": f"python benchmarks/bench_recipes.py --method {method}" + (" --quick" if size == "quick" else "")
                   + f" --out {out}" + ("".join(f" {x}" for x in extra)),
        "recipe_command": f"kale-ray {method} --config {spec['config']} " + " ".join(overrides),
        "config_file": spec["config"], "overrides": overrides, "config": dataclasses.asdict(cfg), "out": str(out),
        "reused_stages": reused,
        "obtained": ("every stage ran in this invocation" if not reused else
                     f"stages {', '.join(reused)} were read from a finished earlier run in {out} (same recipe "
                     "code path; their seconds below are the original run's)"),
        "wall_s_this_invocation": wall,
        "stage_seconds": m.get("stage_seconds_when_run") or m.get("timings"),
        "note": ("quick size: random tiny models, the numbers test the machinery, not the method"
                 if size == "quick" else "one seed; the README's configuration on a 2-core CPU"),
        "machine": machine(), "versions": versions("torch", "transformers", "vllm", "ray", "deepspeed", "peft"),
        "load": load.as_dict(), "table": tab, "headline": tab["headline"],
    }


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="knowtuning,kard,kalm", help="comma-separated: knowtuning, kard, kalm")
    ap.add_argument("--quick", action="store_true", help="tiny models (what run_all.py --quick passes)")
    ap.add_argument("--out", default=None, help="run directory (one method); default runs/bench_recipes/<size>/<method>")
    ap.add_argument("overrides", nargs="*", help="extra config overrides key.sub=value (one method)")
    args = ap.parse_args(argv)
    methods = [x.strip() for x in args.method.split(",") if x.strip()]
    bad = [x for x in methods if x not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {sorted(METHODS)}")
    if (args.out or args.overrides) and len(methods) != 1:
        ap.error("--out and overrides apply to one --method at a time")
    size = "quick" if args.quick else "full"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = []
    for method in methods:
        out = Path(args.out).resolve() if args.out else ROOT / "runs" / "bench_recipes" / size / method
        r = run_method(method, size, out, args.overrides)
        path = write_result(method, r, key=size)
        print(f"wrote {path}", flush=True)
        results.append(r)
    return results


if __name__ == "__main__":  # vLLM spawns its engine process
    main()
