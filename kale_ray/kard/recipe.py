"""KARD end to end: ``run_kard(cfg)``.

    kale-ray kard --config configs/kard_umls.yaml

1. questions: generated multi-hop multiple-choice questions from the KG (or users' QA files) -> ``out/qa/``
2. knowledge base: passages (KG neighbourhoods, HPO terms, users' JSONL) + BM25 index -> ``out/kb/``
3. teacher: vLLM through Ray Data writes ``teacher.num_rationales`` rationales per training question
   given the gold answer (one per test question, the reference for the reranker's hit@k) -> ``out/teacher/``
4. verifier: a model reading question + rationale must put the highest likelihood on the gold choice
   (Ray Data actor); rejects with reasons; template fallback flagged -> ``out/rationales/``
5. retrieval (Ray Data, BM25): rationale -> knowledge for training; question -> reranker candidates
6. students on Ray Train + DeepSpeed ('sft' loss): (a) Question -> Explanation + Answer,
   KARD: Question + Knowledge -> Explanation + Answer, same rationales / steps / seed -> ``out/student_*``
7. reranker on Ray Train: max-sim MiniLM + LoRA, KL to the BM25-vs-rationale distribution -> ``out/reranker/``
8. inference + evaluation on the held-out questions: BM25 top-N by question -> rerank -> top passage(s)
   -> student samples -> majority vote: (a) no knowledge, (b) KARD + BM25, (c) KARD + reranker;
   reranker hit@1/3 vs BM25 -> ``out/eval/``, ``out/metrics.json``, ``out/report.md``

Every stage writes its output then a marker; a rerun reuses finished stages (delete a folder to redo it).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kale_ray.config import dump_config
from kale_ray.core.qa import QAExample, generate_questions, read_qa_jsonl, split_questions, write_qa_jsonl
from kale_ray.core.rejects import Rejects
from kale_ray.kard import data as kd
from kale_ray.kard.config import KARDJobConfig
from kale_ray.kard.prompts import (VERIFIER_ANSWER_PREFIX, majority_vote, parse_student_answer, teacher_messages,
                                   verifier_messages)

STAGE_DONE = "stage.json"


# --------------------------------------------------------------------------- small helpers


def _write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, default=_json_default) + "\n")
            n += 1
    tmp.replace(path)
    return n


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _done(folder: Path) -> dict | None:
    p = folder / STAGE_DONE
    return json.loads(p.read_text()) if p.exists() else None


def _mark(folder: Path, info: dict) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (STAGE_DONE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, default=_json_default))
    tmp.replace(folder / STAGE_DONE)
    return info


def _init_ray(cfg: KARDJobConfig) -> None:
    from kale_ray.llm import QUIET_ENV
    from kale_ray.ray_init import init_ray

    init_ray(cfg.ray_address, max(cfg.train.num_workers, cfg.reranker.num_workers), log_to_driver=True,
             runtime_env=QUIET_ENV)


def _ds(rows: list[dict], batch_size: int):
    import ray.data

    return ray.data.from_items(rows, override_num_blocks=max(1, min(32, len(rows) // max(1, batch_size))))


# --------------------------------------------------------------------------- Ray stages


def bm25_over_ray(index_dir: Path, queries: list[tuple[str, str]], k: int, batch_size: int = 256
                  ) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(passage index, score), ...]}`` for ``[(key, query text)]``, BM25 in Ray Data actors."""
    from kale_ray.kard.retrieval import BM25Retriever

    if not queries:
        return {}
    ds = _ds([{"key": key, "query": text} for key, text in queries], batch_size)
    out = ds.map_batches(BM25Retriever, fn_constructor_args=(str(index_dir), k), batch_size=batch_size,
                         concurrency=1, batch_format="numpy")
    res = {row["key"]: [(int(i), float(s)) for i, s in json.loads(row["hits"])] for row in out.iter_rows()}
    if len(res) != len(queries):
        raise RuntimeError(f"BM25 retrieval lost queries: {len(queries)} in, {len(res)} out")
    return res


