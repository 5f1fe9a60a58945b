"""Accuracy testbed: KALE vs SFT at a larger size, several seeds, with confidence intervals.

    python benchmarks/bench_accuracy.py --size smoke               # tiny Llama, template teacher, 2 seeds (minutes)
    python benchmarks/bench_accuracy.py --size full --seeds 0,1,2  # UMLS, SmolLM2-135M, vLLM teacher (~25+ min per seed on 2 cores)
    python benchmarks/bench_accuracy.py --size full --seeds 0 key=value ...   # any KALEJobConfig override
    python benchmarks/bench_accuracy.py --size testbed --seeds 0,1,2,3,4 --key testbed-hpo-1ep eval_base=false \
        --ka-grid all                                  # issue 15: 5 seeds, then the KA settings at seed 0

``--ka-grid`` (names of ``KA_GRID``, or ``all``): after the seeds, KALE is trained again at the first seed
(or at each of ``--ka-seeds``) under each KA setting the paper leaves open (KL direction, temperature, lambda;
and the teacher view's own cross-entropy) into ``seed<k>/ka/<name>`` and compared, question by question, with
that seed's SFT model. Each setting is also pooled over the seeds it ran at, beside the default settings' KALE
at those same seeds (``ka_pooled``).

Seeds add up across calls: an entry's stored seeds and KA points that this call does not rerun are pooled with
its own, from their stored counts (the same numbers as pooling the predictions), when the entry was made under
the same settings (size and overrides); under other settings the entry is replaced, and the call says so.
``--seeds ''`` reruns nothing and re-pools the stored entry (e.g. to add KA points at a seed of an earlier call:
``--seeds '' --ka-seeds 3 --ka-grid teacher_ce1``, which needs that seed's run folder).

Each seed is one whole run of the demo's pipeline (``kale_ray.methods.kale.recipe.run_demo``: synthesis on
Ray Data + vLLM, SFT and KALE with the same rows / steps / LoRA budget on Ray Train +
DeepSpeed, evaluation through vLLM with the hop-fact probes) under
``runs/bench_accuracy/<size>/seed<k>``; the seed sets the question generation and split
(``synth.qa.seed``), the path sampling (``synth.paths.seed``) and training (``train.seed``),
so seeds differ in data, not only in initialisation. A finished seed is reused on rerun
(the demo reuses finished shards, checkpoints and evaluations).

Reported per seed and pooled over seeds, for base / SFT / KALE:
* accuracy on the held-out multi-hop questions with a 95% Wilson interval;
* known & incorrect rate (questions whose every hop fact the model answers alone, yet it
  misses the multi-hop question; share of the probed questions) with a 95% Wilson interval;
* KALE - SFT, paired per question (same test questions): mean difference with a 95% normal
  interval of the paired differences, per seed and pooled; and across seeds, the mean of
  the per-seed differences with a t interval (few seeds: wide).

Sizes (``--size``): ``smoke`` proves the machinery only (random tiny Llama: accuracy ~0; about
2.5 min per seed here); ``medium`` is the demo with template rationales (no LLM teacher);
``testbed`` is the known-and-incorrect testbed (distractors matched to the answer's prior, template
rationales; its report's gate says whether SFT is known & incorrect there); ``demo`` is exactly the demo per seed (its vLLM teacher, ~107 held-out questions per seed; seeds pool to
a few hundred paired questions); ``full`` is the statistically meaningful configuration (the demo's vLLM teacher, 1500 questions). Writes
``benchmarks/results/accuracy.json`` (``smoke`` / ``full`` entries), with ``full_size_ran``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, Load, machine, now, versions, write_result  # noqa: E402

RESULTS_FILE = RESULTS / "accuracy.json"

SIZES = {
    # a few minutes: machinery only
    "smoke": [
        "synth.qa.num_questions=60", "synth.qa.hops=[1,2]", "synth.generation.backend=template",
        "synth.teacher.name=builtin:tiny-llama", "train.model.name=builtin:tiny-llama",
        "train.max_steps=2", "train.micro_batch_size=4", "train.num_workers=1", "train.max_seq_len=256",
        "train.lora.r=4", "train.lora.alpha=8", "eval.generation.max_tokens=8",
    ],
    # the real model, the exact path verbalisation as the rationale (no LLM teacher: skips the synthesis's
    # dominant cost) on the demo's question count; about 20-30 min per seed here (estimate, not run yet)
    "medium": ["synth.generation.backend=template"],
    # exactly the demo's configuration (vLLM teacher, 450 questions -> ~107 held-out multi-hop), several
    # seeds pooled: ~30 min per seed on 2 cores
    "demo": [],
    # the demo's model and recipe on ~3.3x its questions (the demo: 450 -> 107 held-out multi-hop questions)
    "full": ["synth.qa.num_questions=1500"],
    # issue 15's testbed (the demo's questions, spelled out so that it stays the testbed whatever the demo
    # becomes): HPO, distractors matched to the answer's prior, from its relation's range only, no answer
    # more than a quarter of its (hops, relation) questions (the choices alone give little away: the
    # question-blind baselines are at chance there); 300 questions, the relation-following bidirectional
    # path search, template rationales (the path the search found) to stay under half an hour a seed
    "testbed": ["synth.kg.source=builtin:hpo", "synth.qa.distractors=matched", "synth.qa.max_distractor_tier=range",
                "synth.qa.max_answer_share=0.25", "synth.qa.num_questions=300", "synth.paths.heuristic=bidirectional",
                "synth.paths.follow_question_relations=true", "synth.generation.backend=template"],
}
PAPER = "KALE papers: up to +11.72 accuracy points, +4.18 on average over SFT"


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    from kale_ray.runtime.report import wilson_interval

    return list(wilson_interval(k, n, z))


def t_quantile_975(df: int) -> float:
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
    return table.get(df, 1.96 if df > 30 else 2.1)


def read_predictions(eval_dir: Path) -> dict[str, dict]:
    """qid -> correct (bool) for the multi-hop questions, their hop counts and parse failures; the
    probes by qid as lists of bools."""
    questions, probes, hops, unparsed = {}, {}, {}, {}
    for line in (eval_dir / "predictions.jsonl").read_text().splitlines():
        if not line:
            continue
        p = json.loads(line)
        if p.get("skipped"):
            continue
        if p["kind"] == "question":
            questions[p["qid"]] = bool(p["correct"])
            hops[p["qid"]] = int(p.get("num_hops") or 0)
            unparsed[p["qid"]] = not p.get("parsed", True)
        elif p["kind"] == "probe":
            probes.setdefault(p["qid"], []).append(bool(p["correct"]))
    return {"questions": questions, "probes": probes, "hops": hops, "unparsed": unparsed}


def only_hops(pred: dict, h: int) -> dict:
    """The predictions of the questions with ``h`` hops (and their probes)."""
    keep = {q for q, n in pred["hops"].items() if n == h}
    return {"questions": {q: v for q, v in pred["questions"].items() if q in keep},
            "probes": {q: v for q, v in pred["probes"].items() if q in keep},
            "hops": {q: h for q in keep}, "unparsed": {q: v for q, v in pred["unparsed"].items() if q in keep}}


def seeded(per_seed_preds: list[tuple[int, dict]]) -> dict:
    """One prediction set over several seeds: qids prefixed by their seed (different test items)."""
    out: dict = {"questions": {}, "probes": {}, "hops": {}, "unparsed": {}}
    for seed, pred in per_seed_preds:
        for part in out:
            out[part].update({f"{seed}:{q}": v for q, v in pred[part].items()})
    return out


def compare(sft: dict, kale: dict) -> dict:
    """KALE against SFT on the same questions: rates of each, the paired accuracy difference and the paired
    known & incorrect difference (per question: K&I under KALE minus K&I under SFT, over the questions
    probed under both), overall and per hop count."""
    def ki(pred: dict) -> dict:
        q, pr = pred["questions"], pred["probes"]
        return {qid: all(pr[qid]) and not q[qid] for qid in q if pr.get(qid)}

    def one(a: dict, b: dict) -> dict:
        return {"sft": rates(counts(a)), "kale": rates(counts(b)),
                "kale_minus_sft_paired": paired(a["questions"], b["questions"]),
                "known_and_incorrect_kale_minus_sft_paired": paired(ki(a), ki(b)),
                "unparsed": {"sft": sum(a["unparsed"].values()), "kale": sum(b["unparsed"].values())}}

    out = one(sft, kale)
    out["by_hops"] = {str(h): one(only_hops(sft, h), only_hops(kale, h)) for h in sorted(set(sft["hops"].values()))}
    return out


def counts(pred: dict) -> dict:
    q, pr = pred["questions"], pred["probes"]
    probed = [qid for qid in q if pr.get(qid)]
    known = [qid for qid in probed if all(pr[qid])]
    ki = [qid for qid in known if not q[qid]]
    return {"n": len(q), "correct": sum(q.values()), "n_probed": len(probed), "n_known": len(known), "n_ki": len(ki)}


def rates(c: dict) -> dict:
    return {"n": c["n"], "correct": c["correct"], "accuracy": c["correct"] / c["n"] if c["n"] else 0.0,
            "accuracy_ci95": wilson(c["correct"], c["n"]),
            "known_and_incorrect_rate": c["n_ki"] / c["n_probed"] if c["n_probed"] else 0.0,
            "known_and_incorrect_ci95": wilson(c["n_ki"], c["n_probed"]), "n_probed": c["n_probed"],
            "n_known": c["n_known"], "n_known_and_incorrect": c["n_ki"]}


def paired(a: dict, b: dict) -> dict:
    """b - a per question on the shared questions: mean difference and a 95% normal interval."""
    common = sorted(set(a) & set(b))
    d = [int(b[q]) - int(a[q]) for q in common]
    return paired_from_counts(len(d), d.count(1), d.count(-1))


def paired_from_counts(n: int, up: int, down: int) -> dict:
    """The paired difference of ``n`` per-question differences in {-1, 0, +1}, ``up`` of them +1 and ``down``
    -1: their mean and a 95% normal interval (the sample standard deviation, as ``statistics.stdev``). Counts
    are all it needs, so seeds pool from their stored counts as exactly as from their predictions."""
    out = {"n": n, "diff": float("nan"), "ci95": [float("nan")] * 2, "kale_only_right": up, "sft_only_right": down}
    if n < 2:
        return out
    m = (up - down) / n
    var = max(0.0, (up + down - n * m * m) / (n - 1))
    half = 1.96 * math.sqrt(var) / math.sqrt(n)
    return {**out, "diff": m, "ci95": [m - half, m + half]}


def _counts_of(r: dict) -> dict:
    """A ``rates`` dict back to its counts (entries written before ``correct`` was stored: from the accuracy)."""
    return {"n": r["n"], "correct": r["correct"] if "correct" in r else round(r["accuracy"] * r["n"]),
            "n_probed": r["n_probed"], "n_known": r["n_known"], "n_ki": r["n_known_and_incorrect"]}


def pool_compares(parts: list[dict]) -> dict:
    """Several ``compare`` results (one per seed: different test questions) as one, from their counts: the same
    numbers ``compare`` gives on the seeds' predictions put together (``seeded``)."""
    def one(cs: list[dict]) -> dict:
        out = {m: rates({f: sum(_counts_of(c[m])[f] for c in cs) for f in ("n", "correct", "n_probed", "n_known", "n_ki")})
               for m in ("sft", "kale")}
        for key in ("kale_minus_sft_paired", "known_and_incorrect_kale_minus_sft_paired"):
            out[key] = paired_from_counts(sum(c[key]["n"] for c in cs), sum(c[key].get("kale_only_right", 0) for c in cs),
                                          sum(c[key].get("sft_only_right", 0) for c in cs))
        out["unparsed"] = {m: sum(c["unparsed"][m] for c in cs) for m in ("sft", "kale")}
        return out

    out = one(parts)
    hops = sorted({h for c in parts for h in c.get("by_hops", {})}, key=int)
    out["by_hops"] = {h: one([c["by_hops"][h] for c in parts if h in c.get("by_hops", {})]) for h in hops}
    return out


