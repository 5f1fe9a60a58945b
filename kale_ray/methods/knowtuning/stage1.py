"""KnowTuning Stage I (fine-grained knowledge augmentation) up to its training rows: ``build_stage1_rows``.

1. **atomic facts**: the teacher splits each training answer into facts (guided JSON on vLLM,
   retried with another seed, then rejected with its reason; ``extract_fallback: sentences`` keeps
   a rejected answer with one fact per sentence, marked ``sentence-fallback``)
   -> ``facts.jsonl``, ``facts_rejects.jsonl``;
2. **perplexity** of every fact under the student (given the question prompt), one batched
   forward pass in a Ray Data actor (:class:`FactScorer`) -> ``ppl.jsonl``;
3. **difficult facts**: the ``alpha`` share with the highest perplexity;
4. **rewrites**: the teacher writes a question + answer around each difficult fact (rejected
   rewrites fall back to :func:`~kale_ray.methods.knowtuning.atomic.template_rewrite`, counted)
   -> ``rewrites.jsonl``, ``rewrite_rejects.jsonl``;
5. rows ``{id, prompt, completion, kind}`` for SFT: originals + rewrites -> ``data/train.jsonl``.

Torch at import (the scorer); Ray lazily.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from kale_ray.core.io import read_jsonl, write_jsonl  # noqa: F401  (re-exported: evaluate.py reads them here)
from kale_ray.core.prompts import completion_text, render_chat
from kale_ray.core.rejects import Rejects
from kale_ray.methods.knowtuning import atomic
from kale_ray.methods.knowtuning.data import long_form_messages
from kale_ray.train.collators import build_sequence, pad_views, rows_from_columns, tokenizer_adds_bos


# --------------------------------------------------------------------------- perplexity


class FactScorer:
    """Summed log-prob and token count of each row's ``text`` given its ``context``: a Ray Data callable class.

    One batched forward per ``batch_size`` rows (right padding, labels on the text tokens only).
    A row whose text is empty or does not fit ``max_seq_len`` gets NaN and its reason in ``ppl_error``.
    """

    def __init__(self, model_path: str, max_seq_len: int = 256, batch_size: int = 16, threads: int = 0,
                 trust_remote_code: bool = False):
        from kale_ray.methods.knowtuning.dpo import answer_logps  # noqa: F401  (import check before loading a model)
        from kale_ray.models import load_causal_lm, load_tokenizer
        from kale_ray.train.heads import AnswerLogits

        if threads > 0:
            torch.set_num_threads(threads)
        self.tok = load_tokenizer(model_path, trust_remote_code)
        self.model = AnswerLogits(load_causal_lm(model_path, "float32", trust_remote_code)).eval()
        self.bos = self.tok.bos_token_id if tokenizer_adds_bos(self.tok) else None
        self.max_seq_len, self.batch_size = max_seq_len, batch_size

    @torch.no_grad()
    def score(self, rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        from kale_ray.methods.knowtuning.dpo import answer_logps

        n = len(rows)
        sums, counts, errors = np.full(n, np.nan), np.zeros(n, dtype=np.int64), [""] * n
        ctx = self.tok([str(r["context"]) for r in rows], add_special_tokens=False)["input_ids"] if n else []
        txt = self.tok([str(r["text"]) for r in rows], add_special_tokens=False)["input_ids"] if n else []
        seqs, idx = [], []
        for i in range(n):
            c = ctx[i] or [self.tok.eos_token_id]  # at least one context token: the first text token is predicted
            seq, n_ctx, reason, _ = build_sequence(c, txt[i], self.max_seq_len, self.bos)
            if reason is not None:
                errors[i] = reason
                continue
            seqs.append((seq, n_ctx))
            idx.append(i)
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start: start + self.batch_size]
            s, k = answer_logps(self.model, pad_views(chunk, int(self.tok.pad_token_id)))
            ii = np.asarray(idx[start: start + self.batch_size])
            sums[ii], counts[ii] = s.double().numpy(), k.numpy()
        return sums, counts, errors

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s, k, e = self.score(rows_from_columns(batch))
        batch["logp_sum"], batch["n_tokens"], batch["ppl_error"] = s, k, np.array(e, dtype=object)
        return batch


def fact_logps(rows: Sequence[Mapping[str, Any]], model_path: str, max_seq_len: int, batch_size: int,
               mode: str = "auto", trust_remote_code: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(logp sums, token counts, errors)`` of rows ``{context, text}``, in order: a Ray Data actor or this process."""
    kw = {"model_path": model_path, "max_seq_len": max_seq_len, "batch_size": batch_size,
          "trust_remote_code": trust_remote_code}
    from kale_ray.runtime.generate import map_in_order, use_ray

    if not use_ray(mode) or not rows:
        return FactScorer(**kw).score(rows)
    got = map_in_order([{"context": str(r["context"]), "text": str(r["text"])} for r in rows], FactScorer, batch_size,
                       what="the perplexity pass", fn_constructor_kwargs=kw)
    return (np.array([float(r["logp_sum"]) for r in got]), np.array([int(r["n_tokens"]) for r in got]),
            [str(r["ppl_error"] or "") for r in got])


