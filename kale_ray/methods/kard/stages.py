"""KARD's stages, each run by :func:`kale_ray.methods.kard.recipe.run_kard` as one ``Run.stage``:
it writes its files under ``out`` and returns a small JSON-able info dict; what later stages need is
read back from those files (:func:`read_questions`, :func:`read_kept`, ...). Also here: the settings
helpers the recipe records per stage, the Ray Data BM25 pass and the reranking actor.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from kale_ray.config import to_dict
from kale_ray.core.io import read_jsonl, write_json, write_jsonl
from kale_ray.core.qa import QAExample, generate_questions, read_qa_jsonl, split_questions, write_qa_jsonl
from kale_ray.core.rejects import Rejects
from kale_ray.methods.kard import data as kd
from kale_ray.methods.kard.config import KARDJobConfig
from kale_ray.methods.kard.prompts import (VERIFIER_ANSWER_PREFIX, majority_vote, parse_student_answer, teacher_messages,
                                           verifier_messages)
from kale_ray.runtime.generate import dataset, generate
from kale_ray.runtime.ray import init_ray_for
from kale_ray.runtime.stages import stage_config, without

# Generation settings that decide how fast, not what is generated.
GEN_NOT_OUTPUT = ("batch_size", "concurrency", "max_concurrency", "gpu_memory_utilization", "num_gpus_per_replica",
                   "http_timeout_s", "max_retries", "http_api_key_env", "tensor_parallel_size",
                   "pipeline_parallel_size")
TRAIN_SUMMARY = ("steps", "samples", "first_loss", "final_loss", "seconds_per_step", "wall_seconds", "rejected")


# --------------------------------------------------------------------------- settings, inputs


def model_settings(model) -> dict:
    return without(to_dict(model), ("cache_dir",))


def gen_settings(gen) -> dict:
    return without(to_dict(gen), GEN_NOT_OUTPUT)


def user_files(*paths: str | None) -> list[str]:
    """The paths that name users' files (not ``builtin:...``, not ``generate``), for a stage's ``inputs``."""
    return [p for p in paths if p and not p.startswith("builtin:") and p != "generate"]


def train_config(cfg: KARDJobConfig, name: str, out: Path):
    """Student ``name``'s trainer config: 'sft' on ``out/rows/<name>`` into ``out/student_<name>``."""
    return stage_config(cfg.train, cfg.on_change, loss="sft", data=str(out / "rows" / name),
                        out_dir=str(out / f"student_{name}"))


def read_questions(out: Path) -> tuple[list[QAExample], list[QAExample]]:
    return (list(read_qa_jsonl(out / "qa" / "train.jsonl", Rejects())),
            list(read_qa_jsonl(out / "qa" / "test.jsonl", Rejects())))


def read_kept(out: Path) -> dict[str, list[dict]]:
    """Verified rationales per question id (train and test), in file order."""
    kept: dict[str, list[dict]] = {}
    for r in read_jsonl(out / "rationales" / "kept.jsonl"):
        kept.setdefault(r["qid"], []).append(r)
    return kept


# --------------------------------------------------------------------------- Ray stages