def pool_gate(per_seed: list[dict]) -> dict:
    """The gate's numbers pooled over seeds, per model and hop count: multi-hop accuracy, hop-fact (probe) accuracy,
    known and known & incorrect over the probed questions (each question of h hops has h probes), and each
    question-blind prior's accuracy. A model is pooled over the seeds that evaluated it (``seeds``: the base model
    is evaluated at some seeds only)."""
    models: dict = {}
    for r in per_seed:
        for m, hops in (r.get("by_hops") or {}).items():
            if not hops:
                continue
            e = models.setdefault(m, {"seeds": [], "by_hops": {}})
            e["seeds"].append(r["seed"])
            for h, v in hops.items():
                n = v["n_with_probes"]
                c = e["by_hops"].setdefault(h, {"n": 0, "correct": 0, "probes": 0, "probes_correct": 0, "n_known": 0, "n_ki": 0})
                c["n"] += n
                c["correct"] += round(v["accuracy"] * n)
                c["probes"] += n * int(h)
                c["probes_correct"] += round(v["probe_accuracy"] * n * int(h))
                c["n_known"] += v["n_known"]
                c["n_ki"] += v["n_known_and_incorrect"]

    def row(c: dict) -> dict:
        return {**c, "accuracy": c["correct"] / c["n"] if c["n"] else 0.0, "accuracy_ci95": wilson(c["correct"], c["n"]),
                "probe_accuracy": c["probes_correct"] / c["probes"] if c["probes"] else 0.0,
                "known_and_incorrect_rate": c["n_ki"] / c["n"] if c["n"] else 0.0, "known_and_incorrect_ci95": wilson(c["n_ki"], c["n"]),
                # of the questions whose every hop fact is known, the share missed: a model that knows fewer facts
                # has fewer known & incorrect questions without composing any better; this rate does not move so
                "known_and_incorrect_given_known": c["n_ki"] / c["n_known"] if c["n_known"] else 0.0,
                "known_and_incorrect_given_known_ci95": wilson(c["n_ki"], c["n_known"])}

    out: dict = {"models": {}, "question_blind": {}}
    for m, e in models.items():
        total = {k: sum(c[k] for c in e["by_hops"].values()) for k in ("n", "correct", "probes", "probes_correct", "n_known", "n_ki")}
        out["models"][m] = {"seeds": e["seeds"], "all": row(total),
                            "by_hops": {h: row(c) for h, c in sorted(e["by_hops"].items(), key=lambda x: int(x[0]))}}
    for r in per_seed:
        for prior, v in (r.get("question_blind") or {}).items():
            e = out["question_blind"].setdefault(prior, {"seeds": [], "n": 0, "correct": 0.0, "chance_sum": 0.0, "by_hops": {}})
            e["seeds"].append(r["seed"])
            e["n"] += v["n"]
            e["correct"] += v["accuracy"] * v["n"]  # a prior's guess may split ties: expected correct, not a count
            e["chance_sum"] += v["chance"] * v["n"]
            for h, hv in (v.get("by_hops") or {}).items():
                b = e["by_hops"].setdefault(h, {"n": 0, "correct": 0.0})
                b["n"] += hv["n"]
                b["correct"] += hv["accuracy"] * hv["n"]
    for e in out["question_blind"].values():
        e["accuracy"] = e["correct"] / e["n"] if e["n"] else 0.0
        e["chance"] = e.pop("chance_sum") / e["n"] if e["n"] else 0.0
        for b in e["by_hops"].values():
            b["accuracy"] = b["correct"] / b["n"] if b["n"] else 0.0
    return out