def generate_over_ray(model_path: str, gen, max_model_len: int, rows: list[dict], tok, trust_remote_code: bool = False
                      ) -> dict[str, dict]:
    """vLLM (ray.data.llm) over rows ``{key, prompt}`` -> ``{key: {text, error, tokens}}``.

    A prompt longer than ``max_model_len - max_tokens`` is not sent: it comes back with
    ``error='prompt_too_long: ...'``. Every row comes back.
    """
    from kale_ray.llm import build_vllm_processor

    budget = max_model_len - gen.max_tokens
    out: dict[str, dict] = {}
    send = []
    for r in rows:
        n = len(tok(r["prompt"], add_special_tokens=False)["input_ids"])
        if n > budget:
            out[r["key"]] = {"text": "", "error": f"prompt_too_long: {n} tokens > {budget}", "tokens": 0}
        else:
            # No per-request seed: vLLM's CPU sampler crashes on seeded requests whose prompt is
            # prefilled in chunks ("CPU Generator does not use offset"). The engine's seeded
            # sampler stream still makes n samples of one prompt differ.
            send.append({"key": r["key"], "prompt": r["prompt"]})
    if send:
        proc = build_vllm_processor(model_path, gen, max_model_len, trust_remote_code)
        for row in proc(_ds(send, gen.batch_size)).iter_rows():
            err = row.get("gen_error") or row.get("__inference_error__") or ""
            out[row["key"]] = {"text": "" if row.get("generation") is None else str(row["generation"]),
                               "error": "" if err in (None, "None") else str(err),
                               "tokens": int(row.get("gen_tokens") or 0)}
    missing = [r["key"] for r in rows if r["key"] not in out]
    if missing:
        raise RuntimeError(f"generation lost {len(missing)} rows, e.g. {missing[:3]}")
    return out


class RerankActor:
    """Ray Data callable class: rows ``{key, query, passages (JSON texts)}`` -> ``scores`` (JSON, max-sim)."""

    def __init__(self, model_dir: str, max_query_len: int, max_passage_len: int, batch_size: int) -> None:
        import torch

        from kale_ray.kard.reranker import load_reranker

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        self.model, self.tok, _ = load_reranker(model_dir)
        self.lq, self.lp, self.bs = max_query_len, max_passage_len, batch_size
        # Passage token embeddings do not depend on the query (late interaction): each distinct
        # passage is encoded once per actor, however many questions retrieve it.
        self.cache: dict[str, object] = {}

    def __call__(self, batch: dict) -> dict:
        from kale_ray.kard.reranker import encode, rerank_scores

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


def stage_questions(cfg: KARDJobConfig, kg, out: Path, progress) -> tuple[list[QAExample], list[QAExample], dict]:
    folder = out / "qa"
    rejects = Rejects()
    if _done(folder):
        train = list(read_qa_jsonl(folder / "train.jsonl", rejects))
        test = list(read_qa_jsonl(folder / "test.jsonl", rejects))
        return train, test, _done(folder)
    qa = cfg.qa
    if qa.source == "generate":
        questions = generate_questions(kg, qa.num_questions, qa.hops, qa.num_choices, qa.max_answers, qa.seed)
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
    info = {"train": len(train), "test": len(test), "rejected": rejects.counts(),
            "test_by_hops": dict(Counter(str(q.num_hops) for q in test))}
    progress(f"[kard] questions: {len(train)} train, {len(test)} held-out test; rejected {rejects.counts() or 0}")
    return train, test, _mark(folder, info)


def stage_kb(cfg: KARDJobConfig, kg, out: Path, progress) -> tuple[list[dict], dict]:
    from kale_ray.kard.kb import build_kb
    from kale_ray.kard.retrieval import BM25Index

    folder = out / "kb"
    done = _done(folder)
    if done:
        return _read_jsonl(folder / "passages.jsonl"), done
    t = time.perf_counter()
    rejects = Rejects()
    passages, info = build_kb(cfg.kb.sources, kg, rejects, on_error=cfg.kb.on_error, max_hpo_terms=cfg.kb.max_hpo_terms,
                              facts_per_passage=cfg.kb.facts_per_passage, max_passage_words=cfg.kb.max_passage_words)
    rows = [dict(p.to_dict(), full_text=p.full_text) for p in passages]
    _write_jsonl(folder / "passages.jsonl", rows)
    rejects.write_jsonl(folder / "rejects.jsonl")
    t_index = time.perf_counter()
    BM25Index.build([r["id"] for r in rows], [r["full_text"] for r in rows]).save(folder / "bm25")
    info.update(build_seconds=round(t_index - t, 2), index_seconds=round(time.perf_counter() - t_index, 2))
    progress(f"[kard] knowledge base: {info['passages']} passages {info['per_source']}; BM25 index in "
             f"{info['index_seconds']:.1f}s; rejected lines {info['rejected'] or 0}")
    return rows, _mark(folder, info)


