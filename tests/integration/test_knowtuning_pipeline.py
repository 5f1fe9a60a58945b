"""KnowTuning end to end on ``builtin:tiny-llama`` (teacher and student) and the HPO KG, real Ray, vLLM CPU, Ray Train.

The random tiny teacher's JSON does not parse, so this exercises the reject paths: rejects with reasons, the sentence fallback of the extractor and the template fallback of the
rewriter. Then: perplexity pass (Ray Data actor), Stage I SFT (2 gloo workers, DeepSpeed ZeRO-2,
LoRA), Stage II DPO from the Stage I model with a precomputed reference, answers by both models
through vLLM (engines in parallel), KG fact checks, report; and reruns (below).

Cost (2 cores): ~4 min, most of it 4 vLLM engine starts (~30 s each: extraction, rewrite, two
models' answers) and 2 Ray Train runs (~25 s each). Then reruns: one that reuses every stage, two with
one changed setting that are refused (the qa stage, Stage II) and leave the folder as it was.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kale_ray.config import load_config
from kale_ray.methods.knowtuning.config import KnowTuningJobConfig
from kale_ray.runtime.stages import StaleOutputError

pytestmark = pytest.mark.integration

TINY = "builtin:tiny-llama"
TRAIN = ["model.name=" + TINY, "num_workers=2", "zero_stage=2", "max_steps=2", "micro_batch_size=2",
         "max_seq_len=160", "lora.r=4", "lora.alpha=8", "warmup_steps=0", "lr=0.005"]
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "knowtuning_hpo.yaml"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_knowtuning_whole_recipe_and_rerun(ray_local, tmp_path):
    from kale_ray.core.kg import load_kg
    from kale_ray.methods.knowtuning.atomic import difficult_count
    from kale_ray.methods.knowtuning.recipe import run_knowtuning

    out = tmp_path / "kt"
    overrides = [f"out={out}", "qa.num_questions=8", "qa.facts_per_answer=3", f"teacher.name={TINY}",
                 "teacher.max_model_len=512", "generation.batch_size=8",
                 # one teacher pass per step: the seeded retry passes are unit-tested (test_knowtuning_stage1),
                 # sampled generation on vLLM CPU runs in the KARD test, and each pass costs an engine start
                 "stage1.extract.max_attempts=1", "stage1.extract.max_tokens=24",
                 "stage1.rewrite.max_attempts=1", "stage1.rewrite.max_tokens=24",
                 # the held-out answers are split into sentences here: the teacher extractor is the same
                 # code as Stage I's, run above, and each vLLM pass costs an engine start (~30 s on 2 cores)
                 "eval.generation.max_tokens=24", "eval.extractor=sentences",
                 "stage2.score_after=false", "baseline=none", *[f"stage1.train.{x}" for x in TRAIN],
                 *[f"stage2.train.{x}" for x in TRAIN]]
    cfg = load_config(KnowTuningJobConfig, CONFIG, overrides)
    m = run_knowtuning(cfg)

    # QA: 6 training / 2 held-out questions, every reference fact a real HPO triple about its subject
    kg = load_kg("builtin:hpo")
    train, test = _jsonl(out / "qa" / "train.jsonl"), _jsonl(out / "qa" / "test.jsonl")
    assert (len(train), len(test)) == (6, 2) and not {q["id"] for q in train} & {q["id"] for q in test}
    for q in train + test:
        assert len(q["facts"]) == 3
        assert all(f["triple"][0] == q["subject"] and kg.has_named_triple(*f["triple"]) for f in q["facts"])

    # Stage I, extraction: every answer is accounted for (teacher-parsed or rejected with a reason, then
    # kept with the sentence fallback), and the rejects file holds exactly the counted rows
    s1 = m["stage1"]
    ex = s1["extract"]
    assert ex["structured_output"] is True and ex["passes"] == 1
    assert ex["parsed"] + ex["rejected"] == 6
    assert sum(ex["by_extractor"].values()) == 6
    rej = _jsonl(out / "stage1" / "facts_rejects.jsonl")
    assert len(rej) == sum(ex["rejected_by_reason"].values()) == ex["rejected"]
    assert all(r["reason"] and r["attempts"] == 1 for r in rej)  # a failed answer used every attempt
    facts = _jsonl(out / "stage1" / "facts.jsonl")
    assert {r["extractor"] for r in facts} <= {"teacher", "sentence-fallback"}

    # perplexity: every fact scored, the difficult ones are exactly the alpha share with the highest ppl
    ppl = _jsonl(out / "stage1" / "ppl.jsonl")
    assert len(ppl) == s1["atomic_facts"] == sum(len(r["facts"]) for r in facts) > 0
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1.0 for r in ppl)
    hard = [r for r in ppl if r["difficult"]]
    assert len(hard) == s1["difficult"] == difficult_count(0.5, len(ppl))
    assert min(r["ppl"] for r in hard) >= max((r["ppl"] for r in ppl if not r["difficult"]), default=0.0)

    # rewrites: one per difficult fact (teacher or template fallback, each rejection counted)
    rw = _jsonl(out / "stage1" / "rewrites.jsonl")
    assert len(rw) == len(hard)
    by = s1["rewrite"]["by_rewriter"]
    assert by.get("template-fallback", 0) == sum(s1["rewrite"]["rejected_by_reason"].values()) == s1["rewrite"]["rejected"]
    assert len(_jsonl(out / "stage1" / "rewrite_rejects.jsonl")) == s1["rewrite"]["rejected"]
    for r in rw:
        if r["rewriter"] == "template-fallback":
            assert r["answer"].rstrip(".") in r["fact"] or r["fact"].rstrip(".") in r["answer"]
    rows = _jsonl(out / "stage1" / "data" / "train.jsonl")
    assert s1["rows"] == {"original": 6, "rewrite": len(rw)} and len(rows) == 6 + len(rw)

    # training: Stage I SFT, Stage II DPO from the Stage I model (baseline=none here: the baseline SFT is the
    # same training call on the original rows only, and each Ray Train run costs ~25 s of start-up)
    assert m["train"]["stage1"]["steps"] == 2 and "sft" not in m["train"]
    assert m["stage2"]["train"]["steps"] == 2 and m["stage2"]["pairs"]["pairs"] > 0
    dpo_cfg = (out / "stage2" / "config.yaml").read_text()
    assert str(out / "stage1" / "train" / "merged") in dpo_cfg
    hist = _jsonl(out / "stage2" / "train" / "history.jsonl")
    assert hist[0]["dpo"] == pytest.approx(math.log(2), abs=1e-3)  # step 1: policy == its reference

    # evaluation: both models on the same held-out questions, every fact classified once
    res = m["eval"]["results"]
    assert set(res) == {"stage1", "knowtuning"}
    for label, r in res.items():
        assert r["answers"] == 2
        assert r["total_correct"] + r["total_incorrect"] + r["total_unverifiable"] == r["total_facts"]
        rows = _jsonl(out / "eval" / label / "facts.jsonl")
        assert [x["id"] for x in rows] == [q["id"] for q in test]
        assert all(f["status"] in ("correct", "incorrect", "unverifiable") for x in rows for f in x["checks"])
        assert sum(len(x["checks"]) for x in rows) == r["total_facts"]
    report = (out / "report.md").read_text()
    assert "| metric | stage1 | knowtuning |" in report and "factual error rate" in report
    assert m["eval"]["seconds"]["generate_wall"] > 0

    # a rerun reuses every stage: nothing is trained or generated again
    m2 = run_knowtuning(cfg)
    assert set(m2["reused_stages"]) >= {"qa", "stage1_data", "stage1_train", "stage2", "eval"}
    assert json.dumps(m2["eval"]["results"], sort_keys=True) == json.dumps(m["eval"]["results"], sort_keys=True)

    # a changed setting is refused at the first stage it decides, before anything is written (the folder
    # still describes its outputs): qa here, Stage II there (every stage before it reused, nothing run)
    watched = [out / "config.yaml", out / "qa" / "train.jsonl", out / "stage2" / "summary.json"]
    before = {p: p.read_bytes() for p in watched}
    for change, key in (("qa.num_questions=6", r"holds qa outputs .*settings\.qa\.num_questions: 8 -> 6"),
                        ("stage2.train.lr=0.01", r"holds stage2 outputs .*settings\.train\.lr: 0\.005 -> 0\.01")):
        with pytest.raises(StaleOutputError, match=key):
            run_knowtuning(load_config(KnowTuningJobConfig, CONFIG, [*overrides, change]))
        assert {p: p.read_bytes() for p in watched} == before