def pool_general(per_seed: list[dict]) -> dict:
    """The general questions over the seeds that recorded them: each model's accuracy (the same 200 questions at
    every seed, so a mean over seeds) and KALE - SFT paired per (seed, question)."""
    have = [r for r in per_seed if (r.get("general") or {}).get("kale_minus_sft")]
    if not have:
        return {}
    acc = {m: statistics.mean(r["general"]["accuracy"][m] for r in have if r["general"]["accuracy"].get(m) is not None)
           for m in dict.fromkeys(m for r in have for m, a in r["general"]["accuracy"].items() if a is not None)}
    d = [r["general"]["kale_minus_sft"] for r in have]
    return {"seeds": [r["seed"] for r in have], "mean_accuracy": acc,
            "kale_minus_sft": paired_from_counts(sum(x["n"] for x in d), sum(x["only_b_right"] for x in d),
                                                 sum(x["only_a_right"] for x in d))}


# overrides that add a measurement without changing any output that is compared (the base model's evaluation is
# a stage of its own; SFT's and KALE's stages do not depend on it): they do not stop seeds from pooling
ADD_ONLY = ("eval_base=",)


def same_settings(stored: dict, size: str, extra: list[str]) -> bool:
    """Whether a stored entry was made under this run's settings (size, its overrides and the extra ones, but for
    ``ADD_ONLY``): only then do its seeds pool with this run's."""
    cfg = stored.get("config") or {}

    def outputs(xs) -> list[str]:
        return [x for x in xs or [] if not x.startswith(ADD_ONLY)]

    return (stored.get("size") == size and cfg.get("size_overrides") == SIZES[size]
            and outputs(cfg.get("extra_overrides")) == outputs(extra))