# --------------------------------------------------------------------------- steps


def extract_facts(qas: Sequence[dict], cfg, label: str, progress: Callable[[str], None],
                  answers: Mapping[str, str] | None = None, step=None, fallback: str = "sentences",
                  max_facts: int = 12) -> tuple[dict[str, dict], Rejects, dict]:
    """``{qa id: {"facts": [...], "extractor": "teacher" | "sentence-fallback"}}``, rejects, step stats.

    ``answers`` overrides the text split per id (generated answers at evaluation); ``cfg`` is the job
    config (teacher + generation); ``step`` a :class:`TeacherStepConfig`.
    """
    from kale_ray.methods.knowtuning.teacher import teacher_step

    rejects = Rejects()
    texts = {q["id"]: (answers[q["id"]] if answers is not None else q["answer"]) for q in qas}
    items = [{"key": q["id"], "question": q["question"],
              "messages": atomic.extraction_messages(q["question"], texts[q["id"]])} for q in qas
             if texts[q["id"]].strip()]
    for q in qas:
        if not texts[q["id"]].strip():
            rejects.add(atomic.EMPTY_GENERATION, id=q["id"], step="extract")
    out: dict[str, dict] = {}
    stats: dict[str, Any] = {"items": len(items), "backend": cfg.generation.backend, "parsed": 0, "passes": 0}
    if cfg.generation.backend == "template" or not items:
        failed = [{"key": it["key"], "reason": "no_teacher", "attempts": 0} for it in items]
    else:
        res = teacher_step(items, lambda it, text: atomic.parse_fact_list(text, max_facts, source=texts[it["key"]],
                                                                            question=it["question"]),
                           cfg.teacher,
                           cfg.generation, step.max_attempts, step.retry_temperature, step.max_tokens,
                           atomic.facts_schema(max_facts) if step.structured_output else None, label, progress)
        stats.update(res.stats)
        out = {k: {"facts": v, "extractor": "teacher", "attempts": res.attempts[k]} for k, v in res.parsed.items()}
        failed = res.rejected
    for r in failed:
        rejects.add(r["reason"], id=r["key"], step="extract", attempts=r.get("attempts"),
                    generation=r.get("generation", ""), detail=r.get("detail", ""))
        if fallback == "sentences":
            facts = atomic.split_sentences(texts[r["key"]], max_facts)
            if facts:
                out[r["key"]] = {"facts": facts, "extractor": "sentence-fallback", "attempts": r.get("attempts")}
    stats["rejected"] = len(failed)  # teacher items rejected after every attempt
    stats["by_extractor"] = dict(Counter(v["extractor"] for v in out.values()))
    stats["rejected_by_reason"] = rejects.counts()  # + answers with no text at all
    return out, rejects, stats


