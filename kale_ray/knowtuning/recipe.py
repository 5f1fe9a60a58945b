"""KnowTuning Stage II (knowledge comparison) end to end: ``run_dpo_stage(cfg)``.

    python jobs/knowtuning_dpo.py --config configs/knowtuning_dpo.yaml

1. answers: KG-neighbourhood answers or a user's fact file -> comparison pairs (delete / revise /
   shuffle) -> ``out/pairs.jsonl`` (facts and what was changed), ``out/pair_rejects.jsonl``;
2. rows: prompt rendered with the student's chat template -> ``{id, prompt, chosen, rejected, kind}``;
3. reference: with ``train.dpo.reference: precomputed``, one batched pass of the base model adds
   ``ref_chosen_logp`` / ``ref_rejected_logp`` (a Ray Data actor, or this process) -> ``out/data/``;
4. DPO on Ray Train + DeepSpeed (``loss: dpo``) -> ``out/train/`` (adapter, merged model, history);
5. ``score_after``: the trained policy scores the same pairs: implicit-reward accuracy and margin,
   overall and per kind -> ``out/summary.json`` with the time of every stage.

The whole recipe (Stage I, this stage from the Stage I model, the fact-level evaluation) is
:func:`kale_ray.knowtuning.pipeline.run_knowtuning`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from kale_ray.config import dump_config
from kale_ray.core.rejects import Rejects
from kale_ray.knowtuning.config import KnowTuningDPOJobConfig


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
    tmp.replace(path)


def _init_ray(cfg: KnowTuningDPOJobConfig) -> None:
    from kale_ray.ray_init import init_ray

    init_ray(cfg.ray_address, cfg.train.num_workers)


def make_pairs(cfg: KnowTuningDPOJobConfig) -> tuple[list[dict], Rejects, dict]:
    """Comparison pairs from the configured answers; rejects (bad input lines, skipped kinds) with reasons."""
    from kale_ray.core.kg import load_kg
    from kale_ray.knowtuning.data import build_pairs, neighbourhood_qa, read_fact_qa_jsonl

    p = cfg.pairs
    kg = load_kg(p.kg.source, p.kg.names, p.kg.on_error)
    rejects = Rejects()
    if p.source == "neighbourhood":
        qas = neighbourhood_qa(kg, p.num_questions, p.facts_per_answer, np.random.default_rng([p.seed, 0]),
                               min_facts=p.min_facts)
    else:
        qas = read_fact_qa_jsonl(p.source, rejects)
    pairs = build_pairs(qas, kg, p.seed, p.beta, p.kinds, rejects)
    info = {"questions": len(qas), "pairs": len(pairs), "by_kind": dict(Counter(r["kind"] for r in pairs)),
            "facts_per_answer": float(np.mean([len(q["facts"]) for q in qas])) if qas else 0.0,
            "rejected": rejects.counts(), "kg": kg.summary()}
    return pairs, rejects, info


def score_pairs(rows: list[dict], base_path: str, policy_path: str, adapter: str | None,
                cfg: KnowTuningDPOJobConfig) -> dict:
    """Implicit-reward accuracy / margin of the trained policy (``policy_path`` + ``adapter``) on ``rows``.

    The reference is the rows' precomputed columns when they have them, else ``base_path`` scored now.
    """
    from kale_ray.knowtuning.dpo import REF_CHOSEN, REF_REJECTED, pair_logps, reward_stats

    t = cfg.train
    kw = dict(max_seq_len=t.max_seq_len, batch_size=cfg.reference_batch_size, mode=cfg.reference_with,
              use_gpu=t.use_gpu, trust_remote_code=t.model.trust_remote_code)
    pc, pr = pair_logps(rows, policy_path, adapter=adapter, **kw)
    if all(REF_CHOSEN in r for r in rows):
        rc = np.array([r[REF_CHOSEN] for r in rows], dtype=float)
        rr = np.array([r[REF_REJECTED] for r in rows], dtype=float)
    else:
        rc, rr = pair_logps(rows, base_path, **kw)
    kinds = np.array([r.get("kind", "") for r in rows])
    out = reward_stats(pc, pr, rc, rr, t.dpo.beta)
    out["by_kind"] = {k: reward_stats(pc[kinds == k], pr[kinds == k], rc[kinds == k], rr[kinds == k], t.dpo.beta)
                      for k in sorted(set(kinds.tolist()))}
    return out


def run_dpo_stage(cfg: KnowTuningDPOJobConfig) -> dict[str, Any]:
    """Pairs -> (reference pass) -> DPO -> (reward check); returns and writes ``out/summary.json``."""
    from kale_ray.knowtuning.data import render_pair_rows
    from kale_ray.knowtuning.dpo import add_reference_logps
    from kale_ray.models import load_tokenizer, resolve_model
    from kale_ray.train.trainer import run_training

    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    pairs, rejects, pair_info = make_pairs(cfg)
    if not pairs:
        raise ValueError(f"no comparison pairs could be made (rejected: {rejects.counts()})")
    _write_jsonl(out / "pairs.jsonl", pairs)
    rejects.write_jsonl(out / "pair_rejects.jsonl")
    model_path = resolve_model(cfg.train.model.name, cfg.train.model.cache_dir)
    rows = render_pair_rows(pairs, load_tokenizer(model_path, cfg.train.model.trust_remote_code))
    seconds["pairs"] = round(time.perf_counter() - t0, 2)

    _init_ray(cfg)
    reference: dict[str, Any] = {"mode": cfg.train.dpo.reference}
    if cfg.train.dpo.reference == "precomputed":
        t0 = time.perf_counter()
        rows, ref_summary = add_reference_logps(rows, model_path, cfg.train, cfg.reference_batch_size,
                                                cfg.reference_with)
        reference.update(ref_summary)
        seconds["reference"] = round(time.perf_counter() - t0, 2)
    _write_jsonl(out / "data" / "train.jsonl", rows)

    t0 = time.perf_counter()
    train_cfg = dataclasses.replace(cfg.train, data=str(out / "data"), out_dir=str(out / "train"))
    result = run_training(train_cfg, run_name="dpo")
    seconds["train"] = round(time.perf_counter() - t0, 2)

    summary: dict[str, Any] = {"pairs": pair_info, "reference": reference,
                               "train": {k: result.summary.get(k) for k in (
                                   "steps", "samples", "first_loss", "final_loss", "seconds_per_step",
                                   "rejected", "wall_seconds")},
                               "first_step": result.history[0] if result.history else None,
                               "last_step": result.history[-1] if result.history else None,
                               "adapter": result.adapter_dir, "merged": result.merged_dir}
    if cfg.score_after:
        t0 = time.perf_counter()
        # LoRA: the base + the adapter (the merged folder is the same model); full fine-tuning: merged/.
        policy = model_path if result.adapter_dir else result.merged_dir
        summary["rewards_after"] = score_pairs(rows, model_path, policy, result.adapter_dir, cfg)
        seconds["score_after"] = round(time.perf_counter() - t0, 2)
    summary["seconds"] = seconds
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
