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

Steps 1-2 (``pairs``), 3 (``reference``), 4 (``train``) and 5 (``score_after``) are stages of a
:class:`~kale_ray.runtime.stages.Run` over ``out``: a rerun with the same settings reuses them, one
with other settings stops naming the changed keys (``on_change: error``) or redoes the first
changed stage and every later one (``on_change: overwrite``).

The whole recipe (Stage I, this stage from the Stage I model, the fact-level evaluation) is
:func:`kale_ray.methods.knowtuning.recipe.run_knowtuning`.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kale_ray.config import to_dict
from kale_ray.core.io import read_jsonl, write_json, write_jsonl
from kale_ray.core.rejects import Rejects
from kale_ray.methods.knowtuning.config import KnowTuningDPOJobConfig
from kale_ray.runtime.ray import init_ray_for
from kale_ray.runtime.stages import stage_config

TRAIN_SUMMARY_KEYS = ("steps", "samples", "first_loss", "final_loss", "seconds_per_step", "rejected", "wall_seconds")


def make_pairs(cfg: KnowTuningDPOJobConfig) -> tuple[list[dict], Rejects, dict]:
    """Comparison pairs from the configured answers; rejects (bad input lines, skipped kinds) with reasons."""
    from kale_ray.core.kg import load_kg
    from kale_ray.methods.knowtuning.data import build_pairs, neighbourhood_qa, read_fact_qa_jsonl

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
    from kale_ray.methods.knowtuning.dpo import REF_CHOSEN, REF_REJECTED, pair_logps, reward_stats

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


def run_dpo_stage(cfg: KnowTuningDPOJobConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Pairs -> (reference pass) -> DPO -> (reward check); returns and writes ``out/summary.json``."""
    from kale_ray.methods.knowtuning.data import render_pair_rows
    from kale_ray.methods.knowtuning.dpo import add_reference_logps
    from kale_ray.models import load_tokenizer, resolve_model
    from kale_ray.runtime.stages import Run
    from kale_ray.train.trainer import run_training, stage_settings

    out = Path(cfg.out).expanduser().resolve()
    run = Run(out, cfg, on_change=cfg.on_change, progress=progress, label="knowtuning-dpo")
    t = cfg.train
    model_path = resolve_model(t.model.name, t.model.cache_dir)

    def pairs() -> dict:
        rows, rejects, info = make_pairs(cfg)
        if not rows:
            raise ValueError(f"no comparison pairs could be made (rejected: {rejects.counts()})")
        write_jsonl(out / "pairs.jsonl", rows)
        rejects.write_jsonl(out / "pair_rejects.jsonl")
        return info

    def reference() -> dict:
        rows = render_pair_rows(read_jsonl(out / "pairs.jsonl"), load_tokenizer(model_path, t.model.trust_remote_code))
        info: dict[str, Any] = {"mode": t.dpo.reference}
        if t.dpo.reference == "precomputed":
            init_ray_for(cfg)
            rows, ref_summary = add_reference_logps(rows, model_path, t, cfg.reference_batch_size, cfg.reference_with)
            info.update(ref_summary)
        write_jsonl(out / "data" / "train.jsonl", rows)
        return info

    train_cfg = stage_config(t, cfg.on_change, data=str(out / "data"), out_dir=str(out / "train"))

    def train() -> dict:
        init_ray_for(cfg)
        progress(f"[knowtuning-dpo] train: dpo on Ray Train + DeepSpeed ZeRO-{t.zero_stage}, {t.num_workers} workers")
        res = run_training(train_cfg, run_name="dpo")
        return {"train": {k: res.summary.get(k) for k in TRAIN_SUMMARY_KEYS},
                "first_step": res.history[0] if res.history else None,
                "last_step": res.history[-1] if res.history else None,
                "adapter": res.adapter_dir, "merged": res.merged_dir}

    def score() -> dict:
        init_ray_for(cfg)
        # LoRA: the base + the adapter (the merged folder is the same model); full fine-tuning: merged/.
        policy = model_path if trained["adapter"] else trained["merged"]
        return score_pairs(read_jsonl(out / "data" / "train.jsonl"), model_path, policy, trained["adapter"], cfg)

    user_file = [] if cfg.pairs.source == "neighbourhood" else [cfg.pairs.source]
    pair_info = run.stage("pairs", pairs, settings=to_dict(cfg.pairs), content_inputs=user_file,
                          outputs=["pairs.jsonl", "pair_rejects.jsonl"])
    reference_info = run.stage("reference", reference, outputs=["data"], settings={
        "model": {k: v for k, v in to_dict(t.model).items() if k != "cache_dir"}, "reference": t.dpo.reference,
        "max_seq_len": t.max_seq_len})
    trained = run.stage("train", train, settings=stage_settings(train_cfg, "dpo"), outputs=["train"])
    summary: dict[str, Any] = {"pairs": pair_info, "reference": reference_info, **trained}
    if cfg.score_after:
        summary["rewards_after"] = run.stage("score_after", score, settings={})
    summary["seconds"] = dict(run.seconds)
    write_json(out / "summary.json", summary)
    return summary