def merge_seeds(stored: list[dict], fresh: list[dict]) -> list[dict]:
    """Per-seed results: this run's, plus the stored ones of the seeds it did not run; by seed."""
    ran = {r["seed"] for r in fresh}
    return sorted([r for r in stored if r["seed"] not in ran] + list(fresh), key=lambda r: r["seed"])


def merge_grid(stored: list[dict], fresh: list[dict]) -> list[dict]:
    """KA points: this run's, plus the stored ones of the (setting, seed) pairs it did not run."""
    ran = {(g["name"], g["seed"]) for g in fresh}
    order = {n: i for i, n in enumerate(KA_GRID)}
    return sorted([g for g in stored if (g["name"], g["seed"]) not in ran] + list(fresh),
                  key=lambda g: (order.get(g["name"], len(order)), g["seed"]))


def pool_grid(grid: list[dict], per_seed: list[dict]) -> dict:
    """Each KA setting pooled over the seeds it ran at, beside the default KA settings at those same seeds (the
    seeds' own KALE models): like is compared with like, whatever seeds a setting has."""
    by_seed = {r["seed"]: r for r in per_seed if r.get("compare")}
    out = {}
    for name in dict.fromkeys(g["name"] for g in grid):
        points = [g for g in grid if g["name"] == name]
        seeds = sorted(g["seed"] for g in points)
        gen = [g["general_kale_minus_sft"] for g in points if (g.get("general_kale_minus_sft") or {}).get("n")]
        out[name] = {"seeds": seeds, "overrides": points[0]["overrides"], "compare": pool_compares([g["compare"] for g in points]),
                     "general_kale_minus_sft": paired_from_counts(sum(x["n"] for x in gen), sum(x["only_b_right"] for x in gen),
                                                                  sum(x["only_a_right"] for x in gen)) if gen else None,
                     "default_at_same_seeds": (pool_compares([by_seed[s]["compare"] for s in seeds])
                                               if all(s in by_seed for s in seeds) else None)}
    return out


