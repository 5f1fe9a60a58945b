"""KaLM end to end on real Ray (Ray Data embedding actor, Ray Train + DeepSpeed ZeRO-2 gloo, vLLM CPU).

``builtin:tiny-llama`` (random weights) on a slice of UMLS: 32 training triples (64 rows with
the inverse relations), 2 workers, LoRA, 3 steps; KG completion before and after on 12 test
triples (24 queries); KGQA through vLLM on a handful of questions (after alignment). A rerun in
the same folder reuses every stage; one with a changed data setting is refused. About 5 minutes on 2 cores.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kale_ray.config import load_config
from kale_ray.methods.kalm.config import KaLMJobConfig
from kale_ray.runtime.stages import StaleOutputError

pytestmark = pytest.mark.integration


def test_kalm_recipe_tiny(ray_local, tmp_path):
    from kale_ray.methods.kalm.recipe import run_kalm

    overrides = [
        f"out={tmp_path / 'kalm'}",
        "data.max_train_triples=32",
        "train.model.name=builtin:tiny-llama", "train.model.max_model_len=512",
        "train.num_workers=2", "train.zero_stage=2", "train.max_steps=3", "train.micro_batch_size=8",
        "train.lr=0.005", "train.warmup_steps=0", "train.kalm.lm_weight=0.5", "train.kalm.gather_negatives=true",
        "eval.max_test_triples=12", "eval.embed_batch_size=16", "eval.query_chunk=7", "eval.entity_chunk=50",
        "kgqa_before=false", "eval.kgqa_per_task=2", "eval.generation.max_tokens=8", "eval.generation.batch_size=8",
    ]
    cfg = load_config(KaLMJobConfig, None, overrides)
    m = run_kalm(cfg)
    out = Path(cfg.out)

    # data: 32 triples + their inverses
    assert m["data"]["training_rows"] == 64 and m["data"]["inverse_rows"] == 32
    # training: 3 finite steps of both terms; negatives come from both workers' micro-batches
    history = [json.loads(x) for x in (out / "train" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3]
    for h in history:
        assert all(math.isfinite(h[k]) for k in ("loss", "exp", "lm", "pos_cos"))
        assert h["samples"] == 16 and 0 < h["negatives"] <= 15
    # gathered: up to 15 negatives per row (2 workers x 8 rows - 1, fewer where masked); per worker at most 7
    assert max(h["negatives"] for h in history) > 7
    assert history[-1]["loss"] < history[0]["loss"]
    assert (out / "train" / "merged" / "model.safetensors").exists()

    # KG completion before and after, both directions, every rank inside [1, 135]
    for label in ("before", "after"):
        kgc = m["eval"][label]["kg_completion"]
        assert kgc["tail"]["n"] == kgc["head"]["n"] == 12 and kgc["both"]["n"] == 24
        assert 0 < kgc["both"]["mrr"] <= 1 and 1 <= kgc["both"]["mr"] <= 135
        ranks = [json.loads(x)["rank"] for x in (out / f"eval_{label}" / "ranks.jsonl").read_text().splitlines()]
        assert len(ranks) == 24 and all(1 <= r <= 135 for r in ranks)
    before = [json.loads(x)["rank"] for x in (out / "eval_before" / "ranks.jsonl").read_text().splitlines()]
    after = [json.loads(x)["rank"] for x in (out / "eval_after" / "ranks.jsonl").read_text().splitlines()]
    assert before != after  # the aligned model ranks differently

    # KGQA through vLLM (after only: one engine start): every item generated and scored, per task
    assert "kgqa" not in m["eval"]["before"]
    qa = m["eval"]["after"]["kgqa"]
    assert {"tail", "head", "relation", "triple", "all"} <= set(qa)
    assert qa["triple"]["n"] == 2 and qa["all"]["n"] >= 7
    rows = [json.loads(x) for x in (out / "eval_after" / "kgqa.jsonl").read_text().splitlines()]
    assert len(rows) == qa["all"]["n"] and not any(r["skipped"] for r in rows)
    assert all(r["generation"] for r in rows)  # the random model says something, if not the answer

    report = (out / "report.md").read_text()
    assert "| both | MRR |" in report and "## KGQA" in report and "| eval_after.kgqa |" in report

    # A rerun with the same settings reuses every stage (no retraining, no re-evaluation), with their first times
    again = run_kalm(cfg)
    assert again["eval"] == m["eval"] and again["data"] == m["data"]
    assert again["reused_stages"] == ["prepare", "test_triples", "eval_before", "train", "eval_after"]
    assert all(again["timings"][k] == m["timings"][k] for k in again["reused_stages"])

    # One changed setting of the first stage: refused with the key, before anything is written
    kept = {p: (out / p).read_bytes() for p in ("config.yaml", "data/train.jsonl", "metrics.json",
                                                 "stages/prepare.json", "train/train_summary.json")}
    with pytest.raises(StaleOutputError, match=r"data\.max_train_triples: 32 -> 16"):
        run_kalm(load_config(KaLMJobConfig, None, overrides + ["data.max_train_triples=16"]))
    assert {p: (out / p).read_bytes() for p in kept} == kept