def stage_teacher(cfg: KARDJobConfig, train, test, out: Path, progress) -> tuple[list[dict], dict]:
    from kale_ray.core.prompts import render_chat
    from kale_ray.models import load_tokenizer, resolve_model

    folder = out / "teacher"
    done = _done(folder)
    if done:
        return _read_jsonl(folder / "generations.jsonl"), done
    t = time.perf_counter()
    tc = cfg.teacher
    path = resolve_model(tc.model.name, tc.model.cache_dir)
    tok = load_tokenizer(path, tc.model.trust_remote_code)
    rows = []
    for split, qs, n in (("train", train, tc.num_rationales), ("test", test, 1)):
        for q in qs:
            prompt = render_chat(teacher_messages(q.question, q.choices, q.answer), tok)
            for s in range(n):
                rows.append({"key": f"{q.id}#{s}", "qid": q.id, "split": split, "sample": s, "prompt": prompt})
    gen = tc.generation
    res = generate_over_ray(path, gen, tc.model.max_model_len, rows, tok, tc.model.trust_remote_code)
    label = f"vllm:{tc.model.name.replace('builtin:', '')}"
    outs = [{"qid": r["qid"], "split": r["split"], "sample": r["sample"], "teacher": label, "prompt": r["prompt"],
             **res[r["key"]]} for r in rows]
    _write_jsonl(folder / "generations.jsonl", outs)
    info = {"rows": len(outs), "errors": dict(Counter(o["error"].split(":")[0] for o in outs if o["error"])),
            "tokens": int(sum(o["tokens"] for o in outs)), "seconds": round(time.perf_counter() - t, 2)}
    progress(f"[kard] teacher: {len(outs)} rationales generated ({info['tokens']} tokens) in {info['seconds']:.0f}s")
    return outs, _mark(folder, info)