def run_seed(size: str, seed: int, extra: list[str], out_root: Path, key: str = "") -> dict:
    from kale_ray.config import KALEJobConfig, load_config
    from kale_ray.methods.kale.recipe import run_demo

    out = out_root / (key or size) / f"seed{seed}"
    overrides = SIZES[size] + [f"out={out}", f"synth.qa.seed={seed}", f"synth.paths.seed={seed}", f"train.seed={seed}"] + extra
    cfg = load_config(KALEJobConfig, ROOT / "configs" / "demo.yaml", overrides)
    t = time.perf_counter()
    la = os.getloadavg()[0]
    metrics = run_demo(cfg, progress=lambda m: print(f"[seed {seed}] {m}", flush=True))
    wall = time.perf_counter() - t
    preds = {name: read_predictions(out / f"eval_{name}") for name in ("base", "sft", "kale")
             if (out / f"eval_{name}" / "predictions.jsonl").exists()}  # eval_base=false: no base
    return {"seed": seed, "out": str(out), "overrides": overrides, "wall_s": wall, "loadavg_before": la,
            "loadavg_after": os.getloadavg()[0], "timings": metrics.get("timings"),
            "train": metrics.get("train"), "synthesis_rows": (metrics.get("synthesis") or {}).get("rows_out"),
            "counts": {k: counts(v) for k, v in preds.items()},
            "metrics": {k: rates(counts(v)) for k, v in preds.items()},
            "kale_minus_sft_paired": paired(preds["sft"]["questions"], preds["kale"]["questions"]),
            "gate": metrics.get("gate"), "question_blind": metrics.get("question_blind"),
            "by_hops": {k: metrics["eval"][k].get("known_and_incorrect_by_hops") for k in metrics["eval"]},
            "path_mode": {"heuristic": cfg.synth.paths.heuristic,
                          "follow_question_relations": cfg.synth.paths.follow_question_relations,
                          "teacher": cfg.synth.generation.backend},
            "compare": compare(preds["sft"], preds["kale"]),
            # the held-out general questions (never trained on): each model's accuracy and KALE - SFT paired
            "general": {"accuracy": {k: (v.get("general") or {}).get("accuracy") for k, v in metrics["eval"].items()},
                        "n": max([(v.get("general") or {}).get("n") or 0 for v in metrics["eval"].values()] or [0]),
                        "kale_minus_sft": (metrics.get("general") or {}).get("kale_minus_sft")}}


# issue 15 item 4: the KA settings the paper leaves open, one seed each, against the seed's own SFT model (the
# defaults: forward KL, T = 1, lam = 1, no teacher CE). Each point trains KALE once more on the seed's rows.
KA_GRID = {
    "reverse": ["train.ka.direction=reverse"],
    "T2": ["train.ka.temperature=2"],
    "lam0.5": ["train.ka.lam=0.5"],
    "lam2": ["train.ka.lam=2"],
    "teacher_ce1": ["train.ka.teacher_ce_weight=1"],
}


