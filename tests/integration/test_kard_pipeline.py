"""KARD end to end on real Ray: vLLM CPU (teacher + students), Ray Data (BM25, verifier, reranking),
Ray Train + DeepSpeed ZeRO-2 gloo (two students), Ray Train DDP gloo (the reranker).

``builtin:tiny-llama`` (random weights) as teacher, verifier and students; a one-layer MiniLM
reranker; a slice of UMLS questions; a KB of UMLS neighbourhoods + 200 HPO terms + a users' corpus
with one bad line. A random teacher's rationales rarely verify: the pipeline keeps going with the
exact template rationale, flagged. 318 s measured on 2 cores (load ~2): five Ray Train / vLLM
starts dominate (two students, the reranker, teacher + two evaluations).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from kale_ray.config import load_config
from kale_ray.methods.kard.config import KARDJobConfig

pytestmark = pytest.mark.integration


def _lines(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def test_kard_recipe_tiny(ray_local, tmp_path, capsys):
    from kale_ray.methods.kard.recipe import run_kard

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "u1", "title": "Alga note", "text": "alga is a plant living in water"})
                      + "\n{bad json\n")
    cfg = load_config(KARDJobConfig, None, [
        f"out={tmp_path / 'kard'}", "qa.num_questions=40", "qa.test_fraction=0.3", "max_train_questions=12",
        f"kb.sources=[builtin:kg, builtin:hpo, {corpus}]", "kb.max_hpo_terms=200", "kb.on_error=skip",
        "teacher.model.name=builtin:tiny-llama", "teacher.model.max_model_len=512", "teacher.num_rationales=2",
        "teacher.generation.max_tokens=16", "teacher.generation.batch_size=16",
        "train.model.name=builtin:tiny-llama", "train.model.max_model_len=512", "train.max_steps=2",
        "train.micro_batch_size=4", "train.max_seq_len=256", "train.warmup_steps=0", "train.lr=0.005",
        "reranker.num_layers=1", "reranker.dim=32", "reranker.max_steps=2", "reranker.batch_size=2",
        "reranker.candidates_by_rationale=4", "reranker.candidates_by_question=4", "reranker.max_passage_len=48",
        "reranker.max_query_len=32",
        "eval.num_samples=2", "eval.generation.max_tokens=16", "eval.retrieve_top=10", "eval.max_questions=6",
    ])
    m = run_kard(cfg)
    out = Path(cfg.out)

    # KB: every source counted, the bad corpus line kept aside with file:line; the index is on disk
    kb = m["kb"]
    assert kb["per_source"][str(corpus)] == 1 and kb["per_source"]["builtin:hpo"] == 200
    assert kb["per_source"]["builtin:kg"] >= 135 and kb["rejected"] == {"bad_json": 1}
    assert _lines(out / "kb" / "rejects.jsonl")[0]["line"] == 2
    assert (out / "kb" / "bm25" / "passage_ids.json").exists()

    # teacher: 2 samples per train question + 1 per test question, all accounted for
    n_train, n_test = m["questions"]["train"], m["questions"]["test"]
    assert n_train == 12 and n_test == 6
    gens = _lines(out / "teacher" / "generations.jsonl")
    assert len(gens) == 2 * n_train + n_test
    assert len({(g["qid"], g["sample"]) for g in gens}) == len(gens)
    # every generated rationale is either kept or rejected with a reason (nothing vanishes)
    v = m["verifier"]
    kept = _lines(out / "rationales" / "kept.jsonl")
    rejected = [r for r in _lines(out / "rationales" / "rejects.jsonl") if r["reason"] != "no_verified_rationale"]
    assert v["teacher_rationales_verified"] + len(rejected) == len(gens)
    assert all(r["reason"] for r in rejected)
    # a random teacher rarely verifies: the template fallback carries the questions, flagged as such
    assert v["train_questions_with_rationale"] == n_train
    fallback = [k for k in kept if k["teacher"] == "template-fallback"]
    assert fallback and all(k["rationale"].endswith(".") and "So the answer is" in k["rationale"] for k in fallback)

    # student rows: KARD's carry the rationale-retrieved passage, the no-knowledge ones do not
    kard_rows = _lines(out / "rows" / "kard" / "train.jsonl")
    nok_rows = _lines(out / "rows" / "noknow" / "train.jsonl")
    assert len(kard_rows) == len(nok_rows) == m["student_rows"]["rows"] >= n_train
    assert all("Knowledge: " in r["prompt"] for r in kard_rows) and not any("Knowledge: " in r["prompt"] for r in nok_rows)
    assert all(r["completion"].startswith("Explanation: ") and "\nAnswer: " in r["completion"] for r in kard_rows)

    # both students trained 2 finite steps on Ray Train + DeepSpeed; merged models exist
    for name in ("noknow", "kard"):
        hist = _lines(out / f"student_{name}" / "history.jsonl")
        assert [h["step"] for h in hist] == [1, 2] and all(math.isfinite(h["loss"]) for h in hist)
        assert (out / f"student_{name}" / "merged" / "config.json").exists()
    # the reranker trained on Ray Train (2 workers) and saved a merged encoder + projection
    rt = m["reranker_train"]
    assert rt["steps"] == 2 and rt["workers"] == 2 and math.isfinite(rt["final_loss"]) and rt["final_loss"] >= 0
    assert (out / "reranker" / "model" / "proj.safetensors").exists()

    # reranking: a permutation of the same BM25 candidates for every test question
    know = _lines(out / "eval" / "knowledge" / "knowledge.jsonl")
    assert len(know) == n_test
    for k in know:
        assert sorted(k["reranked"]) == sorted(k["bm25"]) and len(k["bm25"]) == 10
        assert k["reranker_scores"] == sorted(k["reranker_scores"], reverse=True)
    rr = m["reranker_eval"]
    assert rr["n"] + sum(rr["excluded"].values()) == n_test
    assert rr["n"] > 0, rr  # else the hit checks below check nothing
    for name in ("bm25", "reranker"):
        assert 0 <= rr[f"{name}_hit@1"] <= rr[f"{name}_hit@3"] <= rr[f"{name}_hit@10"] <= 1
    assert rr["bm25_hit@10"] == 1.0  # the gold is chosen among BM25's top 10

    # evaluation: (a), (b), (c) on the same questions, every sample generated (or counted as failed)
    acc = m["accuracy"]
    for key in ("a_no_knowledge", "b_kard_bm25", "c_kard_reranker"):
        assert acc[key]["n"] == n_test and 0 <= acc[key]["accuracy"] <= 1 and acc[key]["samples_failed"] == 0
    preds = _lines(out / "eval" / "kard" / "predictions.jsonl")
    assert len(preds) == 2 * n_test and all(len(p["samples"]) == 2 for p in preds)
    assert all(p["vote"] is not None for p in preds if p["correct"])
    assert sum(p["correct"] for p in preds if p["variant"] == "bm25") == acc["b_kard_bm25"]["correct"]

    report = (out / "report.md").read_text()
    assert "(c) KARD" in report and "| reranker |" in report and "hit@3" in report

    # a rerun reuses every stage: same numbers, nothing retrained or regenerated
    again = run_kard(cfg)
    assert again["accuracy"] == m["accuracy"] and again["reranker_eval"] == m["reranker_eval"]
    assert set(again["reused_stages"]) >= {"questions", "kb", "teacher", "verify", "retrieval", "student_rows",
                                           "train_noknow", "train_kard", "reranker", "rerank_test", "eval_noknow",
                                           "eval_kard"}

    # a changed setting of an early stage: refused at that stage, naming the key, before anything is
    # written or started (config.yaml, questions and metrics untouched); the CLI says it in one line, exit 2
    from kale_ray import cli
    from kale_ray.runtime.stages import StaleOutputError

    before = {p: (out / p).read_bytes() for p in ("config.yaml", "qa/train.jsonl", "stages/questions.json",
                                                  "metrics.json")}
    changed = load_config(KARDJobConfig, None, [f"out={out}", "qa.num_questions=41"])
    with pytest.raises(StaleOutputError, match=r"qa\.num_questions: 40 -> 41.*on_change=overwrite"):
        run_kard(dataclasses.replace(cfg, qa=changed.qa))
    capsys.readouterr()  # drop the logs of the runs above
    assert cli.main(["kard", f"--config={out / 'config.yaml'}", "qa.num_questions=41"]) == 2
    err = capsys.readouterr().err.splitlines()  # Ray's log thread (this test's Ray) may print around it
    said = [x for x in err if x.startswith("kale-ray kard: ")]
    assert len(said) == 1 and "qa.num_questions: 40 -> 41" in said[0] and "on_change=overwrite" in said[0], err
    assert not any("Traceback" in x for x in err)
    assert {p: (out / p).read_bytes() for p in before} == before