def build_stage1_rows(cfg, train_qas: Sequence[dict], out: Path, progress: Callable[[str], None] = print
                      ) -> dict[str, Any]:
    """Steps 1-5 above for the job config ``cfg``; writes under ``out`` and returns the stage summary."""
    from kale_ray.methods.knowtuning.teacher import teacher_step
    from kale_ray.models import load_tokenizer, resolve_model

    s1 = cfg.stage1
    seconds: dict[str, float] = {}
    qa_by_id = {q["id"]: q for q in train_qas}

    # 1. atomic facts
    t0 = time.perf_counter()
    extracted, ex_rejects, ex_stats = extract_facts(train_qas, cfg, "stage1:extract", progress, step=s1.extract,
                                                    fallback=s1.extract_fallback, max_facts=s1.max_facts)
    facts_rows = [{"id": q["id"], "question": q["question"], "subject": q.get("subject"),
                   **extracted[q["id"]]} for q in train_qas if q["id"] in extracted]
    write_jsonl(out / "facts.jsonl", facts_rows)
    ex_rejects.write_jsonl(out / "facts_rejects.jsonl")
    seconds["extract"] = round(time.perf_counter() - t0, 2)

    # 2. perplexity of every fact under the student, given the question
    t0 = time.perf_counter()
    student = resolve_model(s1.ppl_model or s1.train.model.name, s1.train.model.cache_dir)
    tok = load_tokenizer(student, s1.train.model.trust_remote_code)
    prompts = {q["id"]: render_chat(long_form_messages(q["question"]), tok) for q in train_qas}
    units = [{"qid": r["id"], "index": i, "text": f,
              "context": prompts[r["id"]] if s1.ppl_context == "question" else ""}
             for r in facts_rows for i, f in enumerate(r["facts"])]
    sums, counts, errors = fact_logps(units, student, s1.train.max_seq_len, s1.ppl_batch_size, s1.ppl_with,
                                      s1.train.model.trust_remote_code)
    ppls = [atomic.perplexity(float(s), int(n)) for s, n in zip(sums, counts)]
    ppl_rejects = Rejects()
    for u, e in zip(units, errors):
        if e:
            ppl_rejects.add(e, qid=u["qid"], index=u["index"], step="perplexity")
    groups = [u["qid"] for u in units] if s1.difficulty_scope == "per_question" else None
    difficult = set(atomic.select_difficult(ppls, s1.alpha, groups).tolist())
    ppl_rows = [dict({k: v for k, v in u.items() if k != "context"}, ppl=p, n_tokens=int(n), difficult=i in difficult,
                     error=e) for i, (u, p, n, e) in enumerate(zip(units, ppls, counts, errors))]
    write_jsonl(out / "ppl.jsonl", ppl_rows)
    finite = [p for p in ppls if np.isfinite(p)]
    seconds["perplexity"] = round(time.perf_counter() - t0, 2)
    progress(f"[stage1] {len(units)} atomic facts scored, {len(difficult)} difficult (alpha {s1.alpha})")

    # 3-4. rewrites around each difficult fact
    t0 = time.perf_counter()
    hard = [ppl_rows[i] for i in sorted(difficult)]
    items = [{"key": f"{r['qid']}#f{r['index']}", "fact": r["text"], "qid": r["qid"],
              "messages": atomic.rewrite_messages(qa_by_id[r["qid"]]["question"], qa_by_id[r["qid"]]["answer"],
                                                  r["text"])} for r in hard]
    rw_rejects = Rejects()
    rewrites: dict[str, dict] = {}
    rw_stats: dict[str, Any] = {"items": len(items), "parsed": 0, "passes": 0}
    if cfg.generation.backend == "template" or not items:
        failed = [{"key": it["key"], "reason": "no_teacher", "attempts": 0} for it in items]
    else:
        res = teacher_step(items, lambda it, text: atomic.parse_rewrite(text, it["fact"], s1.min_fact_overlap),
                           cfg.teacher, cfg.generation, s1.rewrite.max_attempts, s1.rewrite.retry_temperature,
                           s1.rewrite.max_tokens, atomic.REWRITE_SCHEMA if s1.rewrite.structured_output else None,
                           "stage1:rewrite", progress)
        rw_stats.update(res.stats)
        rewrites = {k: dict(v, rewriter="teacher") for k, v in res.parsed.items()}
        failed = res.rejected
    by_key = {it["key"]: it for it in items}
    for r in failed:
        rw_rejects.add(r["reason"], key=r["key"], step="rewrite", attempts=r.get("attempts"),
                       generation=r.get("generation", ""), detail=r.get("detail", ""))
        if s1.rewrite_fallback == "template":
            it = by_key[r["key"]]
            subject = qa_by_id[it["qid"]].get("subject")
            name = _subject_name(cfg, subject) if subject else qa_by_id[it["qid"]]["question"].rstrip("?.")
            rewrites[r["key"]] = dict(atomic.template_rewrite(it["fact"], name), rewriter="template-fallback")
    rw_rows = [{"id": k, "qid": by_key[k]["qid"], "fact": by_key[k]["fact"], **rewrites[k]}
               for k in by_key if k in rewrites]
    write_jsonl(out / "rewrites.jsonl", rw_rows)
    rw_rejects.write_jsonl(out / "rewrite_rejects.jsonl")
    seconds["rewrite"] = round(time.perf_counter() - t0, 2)

    # 5. SFT rows: original + rewritten QA, with the student's chat template
    eos = tok.eos_token or ""
    original = [{"id": q["id"], "prompt": prompts[q["id"]], "completion": completion_text(q["answer"], eos),
                 "kind": "original"} for q in train_qas]
    fine = [{"id": r["id"], "prompt": render_chat(long_form_messages(r["question"]), tok),
             "completion": completion_text(r["answer"], eos), "kind": "rewrite"} for r in rw_rows]
    write_jsonl(out / "data" / "train.jsonl", original + fine)
    return {"answers": len(train_qas), "extract": ex_stats, "atomic_facts": len(units),
            "facts_per_answer": len(units) / len(facts_rows) if facts_rows else 0.0,
            "perplexity": {"scored": len(finite), "rejected": ppl_rejects.counts(),
                           "mean": float(np.mean(finite)) if finite else None,
                           "median": float(np.median(finite)) if finite else None,
                           "difficult_threshold": float(min(ppls[i] for i in difficult)) if difficult else None,
                           "model": student, "context": s1.ppl_context},
            "difficult": len(difficult), "alpha": s1.alpha, "scope": s1.difficulty_scope,
            "rewrite": dict(rw_stats, rejected=len(failed), rejected_by_reason=rw_rejects.counts(),
                            by_rewriter=dict(Counter(r["rewriter"] for r in rw_rows))),
            "rows": {"original": len(original), "rewrite": len(fine)}, "seconds": seconds}


_KG_CACHE: dict[str, Any] = {}


def load_kg_cached(kg_cfg):
    from kale_ray.core.kg import load_kg

    key = f"{kg_cfg.source}|{kg_cfg.names}|{kg_cfg.on_error}"
    if key not in _KG_CACHE:
        _KG_CACHE.clear()
        _KG_CACHE[key] = load_kg(kg_cfg.source, kg_cfg.names, kg_cfg.on_error)
    return _KG_CACHE[key]


def _subject_name(cfg, subject: str) -> str:
    kg = load_kg_cached(cfg.qa.kg)
    return kg.entity_name(subject) if subject in kg.entity_index else subject