def run_ka_point(size: str, seed: int, extra: list[str], out_root: Path, key: str, name: str) -> dict:
    """One KA setting at one seed: KALE trained again on that seed's rows (its synthesis, training rows, SFT
    model and SFT evaluation are the seed's own, reused) into ``<seed>/ka/<name>``, evaluated on the same
    test and general questions, compared per question with the seed's SFT. Its two stages are ``Run``
    stages of that folder: a rerun with the same settings reuses them; other settings are refused."""
    import dataclasses

    from kale_ray.config import KALEJobConfig, load_config, to_dict
    from kale_ray.methods.kale.evaluate import evaluate
    from kale_ray.methods.kale.general import general_correct, general_file
    from kale_ray.runtime.ray import init_ray_for
    from kale_ray.runtime.report import paired_difference
    from kale_ray.runtime.stages import Run, stage_config, without
    from kale_ray.train.trainer import run_training, stage_settings, training_stage

    seed_out = out_root / key / f"seed{seed}"
    out = seed_out / "ka" / name
    overrides = (SIZES[size] + [f"out={seed_out}", f"synth.qa.seed={seed}", f"synth.paths.seed={seed}",
                                f"train.seed={seed}"] + extra + KA_GRID[name])
    cfg = load_config(KALEJobConfig, ROOT / "configs" / "demo.yaml", overrides)
    for need in ("train_rows", "eval_sft/predictions.jsonl", "synth/qa/test.jsonl"):
        if not (seed_out / need).exists():
            raise SystemExit(f"bench_accuracy: --ka-grid needs seed {seed}'s run first ({seed_out / need} is missing)")
    run = Run(out, cfg, on_change=cfg.on_change, progress=print, label=f"ka {name}")
    init_ray_for(cfg)
    t = time.perf_counter()
    tcfg = stage_config(cfg.train, cfg.on_change, loss="kale", data=str(seed_out / "train_rows"),
                        out_dir=str(out / "kale"))

    def train() -> dict:
        res = run_training(tcfg, run_name=f"ka-{name}")
        return {"summary": res.summary, "merged": res.merged_dir, "settings_hash": training_stage(tcfg).hash}

    trained = run.stage("train.kale", train, settings=stage_settings(tcfg, f"ka-{name}"), outputs=["kale"])
    test_file = seed_out / "synth" / "qa" / "test.jsonl"
    general = general_file(cfg.eval.general, "eval.general")
    ecfg = dataclasses.replace(cfg.eval, model=dataclasses.replace(cfg.train.model, name=trained["merged"]),
                               data=str(test_file), out_dir=str(out / "eval_kale"))
    run.stage("eval.kale", lambda: evaluate(ecfg, label=f"kale-{name}"),
              settings={"eval": without(to_dict(ecfg), ("model.name", "model.cache_dir")), "model": trained["settings_hash"]},
              content_inputs=[test_file] + ([general] if general else []), outputs=["eval_kale"])
    sft, kale = read_predictions(seed_out / "eval_sft"), read_predictions(out / "eval_kale")
    summary = trained["summary"]
    return {"name": name, "seed": seed, "overrides": KA_GRID[name], "out": str(out), "wall_s": time.perf_counter() - t,
            "ka": to_dict(cfg.train.ka), "compare": compare(sft, kale),
            "general_kale_minus_sft": paired_difference(general_correct(seed_out / "eval_sft"), general_correct(out / "eval_kale")),
            "train": {k: summary.get(k) for k in ("steps", "final_loss", "first_loss", "wall_seconds")},
            "timings": run.timings()}