def bm25_over_ray(index_dir: Path, queries: list[tuple[str, str]], k: int, batch_size: int = 256
                  ) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(passage index, score), ...]}`` for ``[(key, query text)]``, BM25 in Ray Data actors."""
    from kale_ray.methods.kard.retrieval import BM25Retriever

    if not queries:
        return {}
    ds = dataset([{"key": key, "query": text} for key, text in queries], batch_size)
    out = ds.map_batches(BM25Retriever, fn_constructor_args=(str(index_dir), k), batch_size=batch_size,
                         concurrency=1, batch_format="numpy")
    res = {row["key"]: [(int(i), float(s)) for i, s in json.loads(row["hits"])] for row in out.iter_rows()}
    if len(res) != len(queries):
        raise RuntimeError(f"BM25 retrieval lost queries: {len(queries)} in, {len(res)} out")
    return res


class RerankActor:
    """Ray Data callable class: rows ``{key, query, passages (JSON texts)}`` -> ``scores`` (JSON, max-sim)."""

    def __init__(self, model_dir: str, max_query_len: int, max_passage_len: int, batch_size: int) -> None:
        import torch

        from kale_ray.methods.kard.reranker import load_reranker

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        self.model, self.tok, _ = load_reranker(model_dir)
        self.lq, self.lp, self.bs = max_query_len, max_passage_len, batch_size
        # Passage token embeddings do not depend on the query (late interaction): each distinct
        # passage is encoded once per actor, however many questions retrieve it.
        self.cache: dict[str, object] = {}

    def __call__(self, batch: dict) -> dict:
        from kale_ray.methods.kard.reranker import encode, rerank_scores

        lists = [json.loads(ps) for ps in batch["passages"]]
        new = list(dict.fromkeys(p for ps in lists for p in ps if p not in self.cache))
        for text, emb in zip(new, encode(self.model, self.tok, new, self.lp, self.bs)):
            self.cache[text] = emb
        scores = []
        for q, ps in zip(batch["query"], lists):
            q_emb = encode(self.model, self.tok, [str(q)], self.lq)[0]
            scores.append(json.dumps(rerank_scores(q_emb, [self.cache[p] for p in ps]).tolist()))
        batch["scores"] = np.array(scores, dtype=object)
        return batch


# --------------------------------------------------------------------------- stages
# Each writes its files under ``out`` and returns a JSON-able info dict (``run.stage`` records it).


def stage_questions(cfg: KARDJobConfig, kg, out: Path, progress) -> dict:
    folder = out / "qa"
    rejects = Rejects()
    qa = cfg.qa
    if qa.source == "generate":
        questions = generate_questions(kg, qa.num_questions, qa.hops, qa.num_choices, qa.max_answers, qa.seed,
                                       **qa.generator_options())
        train, test = split_questions(questions, qa.test_fraction, qa.seed)
    else:
        train = list(read_qa_jsonl(qa.source, rejects))
        test = list(read_qa_jsonl(qa.test_file, rejects)) if qa.test_file else []
        if not test:
            raise ValueError("qa.test_file: KARD evaluates on held-out questions; give a test QA file")
    no_choices = [q for q in train + test if len(q.choices) < 2]
    for q in no_choices:
        rejects.add("not_multiple_choice", id=q.id, question=q.question)
    train = [q for q in train if len(q.choices) >= 2]
    test = [q for q in test if len(q.choices) >= 2]
    rng = np.random.default_rng(qa.seed + 11)
    if cfg.max_train_questions and len(train) > cfg.max_train_questions:
        train = [train[i] for i in sorted(rng.choice(len(train), cfg.max_train_questions, replace=False))]
    if cfg.eval.max_questions and len(test) > cfg.eval.max_questions:
        test = [test[i] for i in sorted(rng.choice(len(test), cfg.eval.max_questions, replace=False))]
    write_qa_jsonl(train, folder / "train.jsonl")
    write_qa_jsonl(test, folder / "test.jsonl")
    rejects.write_jsonl(folder / "rejects.jsonl")
    progress(f"[kard] questions: {len(train)} train, {len(test)} held-out test; rejected {rejects.counts() or 0}")
    return {"train": len(train), "test": len(test), "rejected": rejects.counts(),
            "test_by_hops": dict(Counter(str(q.num_hops) for q in test))}


def stage_kb(cfg: KARDJobConfig, kg, out: Path, progress) -> dict:
    from kale_ray.methods.kard.kb import build_kb
    from kale_ray.methods.kard.retrieval import BM25Index

    folder = out / "kb"
    t = time.perf_counter()
    rejects = Rejects()
    passages, info = build_kb(cfg.kb.sources, kg, rejects, on_error=cfg.kb.on_error, max_hpo_terms=cfg.kb.max_hpo_terms,
                              facts_per_passage=cfg.kb.facts_per_passage, max_passage_words=cfg.kb.max_passage_words)
    rows = [dict(p.to_dict(), full_text=p.full_text) for p in passages]
    write_jsonl(folder / "passages.jsonl", rows)
    rejects.write_jsonl(folder / "rejects.jsonl")
    t_index = time.perf_counter()
    BM25Index.build([r["id"] for r in rows], [r["full_text"] for r in rows]).save(folder / "bm25")
    info.update(build_seconds=round(t_index - t, 2), index_seconds=round(time.perf_counter() - t_index, 2))
    progress(f"[kard] knowledge base: {info['passages']} passages {info['per_source']}; BM25 index in "
             f"{info['index_seconds']:.1f}s; rejected lines {info['rejected'] or 0}")
    return info


def stage_teacher(cfg: KARDJobConfig, train, test, out: Path, progress) -> dict:
    from kale_ray.core.prompts import render_chat
    from kale_ray.models import load_tokenizer, resolve_model

    init_ray_for(cfg)
    t = time.perf_counter()
    tc = cfg.teacher
    path = resolve_model(tc.model.name, tc.model.cache_dir)
    tok = load_tokenizer(path, tc.model.trust_remote_code)
    rows = []
    for split, qs, n in (("train", train, tc.num_rationales), ("test", test, 1)):
        for q in qs:
            messages = teacher_messages(q.question, q.choices, q.answer)
            prompt = render_chat(messages, tok)
            # No per-request seed: vLLM's CPU sampler crashes on seeded requests whose prompt is
            # prefilled in chunks; the engine's seeded sampler stream still makes n samples differ.
            for s in range(n):
                rows.append({"key": f"{q.id}#{s}", "qid": q.id, "split": split, "sample": s, "prompt": prompt,
                             "messages": messages})
    res = generate(rows, path, tc.generation, tc.model, tokenizer=tok)
    label = f"vllm:{tc.model.name.replace('builtin:', '')}"
    outs = [{"qid": r["qid"], "split": r["split"], "sample": r["sample"], "teacher": label, "prompt": r["prompt"],
             **res[r["key"]]} for r in rows]
    write_jsonl(out / "teacher" / "generations.jsonl", outs)
    info = {"rows": len(outs), "errors": dict(Counter(o["error"].split(":")[0] for o in outs if o["error"])),
            "tokens": int(sum(o["tokens"] for o in outs)), "seconds": round(time.perf_counter() - t, 2)}
    progress(f"[kard] teacher: {len(outs)} rationales generated ({info['tokens']} tokens) in {info['seconds']:.0f}s")
    return info


def stage_verify(cfg: KARDJobConfig, kg, train, test, gens: list[dict], out: Path, progress) -> dict:
    """Verified rationales per question (train and test), template fallback flagged; rejects aside."""
    from kale_ray.core.prompts import render_chat
    from kale_ray.methods.kard.scoring import ChoiceScorer
    from kale_ray.methods.kard.verify import text_checks
    from kale_ray.models import load_tokenizer, resolve_model

    folder = out / "rationales"
    t = time.perf_counter()
    tc = cfg.teacher
    by_id = {q.id: q for q in train + test}
    scores: dict[tuple[str, int], dict] = {}
    if tc.verifier == "model":
        vm = tc.verifier_model or tc.model
        vpath = resolve_model(vm.name, vm.cache_dir)
        vtok = load_tokenizer(vpath, vm.trust_remote_code)
        to_score = []
        for g in gens:
            q = by_id[g["qid"]]
            if g["error"] or not text_checks(g["text"], q.all_answers or [q.answer], q.choices, tc.require_mention)[0]:
                continue  # rejected by the text checks already: no forward pass spent on it
            to_score.append({"key": f"{g['qid']}#{g['sample']}", "choices": json.dumps(q.choices),
                             "prompt": render_chat(verifier_messages(q.question, q.choices, g["text"]), vtok)})
        if to_score:
            init_ray_for(cfg)
            ds = dataset(to_score, 8).map_batches(
                ChoiceScorer, fn_constructor_args=(vpath, VERIFIER_ANSWER_PREFIX, tc.length_normalise, vm.max_model_len, vm.trust_remote_code),
                batch_size=8, concurrency=1, batch_format="numpy")
            for row in ds.iter_rows():
                qid, s = row["key"].rsplit("#", 1)
                scores[(qid, int(s))] = {"scores": json.loads(row["choice_scores"]), "error": row["score_error"]}
    kept_rows, rejects, per_q_teacher = [], Rejects(), Counter()
    kept: dict[str, list[dict]] = {}
    by_q: dict[str, list[dict]] = {}
    for g in gens:
        by_q.setdefault(g["qid"], []).append(g)
    for qid, q in by_id.items():
        cands = []
        for g in by_q.get(qid, []):
            sc = scores.get((qid, int(g["sample"])))
            err = g["error"] or (sc["error"] if sc and sc["error"] else "")
            reason = "prompt_too_long" if err.startswith("prompt_too_long") else (
                "verifier_failed" if (sc and sc["error"]) else "generation_failed")
            cands.append({"sample": g["sample"], "text": g["text"], "error": err, "reason": reason,
                          "teacher": g["teacher"], "choice_scores": sc["scores"] if sc and not sc["error"] else None})
        fallback = kd.chain_rationale(q, kg) if tc.fallback_to_template else None
        ks, rj = kd.select_rationales(q, cands, fallback, tc.require_mention)
        rejects.extend(rj)
        if ks:
            kept[qid] = ks
            kept_rows.extend(ks)
            per_q_teacher.update(k["teacher"] for k in ks)
        else:
            rejects.add("no_verified_rationale", qid=qid, question=q.question)
    write_jsonl(folder / "kept.jsonl", kept_rows)
    rejects.write_jsonl(folder / "rejects.jsonl")
    train_ids = {q.id for q in train}
    info = {"kept_rationales": len(kept_rows), "rejected": rejects.counts(), "by_teacher": dict(per_q_teacher),
            "train_questions_with_rationale": sum(1 for qid in kept if qid in train_ids),
            "train_questions": len(train), "test_questions_with_reference": sum(1 for qid in kept if qid not in train_ids),
            "teacher_rationales_verified": sum(1 for r in kept_rows if r["teacher"] != kd.TEMPLATE_FALLBACK),
            "teacher_rationales_generated": len(gens), "verifier": tc.verifier,
            "seconds": round(time.perf_counter() - t, 2)}
    progress(f"[kard] verifier: {info['teacher_rationales_verified']}/{len(gens)} teacher rationales kept; "
             f"rejected {rejects.counts() or 0}; by teacher {dict(per_q_teacher)}")
    return info


def stage_retrieval(cfg: KARDJobConfig, train, test, kept, out: Path, progress) -> dict:
    """BM25 for training knowledge (rationale queries), reranker candidates and test candidates (question queries)."""
    init_ray_for(cfg)
    t = time.perf_counter()
    rc = cfg.reranker
    index_dir = out / "kb" / "bm25"
    train_ids = {q.id for q in train}
    by_rationale = [(f"{r['qid']}#{r['sample']}", r["rationale"]) for rs in kept.values() for r in rs]
    hits_r = bm25_over_ray(index_dir, by_rationale, max(cfg.knowledge_passages, rc.candidates_by_rationale))
    qs = [(q.id, q.question) for q in train] + [(q.id, q.question) for q in test]
    hits_q = bm25_over_ray(index_dir, qs, max(rc.candidates_by_question, cfg.eval.retrieve_top, cfg.knowledge_passages))
    write_json(out / "retrieval" / "retrieval.json", {"by_rationale": hits_r, "by_question": hits_q})
    info = {"rationale_queries": len(by_rationale), "question_queries": len(qs),
            "train_rationale_queries": sum(1 for k, _ in by_rationale if k.rsplit("#", 1)[0] in train_ids),
            "seconds": round(time.perf_counter() - t, 2)}
    progress(f"[kard] BM25 over Ray Data: {len(by_rationale)} rationale and {len(qs)} question queries "
             f"in {info['seconds']:.1f}s")
    return info


def stage_student_rows(cfg: KARDJobConfig, train, kept, passages, retrieval, out: Path) -> dict:
    from kale_ray.core.prompts import render_chat
    from kale_ray.models import load_tokenizer, resolve_model

    student_path = resolve_model(cfg.train.model.name, cfg.train.model.cache_dir)
    tok = load_tokenizer(student_path, cfg.train.model.trust_remote_code)
    eos = tok.eos_token or ""
    render = lambda m: render_chat(m, tok)  # noqa: E731
    noknow, kard = [], []
    for q in train:
        for r in kept.get(q.id, []):
            rid = f"{q.id}#{r['sample']}"
            hits = retrieval["by_rationale"][rid][: cfg.knowledge_passages]
            knowledge = [passages[i]["full_text"] for i, _ in hits]
            noknow.append(kd.student_row(rid, q, r["rationale"], [], render, eos, r["teacher"]))
            kard.append(kd.student_row(rid, q, r["rationale"], knowledge, render, eos, r["teacher"]))
    if not kard:
        raise RuntimeError("no training question has a rationale (teacher + verifier + fallback gave none); "
                           f"see {out / 'rationales' / 'rejects.jsonl'}")
    write_jsonl(out / "rows" / "noknow" / "train.jsonl", noknow)
    write_jsonl(out / "rows" / "kard" / "train.jsonl", kard)
    return {"rows": len(kard), "by_teacher": dict(Counter(r["teacher"] for r in kard))}


def stage_train_student(cfg: KARDJobConfig, name: str, out: Path, progress) -> dict:
    """One student on Ray Train (its own settings record under ``out/student_<name>``: resumes a killed run)."""
    from kale_ray.train.trainer import run_training

    init_ray_for(cfg)
    tcfg = train_config(cfg, name, out)
    progress(f"[kard] training student '{name}' on Ray Train + DeepSpeed ZeRO-{tcfg.zero_stage}, "
             f"{tcfg.num_workers} workers")
    res = run_training(tcfg, run_name=f"kard-{name}")
    if not res.merged_dir:
        raise RuntimeError(f"training wrote no merged model under {tcfg.out_dir} (set train.save_merged=true)")
    return {**{k: res.summary.get(k) for k in TRAIN_SUMMARY}, "merged": res.merged_dir}


def stage_reranker(cfg: KARDJobConfig, train, kept, passages, retrieval, out: Path, progress) -> dict:
    from kale_ray.methods.kard.retrieval import BM25Index
    from kale_ray.methods.kard.rerank_train import train_reranker

    folder = out / "reranker"
    rc = cfg.reranker
    index = BM25Index.load(out / "kb" / "bm25")
    rows, skipped = [], Counter()
    for q in train:
        for r in kept.get(q.id, []):
            rid = f"{q.id}#{r['sample']}"
            by_r = [i for i, _ in retrieval["by_rationale"][rid][: rc.candidates_by_rationale]]
            by_q = [i for i, _ in retrieval["by_question"][q.id][: rc.candidates_by_question]]
            cands = kd.merge_candidates(by_r, by_q)
            targets = index.score(r["rationale"], cands).tolist()
            if max(targets) <= 0:
                skipped["no_passage_matches_rationale"] += 1
                continue
            rows.append({"id": rid, "query": q.question, "passages": json.dumps([passages[i]["full_text"] for i in cands]),
                         "targets": json.dumps(targets)})
    write_jsonl(folder / "rows" / "train.jsonl", rows)
    progress(f"[kard] reranker: {len(rows)} training questions x <= "
             f"{rc.candidates_by_rationale + rc.candidates_by_question} candidates; skipped {dict(skipped) or 0}; "
             f"Ray Train, {rc.num_workers} workers")
    init_ray_for(cfg)
    summary = train_reranker(rc, folder / "rows" / "train.jsonl", folder, use_gpu=cfg.train.use_gpu)
    summary["skipped"] = dict(skipped)
    write_json(folder / "reranker_summary.json", summary)
    return summary


def stage_test_knowledge(cfg: KARDJobConfig, test, kept, passages, retrieval, out: Path, progress) -> dict:
    """Per test question: BM25 top-N by question, reranked order, and hit@k of the rationale-best passage."""
    from kale_ray.methods.kard.retrieval import BM25Index

    init_ray_for(cfg)
    t = time.perf_counter()
    rc = cfg.reranker
    top_n = cfg.eval.retrieve_top
    rows = [{"key": q.id, "query": q.question,
             "passages": json.dumps([passages[i]["full_text"] for i, _ in retrieval["by_question"][q.id][:top_n]])}
            for q in test]
    ds = dataset(rows, 4).map_batches(RerankActor, fn_constructor_args=(str(out / "reranker" / "model"), rc.max_query_len,
                                                                    rc.max_passage_len, rc.encode_batch_size),
                                  batch_size=16, concurrency=1, batch_format="numpy")
    reranked = {row["key"]: json.loads(row["scores"]) for row in ds.iter_rows()}
    t_rerank = time.perf_counter() - t
    index = BM25Index.load(out / "kb" / "bm25")
    out_rows, hits = [], {"bm25": Counter(), "reranker": Counter()}
    n_ref = 0
    no_ref = Counter()
    for q in test:
        bm25 = [i for i, _ in retrieval["by_question"][q.id][:top_n]]
        sc = reranked[q.id]
        order = sorted(range(len(bm25)), key=lambda j: (-sc[j], j))
        rr = [bm25[j] for j in order]
        ref = (kept.get(q.id) or [None])[0]
        row = {"qid": q.id, "bm25": bm25, "reranked": rr, "reranker_scores": [sc[j] for j in order]}
        if ref is None:
            no_ref["no_reference_rationale"] += 1
        else:
            targets = index.score(ref["rationale"], bm25).tolist()
            gold = kd.best_by_target(bm25, targets)
            row.update(reference_teacher=ref["teacher"], gold=gold)
            if gold is None:
                no_ref["no_candidate_matches_rationale"] += 1
            else:
                n_ref += 1
                for name, ranking in (("bm25", bm25), ("reranker", rr)):
                    for k in (1, 3, 10):
                        hits[name][k] += kd.hit_at_k(gold, ranking, k)
        out_rows.append(row)
    write_jsonl(out / "eval" / "knowledge" / "knowledge.jsonl", out_rows)
    metrics = {"n": n_ref, "candidates": top_n, "excluded": dict(no_ref),
               "reference_by_teacher": dict(Counter(r.get("reference_teacher") for r in out_rows if r.get("gold") is not None)),
               **{f"{name}_hit@{k}": (hits[name][k] / n_ref if n_ref else None) for name in hits for k in (1, 3, 10)},
               "rerank_seconds": round(t_rerank, 2)}
    progress(f"[kard] reranker on {len(test)} test questions ({top_n} BM25 candidates each): hit@1 "
             f"{metrics['reranker_hit@1']} vs BM25 {metrics['bm25_hit@1']} (n={n_ref}) in {t_rerank:.0f}s")
    return metrics


def stage_eval(cfg: KARDJobConfig, name: str, model_dir: str, test, passages, knowledge: list[dict],
               variants: list[str], out: Path, progress) -> dict:
    """Sample ``eval.num_samples`` rationales+answers per question and variant, majority vote, accuracy."""
    from kale_ray.core.prompts import render_chat
    from kale_ray.runtime.report import wilson_interval
    from kale_ray.methods.kard.prompts import student_messages
    from kale_ray.models import load_tokenizer

    init_ray_for(cfg)
    t = time.perf_counter()
    ev = cfg.eval
    gen = ev.generation if ev.num_samples > 1 else dataclasses.replace(ev.generation, temperature=0.0)
    model = dataclasses.replace(cfg.train.model, name=model_dir)
    tok = load_tokenizer(model_dir, model.trust_remote_code)
    know = {k["qid"]: k for k in knowledge}
    rows = []
    for q in test:
        for v in variants:
            ids = {"none": [], "bm25": know[q.id]["bm25"], "reranker": know[q.id]["reranked"]}[v][: cfg.knowledge_passages]
            messages = student_messages(q.question, q.choices, [passages[i]["full_text"] for i in ids])
            prompt = render_chat(messages, tok)
            for s in range(ev.num_samples):
                rows.append({"key": f"{q.id}|{v}|{s}", "prompt": prompt, "messages": messages})
    res = generate(rows, model_dir, gen, model, tokenizer=tok)
    preds, metrics = [], {}
    for v in variants:
        correct = parsed = skipped = 0
        for q in test:
            samples = [res[f"{q.id}|{v}|{s}"] for s in range(ev.num_samples)]
            picks = [None if smp["error"] else parse_student_answer(smp["text"], q.choices) for smp in samples]
            vote, share = majority_vote(picks)
            ok = vote is not None and vote in set(q.all_answers or [q.answer]) | {q.answer}
            correct += ok
            parsed += sum(p is not None for p in picks)
            skipped += sum(bool(smp["error"]) for smp in samples)
            preds.append({"qid": q.id, "variant": v, "vote": vote, "vote_share": share, "correct": ok,
                          "answer": q.answer, "samples": [smp["text"] for smp in samples], "picks": picks,
                          "errors": [smp["error"] for smp in samples if smp["error"]]})
        n = len(test)
        metrics[v] = {"accuracy": correct / n if n else None, "accuracy_ci95": list(wilson_interval(correct, n)), "n": n,
                      "correct": correct, "parse_rate": parsed / max(1, n * ev.num_samples),
                      "samples_failed": skipped}
    write_jsonl(out / "eval" / name / "predictions.jsonl", preds)
    info = {"model": model_dir, "num_samples": ev.num_samples, "temperature": gen.temperature, "variants": metrics,
            "seconds": round(time.perf_counter() - t, 2)}
    progress(f"[kard] eval '{name}': " + ", ".join(f"{v} {m['accuracy']:.3f}" for v, m in metrics.items())
             + f" (n={len(test)}, {ev.num_samples} samples, {info['seconds']:.0f}s)")
    return info