def stage_verify(cfg: KARDJobConfig, kg, train, test, gens: list[dict], out: Path, progress
                 ) -> tuple[dict[str, list[dict]], dict]:
    """Verified rationales per question id (train and test), template fallback flagged; rejects aside."""
    from kale_ray.core.prompts import render_chat
    from kale_ray.kard.scoring import ChoiceScorer
    from kale_ray.kard.verify import text_checks
    from kale_ray.models import load_tokenizer, resolve_model

    folder = out / "rationales"
    done = _done(folder)
    if done:
        kept: dict[str, list[dict]] = {}
        for r in _read_jsonl(folder / "kept.jsonl"):
            kept.setdefault(r["qid"], []).append(r)
        return kept, done
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
            ds = _ds(to_score, 8).map_batches(
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
    _write_jsonl(folder / "kept.jsonl", kept_rows)
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
    return kept, _mark(folder, info)


def stage_retrieval(cfg: KARDJobConfig, train, test, kept, passages, out: Path, progress) -> tuple[dict, dict]:
    """BM25 for training knowledge (rationale queries), reranker candidates and test candidates (question queries)."""
    folder = out / "retrieval"
    done = _done(folder)
    if done:
        return json.loads((folder / "retrieval.json").read_text()), done
    t = time.perf_counter()
    rc = cfg.reranker
    index_dir = out / "kb" / "bm25"
    train_ids = {q.id for q in train}
    by_rationale = [(f"{r['qid']}#{r['sample']}", r["rationale"]) for rs in kept.values() for r in rs]
    k_rat = max(cfg.knowledge_passages, rc.candidates_by_rationale)
    hits_r = bm25_over_ray(index_dir, by_rationale, k_rat)
    qs = [(q.id, q.question) for q in train] + [(q.id, q.question) for q in test]
    hits_q = bm25_over_ray(index_dir, qs, max(rc.candidates_by_question, cfg.eval.retrieve_top, cfg.knowledge_passages))
    res = {"by_rationale": {k: v for k, v in hits_r.items()}, "by_question": hits_q}
    (folder).mkdir(parents=True, exist_ok=True)
    (folder / "retrieval.json").write_text(json.dumps(res))
    info = {"rationale_queries": len(by_rationale), "question_queries": len(qs),
            "train_rationale_queries": sum(1 for k, _ in by_rationale if k.rsplit("#", 1)[0] in train_ids),
            "seconds": round(time.perf_counter() - t, 2)}
    progress(f"[kard] BM25 over Ray Data: {len(by_rationale)} rationale and {len(qs)} question queries "
             f"in {info['seconds']:.1f}s")
    return res, _mark(folder, info)


def stage_student_rows(cfg: KARDJobConfig, train, kept, passages, retrieval, student_path: str, out: Path) -> dict:
    from kale_ray.core.prompts import render_chat
    from kale_ray.models import load_tokenizer

    folder = out / "rows"
    done = _done(folder)
    if done:
        return done
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
    _write_jsonl(folder / "noknow" / "train.jsonl", noknow)
    _write_jsonl(folder / "kard" / "train.jsonl", kard)
    return _mark(folder, {"rows": len(kard), "by_teacher": dict(Counter(r["teacher"] for r in kard))})


def stage_train_student(cfg: KARDJobConfig, name: str, out: Path, progress) -> tuple[dict, str]:
    from kale_ray.train.trainer import run_training

    folder = out / f"student_{name}"
    done = folder / "train_summary.json"
    if done.exists():
        return json.loads(done.read_text()), str(folder / "merged")
    tcfg = dataclasses.replace(copy.deepcopy(cfg.train), loss="sft", data=str(out / "rows" / name), out_dir=str(folder))
    progress(f"[kard] training student '{name}' on Ray Train + DeepSpeed ZeRO-{tcfg.zero_stage}, "
             f"{tcfg.num_workers} workers")
    res = run_training(tcfg, run_name=f"kard-{name}")
    if not res.merged_dir:
        raise RuntimeError(f"training wrote no merged model under {folder} (set train.save_merged=true)")
    return res.summary, res.merged_dir


def stage_reranker(cfg: KARDJobConfig, train, kept, passages, retrieval, out: Path, progress) -> dict:
    from kale_ray.kard.retrieval import BM25Index
    from kale_ray.kard.rerank_train import train_reranker

    folder = out / "reranker"
    done = folder / "reranker_summary.json"
    if done.exists():
        return json.loads(done.read_text())
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
    _write_jsonl(folder / "rows" / "train.jsonl", rows)
    progress(f"[kard] reranker: {len(rows)} training questions x <= "
             f"{rc.candidates_by_rationale + rc.candidates_by_question} candidates; skipped {dict(skipped) or 0}; "
             f"Ray Train, {rc.num_workers} workers")
    summary = train_reranker(rc, folder / "rows" / "train.jsonl", folder, use_gpu=cfg.train.use_gpu)
    summary["skipped"] = dict(skipped)
    done.write_text(json.dumps(summary, indent=2))
    return summary


def stage_test_knowledge(cfg: KARDJobConfig, test, kept, passages, retrieval, out: Path, progress) -> tuple[list[dict], dict]:
    """Per test question: BM25 top-N by question, reranked order, and hit@k of the rationale-best passage."""
    from kale_ray.kard.retrieval import BM25Index

    folder = out / "eval" / "knowledge"
    done = _done(folder)
    if done:
        return _read_jsonl(folder / "knowledge.jsonl"), done
    t = time.perf_counter()
    rc = cfg.reranker
    top_n = cfg.eval.retrieve_top
    rows = [{"key": q.id, "query": q.question,
             "passages": json.dumps([passages[i]["full_text"] for i, _ in retrieval["by_question"][q.id][:top_n]])}
            for q in test]
    ds = _ds(rows, 4).map_batches(RerankActor, fn_constructor_args=(str(out / "reranker" / "model"), rc.max_query_len,
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
    _write_jsonl(folder / "knowledge.jsonl", out_rows)
    metrics = {"n": n_ref, "candidates": top_n, "excluded": dict(no_ref),
               "reference_by_teacher": dict(Counter(r.get("reference_teacher") for r in out_rows if r.get("gold") is not None)),
               **{f"{name}_hit@{k}": (hits[name][k] / n_ref if n_ref else None) for name in hits for k in (1, 3, 10)},
               "rerank_seconds": round(t_rerank, 2)}
    progress(f"[kard] reranker on {len(test)} test questions ({top_n} BM25 candidates each): hit@1 "
             f"{metrics['reranker_hit@1']} vs BM25 {metrics['bm25_hit@1']} (n={n_ref}) in {t_rerank:.0f}s")
    return out_rows, _mark(folder, metrics)


def stage_eval(cfg: KARDJobConfig, name: str, model_dir: str, test, passages, knowledge: list[dict],
               variants: list[str], out: Path, progress) -> dict:
    """Sample ``eval.num_samples`` rationales+answers per question and variant, majority vote, accuracy."""
    from kale_ray.core.prompts import render_chat
    from kale_ray.eval.metrics import wilson_interval
    from kale_ray.kard.prompts import student_messages
    from kale_ray.models import load_tokenizer

    folder = out / "eval" / name
    done = _done(folder)
    if done:
        return done
    t = time.perf_counter()
    ev = cfg.eval
    gen = ev.generation if ev.num_samples > 1 else dataclasses.replace(ev.generation, temperature=0.0)
    tok = load_tokenizer(model_dir, cfg.train.model.trust_remote_code)
    know = {k["qid"]: k for k in knowledge}
    rows = []
    for q in test:
        for v in variants:
            ids = {"none": [], "bm25": know[q.id]["bm25"], "reranker": know[q.id]["reranked"]}[v][: cfg.knowledge_passages]
            prompt = render_chat(student_messages(q.question, q.choices, [passages[i]["full_text"] for i in ids]), tok)
            for s in range(ev.num_samples):
                rows.append({"key": f"{q.id}|{v}|{s}", "prompt": prompt})
    res = generate_over_ray(model_dir, gen, cfg.train.model.max_model_len, rows, tok, cfg.train.model.trust_remote_code)
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
    _write_jsonl(folder / "predictions.jsonl", preds)
    info = {"model": model_dir, "num_samples": ev.num_samples, "temperature": gen.temperature, "variants": metrics,
            "seconds": round(time.perf_counter() - t, 2)}
    progress(f"[kard] eval '{name}': " + ", ".join(f"{v} {m['accuracy']:.3f}" for v, m in metrics.items())
             + f" (n={len(test)}, {ev.num_samples} samples, {info['seconds']:.0f}s)")
    return _mark(folder, info)


# --------------------------------------------------------------------------- the recipe


def run_kard(cfg: KARDJobConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    from kale_ray.core.kg import load_kg
    from kale_ray.models import resolve_model
    from kale_ray.report import machine_info

    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    timings: dict[str, float] = {}
    reused: list[str] = []
    t_all = time.perf_counter()
    _init_ray(cfg)

    def timed(name: str, folder: Path | None, fn):
        existed = folder is not None and ((folder / STAGE_DONE).exists() or any(folder.glob("*_summary.json")))
        t = time.perf_counter()
        res = fn()
        timings[name] = round(time.perf_counter() - t, 2)
        if existed:
            reused.append(name)
        return res

    kg = load_kg(cfg.kg.source, cfg.kg.names, cfg.kg.on_error)
    train, test, qa_info = timed("questions", out / "qa", lambda: stage_questions(cfg, kg, out, progress))
    passages, kb_info = timed("kb", out / "kb", lambda: stage_kb(cfg, kg, out, progress))
    gens, teacher_info = timed("teacher", out / "teacher", lambda: stage_teacher(cfg, train, test, out, progress))
    kept, verify_info = timed("verify", out / "rationales",
                              lambda: stage_verify(cfg, kg, train, test, gens, out, progress))
    retrieval, retr_info = timed("retrieval", out / "retrieval",
                                 lambda: stage_retrieval(cfg, train, test, kept, passages, out, progress))
    student_path = resolve_model(cfg.train.model.name, cfg.train.model.cache_dir)
    rows_info = timed("student_rows", out / "rows",
                      lambda: stage_student_rows(cfg, train, kept, passages, retrieval, student_path, out))
    train_a, merged_a = timed("train_noknow", out / "student_noknow",
                              lambda: stage_train_student(cfg, "noknow", out, progress))
    train_k, merged_k = timed("train_kard", out / "student_kard", lambda: stage_train_student(cfg, "kard", out, progress))
    rr_info = timed("reranker", out / "reranker",
                    lambda: stage_reranker(cfg, train, kept, passages, retrieval, out, progress))
    knowledge, rr_eval = timed("rerank_test", out / "eval" / "knowledge",
                               lambda: stage_test_knowledge(cfg, test, kept, passages, retrieval, out, progress))
    ev_a = timed("eval_noknow", out / "eval" / "noknow",
                 lambda: stage_eval(cfg, "noknow", merged_a, test, passages, knowledge, ["none"], out, progress))
    ev_k = timed("eval_kard", out / "eval" / "kard",
                 lambda: stage_eval(cfg, "kard", merged_k, test, passages, knowledge, ["bm25", "reranker"], out, progress))
    timings["total_this_run"] = round(time.perf_counter() - t_all, 2)

    def tsum(s: dict) -> dict:
        return {k: s.get(k) for k in ("steps", "samples", "first_loss", "final_loss", "seconds_per_step",
                                      "wall_seconds", "rejected")}

    metrics = {
        "student": cfg.train.model.name, "teacher": cfg.teacher.model.name, "reranker_encoder": cfg.reranker.model,
        "machine": machine_info(),
        "questions": qa_info, "kb": kb_info, "teacher_stage": teacher_info, "verifier": verify_info,
        "retrieval": retr_info, "student_rows": rows_info,
        "train": {"noknow": tsum(train_a), "kard": tsum(train_k)},
        "reranker_train": rr_info, "reranker_eval": rr_eval,
        "accuracy": {"a_no_knowledge": ev_a["variants"]["none"], "b_kard_bm25": ev_k["variants"]["bm25"],
                     "c_kard_reranker": ev_k["variants"]["reranker"]},
        "eval": {"noknow": ev_a, "kard": ev_k},
        "timings": timings, "reused_stages": reused,
        "stage_seconds_when_run": {"teacher": teacher_info.get("seconds"), "verify": verify_info.get("seconds"),
                                   "retrieval": retr_info.get("seconds"), "train_noknow": train_a.get("wall_seconds"),
                                   "train_kard": train_k.get("wall_seconds"), "reranker": rr_info.get("wall_seconds"),
                                   "rerank_test": rr_eval.get("rerank_seconds"), "eval_noknow": ev_a.get("seconds"),
                                   "eval_kard": ev_k.get("seconds")},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    write_report(out, metrics, cfg)
    acc = metrics["accuracy"]
    progress(f"[kard] done in {timings['total_this_run'] / 60:.1f} min: accuracy (a) {acc['a_no_knowledge']['accuracy']:.3f}, "
             f"(b) {acc['b_kard_bm25']['accuracy']:.3f}, (c) {acc['c_kard_reranker']['accuracy']:.3f}; "
             f"report: {out / 'report.md'}")
    return metrics


# --------------------------------------------------------------------------- report


def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def write_report(out: Path, m: dict, cfg: KARDJobConfig) -> None:
    acc = m["accuracy"]
    v = m["verifier"]
    rr = m["reranker_eval"]
    n_test = m["questions"]["test"]
    lines = [
        "# KARD report", "",
        f"Student `{m['student']}` (LoRA r={cfg.train.lora.r}, 'sft' loss on Explanation + Answer), teacher "
        f"`{m['teacher']}` ({cfg.teacher.num_rationales} rationales per training question, verifier: "
        f"{v['verifier']}), reranker `{m['reranker_encoder']}` (max-sim, LoRA r={cfg.reranker.lora.r}, loss "
        f"{cfg.reranker.loss}, t1={cfg.reranker.t1}, t2={cfg.reranker.t2}). Knowledge base: {m['kb']['passages']} "
        f"passages {m['kb']['per_source']}. KG `{cfg.kg.source}`; {m['questions']['train']} training questions, "
        f"{n_test} held-out multiple-choice questions ({cfg.qa.num_choices} choices, by hops "
        f"{m['questions'].get('test_by_hops')}). Machine: {m['machine'].get('cpus')} CPUs.", "",
        f"## Accuracy on the same {n_test} held-out questions "
        f"({cfg.eval.num_samples} samples, majority vote, {cfg.knowledge_passages} passage(s))", "",
        "| model | knowledge at inference | accuracy | 95% CI | parse rate |", "|---|---|---|---|---|",
    ]
    for label, key, know in (("(a) student, reasoning distillation only", "a_no_knowledge", "none"),
                             ("(b) KARD", "b_kard_bm25", f"BM25 top-{cfg.knowledge_passages} by question"),
                             ("(c) KARD", "c_kard_reranker",
                              f"BM25 top-{cfg.eval.retrieve_top} by question, reranked")):
        a = acc[key]
        ci = a["accuracy_ci95"]
        lines.append(f"| {label} | {know} | {_f(a['accuracy'])} | {_f(ci[0])}-{_f(ci[1])} | {_f(a['parse_rate'], 2)} |")
    lines += ["", f"Chance is {1 / cfg.qa.num_choices:.3f}. One seed; differences inside overlapping CIs are not evidence.",
              "", "## Reranker vs BM25 (the rationale-best passage among the question's BM25 candidates)", "",
              f"For each held-out question, the reference is its verified teacher rationale (or the template "
              f"fallback: {rr.get('reference_by_teacher')}); the gold passage is the candidate with the highest BM25 "
              f"score against it, among BM25's top-{rr['candidates']} by question. n={rr['n']} "
              f"(excluded: {rr.get('excluded') or 'none'}).", "",
              "| ranking | hit@1 | hit@3 | hit@10 |", "|---|---|---|---|"]
    for name in ("bm25", "reranker"):
        lines.append(f"| {'BM25 by question' if name == 'bm25' else 'reranker'} | {_f(rr.get(name + '_hit@1'))} | "
                     f"{_f(rr.get(name + '_hit@3'))} | {_f(rr.get(name + '_hit@10'))} |")
    tr = m["train"]
    rt = m["reranker_train"]
    lines += ["", "## Data", "",
              f"- teacher: {m['teacher_stage']['rows']} generations ({m['teacher_stage']['tokens']} tokens); "
              f"verified teacher rationales kept: {v['teacher_rationales_verified']}; rejected by reason: "
              f"{v['rejected'] or 'none'}",
              f"- kept rationales by source: {v['by_teacher']} (template-fallback = the exact KG chain, used when "
              "no teacher rationale passed)",
              f"- student rows: {m['student_rows']['rows']} ({m['student_rows']['by_teacher']})",
              "", "## Training", "",
              f"- student (a) no knowledge: {tr['noknow']['steps']} steps, loss {_f(tr['noknow']['first_loss'])} -> "
              f"{_f(tr['noknow']['final_loss'])}, {_f(tr['noknow']['seconds_per_step'], 2)} s/step",
              f"- student KARD: {tr['kard']['steps']} steps, loss {_f(tr['kard']['first_loss'])} -> "
              f"{_f(tr['kard']['final_loss'])}, {_f(tr['kard']['seconds_per_step'], 2)} s/step",
              f"- reranker: {rt['rows']} questions, {rt['steps']} steps on {rt['workers']} Ray Train workers, loss "
              f"{_f(rt['first_loss'], 4)} -> {_f(rt['final_loss'], 4)}, {_f(rt['seconds_per_step'], 2)} s/step; "
              f"skipped {rt.get('skipped') or 'none'}",
              "", "## Time per stage (s)", "",
              "This run" + (f" (reused: {', '.join(m['reused_stages'])})" if m["reused_stages"] else "")
              + "; the second column is the time when the stage ran.", "",
              "| stage | this run | when run |", "|---|---|---|"]
    when = m["stage_seconds_when_run"]
    for k, val in m["timings"].items():
        lines.append(f"| {k} | {val:.1f} | {_f(when.get(k), 1)} |")
    lines.append("")
    (out / "report.md").write_text("\n".join(lines))