def seed_list(text: str, flag: str) -> list[int]:
    """``"0,1, 2"`` -> ``[0, 1, 2]``; anything else stops with one line naming the flag and the item."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            out.append(int(item))
        except ValueError:
            raise SystemExit(f"bench_accuracy: {flag} {text!r}: {item!r} is not a seed (comma-separated integers)") from None
    return out


def stored_entry(path: Path, key: str) -> dict | None:
    """The entry ``key`` of the results file, or None; a file that is not JSON stops with one line (its seeds would
    otherwise be overwritten unseen)."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get(key)
    except json.JSONDecodeError as e:
        raise SystemExit(f"bench_accuracy: {path}: not JSON (line {e.lineno}: {e.msg}); fix or move it to keep its seeds") from None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="smoke")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    ap.add_argument("--out-root", default=str(ROOT / "runs" / "bench_accuracy"))
    ap.add_argument("--key", default="", help="the entry of accuracy.json (and run folder) to write; default: --size "
                    "(e.g. --key testbed-3ep with train.epochs=3 keeps the testbed entry)")
    ap.add_argument("--quick", action="store_true", help="= --size smoke (what run_all.py --quick passes)")
    ap.add_argument("--ka-grid", default="", help="after the seeds: the KA settings (comma-separated names of KA_GRID, "
                    "or 'all') at the first seed, each against that seed's SFT")
    ap.add_argument("--ka-seeds", default="", help="the seeds (comma-separated) the KA settings run at; default: the "
                    "first of --seeds; each needs that seed's run (in this call or an earlier one)")
    ap.add_argument("overrides", nargs="*", help="extra KALEJobConfig overrides key.sub=value")
    args = ap.parse_args(argv)
    if args.quick:
        args.size = "smoke"
    seeds = seed_list(args.seeds, "--seeds")
    names = list(KA_GRID) if args.ka_grid == "all" else [n for n in args.ka_grid.split(",") if n]
    unknown = [n for n in names if n not in KA_GRID]
    if unknown:
        raise SystemExit(f"bench_accuracy: --ka-grid {unknown}: not in {sorted(KA_GRID)}")
    ka_seeds = seed_list(args.ka_seeds, "--ka-seeds") or seeds[:1]
    if names and not ka_seeds:
        raise SystemExit("bench_accuracy: --ka-grid with an empty --seeds needs --ka-seeds (the seeds to train at)")
    key = args.key or args.size
    # the entry's seeds and KA points from earlier calls pool with this call's when made under the same settings
    stored = stored_entry(RESULTS_FILE, key)
    if stored and not same_settings(stored, args.size, args.overrides):
        print(f"bench_accuracy: the stored entry {key!r} (seeds {stored.get('seeds')}) was made under other settings "
              f"({(stored.get('config') or {}).get('size_overrides')} + {(stored.get('config') or {}).get('extra_overrides')}); "
              f"this run replaces it, nothing of it is pooled", flush=True)
        stored = None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load = Load()
    per_seed = []
    for s in seeds:
        r = run_seed(args.size, s, args.overrides, Path(args.out_root), key)
        per_seed.append(r)
        m = r["metrics"]
        print(f"seed {s}: SFT acc {m['sft']['accuracy']:.3f} {[round(x, 3) for x in m['sft']['accuracy_ci95']]}, "
              f"KALE acc {m['kale']['accuracy']:.3f} {[round(x, 3) for x in m['kale']['accuracy_ci95']]} "
              f"(n={m['kale']['n']}); K&I SFT {m['sft']['known_and_incorrect_rate']:.3f} KALE "
              f"{m['kale']['known_and_incorrect_rate']:.3f}; paired KALE-SFT {r['kale_minus_sft_paired']['diff']:+.3f}",
              flush=True)
        load.mark(f"seed {s}")
        import ray

        if ray.is_initialized():  # a fresh local Ray per seed: nothing of one seed's workers carries over
            ray.shutdown()

    fresh_seeds = [r["seed"] for r in per_seed]
    per_seed = merge_seeds((stored or {}).get("per_seed") or [], per_seed)
    if not per_seed:
        raise SystemExit(f"bench_accuracy: no seeds to report: --seeds is empty and {RESULTS_FILE} has no entry {key!r} "
                         "made under these settings")
    reused = [r["seed"] for r in per_seed if r["seed"] not in fresh_seeds]
    if reused:
        print(f"bench_accuracy: pooling the stored seeds {reused} of {key!r} (same settings) with this run's {fresh_seeds}", flush=True)
    seeds = [r["seed"] for r in per_seed]
    pooled = {}
    for k in dict.fromkeys(m for r in per_seed for m in r["counts"]):  # a model over the seeds that evaluated it
        have = [r for r in per_seed if k in r["counts"]]
        pooled[k] = rates({f: sum(r["counts"][k][f] for r in have) for f in have[0]["counts"][k]})
        if len(have) < len(per_seed):
            pooled[k]["seeds"] = [r["seed"] for r in have]
    pooled["gate"] = pool_gate(per_seed)
    pooled["general"] = pool_general(per_seed)
    # paired over all (seed, question) pairs: questions of different seeds are different test items
    pooled["compare"] = pool_compares([r["compare"] for r in per_seed])
    pooled["kale_minus_sft_paired"] = pooled["compare"]["kale_minus_sft_paired"]
    diffs = [r["metrics"]["kale"]["accuracy"] - r["metrics"]["sft"]["accuracy"] for r in per_seed]
    across = {"per_seed_diff": diffs, "mean": statistics.mean(diffs)}
    if len(diffs) > 1:
        half = t_quantile_975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        across["ci95_t"] = [across["mean"] - half, across["mean"] + half]
    pts = 100 * pooled["kale"]["accuracy"] - 100 * pooled["sft"]["accuracy"]
    print(f"pooled over seeds {seeds}: SFT {pooled['sft']['accuracy']:.3f} {[round(x, 3) for x in pooled['sft']['accuracy_ci95']]}, "
          f"KALE {pooled['kale']['accuracy']:.3f} {[round(x, 3) for x in pooled['kale']['accuracy_ci95']]}, "
          f"KALE - SFT {pts:+.2f} points (paired 95% CI {[round(100 * x, 2) for x in pooled['kale_minus_sft_paired']['ci95']]}); "
          f"K&I SFT {pooled['sft']['known_and_incorrect_rate']:.3f} KALE {pooled['kale']['known_and_incorrect_rate']:.3f}")

    grid: list[dict] = []
    result = {
        "benchmark": "accuracy testbed: KALE vs SFT",
        "date": now(),
        "target": f"report what we get ({PAPER})",
        "size": args.size,
        "full_size_ran": args.size == "full",
        "full_size_note": None if args.size == "full" else "the full size has not been run: this is the "
                          f"{args.size} configuration",
        "note": {"smoke": "smoke size: a random tiny Llama and a template teacher; the numbers test the machinery, not the method",
                 "medium": "medium size: the demo with template rationales (no LLM teacher)",
                 "demo": "demo size: exactly configs/demo.yaml per seed (vLLM teacher), seeds pooled",
                 "full": "full size",
                 "testbed": "testbed: HPO, matched distractors (issue 15), template rationales"}[args.size],
        "headline": {"kale_minus_sft_points": pts, "paired_ci95_points": [100 * x for x in pooled["kale_minus_sft_paired"]["ci95"]],
                     "sft_accuracy": pooled["sft"]["accuracy"], "kale_accuracy": pooled["kale"]["accuracy"],
                     "sft_known_and_incorrect": pooled["sft"]["known_and_incorrect_rate"],
                     "kale_known_and_incorrect": pooled["kale"]["known_and_incorrect_rate"],
                     "n_questions_pooled": pooled["kale"]["n"], "seeds": seeds},
        "machine": machine(),
        "versions": versions("torch", "transformers", "vllm", "ray", "deepspeed", "peft"),
        "config": {"base": "configs/demo.yaml", "size_overrides": SIZES[args.size], "extra_overrides": args.overrides,
                   "seed_sets": ["synth.qa.seed", "synth.paths.seed", "train.seed"]},
        "seeds": seeds,
        "per_seed": per_seed,
        "pooled": pooled,
        "across_seeds": across,
        "ka_grid": [],  # filled below, point by point: the stored points and this call's
        "load": load.as_dict(),
    }
    stored_grid = (stored or {}).get("ka_grid") or []
    result["ka_grid"] = merge_grid(stored_grid, [])
    result["ka_pooled"] = pool_grid(result["ka_grid"], per_seed)
    if stored and stored.get("load"):
        result["load_earlier_calls"] = stored.get("load_earlier_calls", []) + [stored["load"]]
    path = write_result("accuracy", result, key=key)
    print(f"wrote {path}")
    for ka_seed in ka_seeds:
        if names and ka_seed not in seeds:
            raise SystemExit(f"bench_accuracy: --ka-seeds {ka_seed}: no run of seed {ka_seed} in {key!r} (seeds {seeds})")
        for name in names:
            g = run_ka_point(args.size, ka_seed, args.overrides, Path(args.out_root), key, name)
            c = g["compare"]
            print(f"KA {name} (seed {ka_seed}): KALE {c['kale']['accuracy']:.3f} vs SFT {c['sft']['accuracy']:.3f}, paired "
                  f"{100 * c['kale_minus_sft_paired']['diff']:+.1f} points {[round(100 * x, 1) for x in c['kale_minus_sft_paired']['ci95']]}; "
                  f"K&I {c['kale']['n_known_and_incorrect']} vs {c['sft']['n_known_and_incorrect']}; unparsed "
                  f"{c['unparsed']['kale']} vs {c['unparsed']['sft']}", flush=True)
            grid.append(g)
            load.mark(f"ka {name} seed {ka_seed}")
            result["load"] = load.as_dict()
            result["ka_grid"] = merge_grid(stored_grid, grid)
            result["ka_pooled"] = pool_grid(result["ka_grid"], per_seed)
            print(f"wrote {write_result('accuracy', result, key=key)}", flush=True)  # after each point

    return result


if __name__ == "__main__":  # vLLM spawns its engine process
    main()
