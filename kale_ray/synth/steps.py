"""Row-level synthesis steps: pure functions over dict rows (no Ray), run inside Ray Data.

``link_and_search`` -> (teacher) -> ``finish_row``. Each step returns the row with either
its outputs filled or ``reject_reason`` set; nothing is dropped here.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from typing import Any

import numpy as np

from kale_ray.config import PathConfig
from kale_ray.core.kg import GraphIndex, KnowledgeGraph
from kale_ray.core.parse import clean_generation, verify_rationale
from kale_ray.core.paths import KGPath, PathSearchParams, path_to_named, sample_paths
from kale_ray.core.prompts import rationale_request_messages, template_rationale
from kale_ray.core.qa import EntityLinker, QAExample, link_example, normalize, relation_phrase


def path_params(cfg: PathConfig) -> PathSearchParams:
    return PathSearchParams(
        max_hops=cfg.max_hops, k=cfg.k, num_anchors=cfg.num_anchors, anchor_hops=cfg.anchor_hops,
        bfs_fallback=cfg.bfs_fallback, partial_paths=cfg.partial_paths, max_expansions=cfg.max_expansions,
        heuristic=cfg.heuristic,
    )


class SynthContext:
    """What every path-search worker needs, built once per worker from the shared KG."""

    def __init__(self, kg: KnowledgeGraph, index: GraphIndex, cfg: PathConfig) -> None:
        self.kg = kg
        self.index = index
        self.params = path_params(cfg)
        self.seed = cfg.seed
        self.oversample = max(1, cfg.oversample)
        self.linker = EntityLinker(kg)


def relation_relevance(kg: KnowledgeGraph, path: KGPath, question_norm: str) -> float:
    """Share of a path's hops whose relation words occur in the question (0..1).

    On dense graphs the shortest path is often an unrelated shortcut; preferring paths
    whose relations the question talks about keeps the rationale on the question's logic.
    """
    if not path.hops:
        return 0.0
    return sum(_mentioned(kg, r, question_norm) for _, r, _ in path.hops) / len(path.hops)


def _mentioned(kg: KnowledgeGraph, r: int, question_norm: str) -> bool:
    words = set(question_norm.split())
    phrase = normalize(relation_phrase(kg, r)).split()
    rel_words = [w for w in phrase if len(w) > 2] or phrase
    return all(w in words for w in rel_words)


def rank_paths(kg: KnowledgeGraph, paths: list[KGPath], question: str) -> list[KGPath]:
    """Complete paths first, then those closest to the question's relations, then shorter."""
    qn = normalize(question)

    def key(p: KGPath):
        covered = len({r for _, r, _ in p.hops if _mentioned(kg, r, qn)})
        return (not p.complete, -relation_relevance(kg, p, qn), -covered, len(p.hops))

    return sorted(paths, key=key)


def path_facts(kg: KnowledgeGraph, paths: list[list[list[str]]]) -> list[str]:
    """Verbalised distinct facts of the paths, in path order."""
    facts: list[str] = []
    for path in paths:
        for h, r, t in path:
            f = f"{kg.entity_name(h)} {relation_phrase(kg, kg.relation_index[r])} {kg.entity_name(t)}"
            if f not in facts:
                facts.append(f)
    return facts


def link_and_search(row: dict[str, Any], ctx: SynthContext) -> dict[str, Any]:
    """Link question/answer entities, search KI paths, build the teacher request."""
    ex = QAExample.from_dict(row)
    out = dict(row)
    out.update(reject_reason="", reject_detail="", paths=[], path_complete=False, path_methods=[],
               facts=[], teacher_messages="")
    ex, reason = link_example(ex, ctx.linker)
    out["question_entities"], out["answer_entities"] = ex.question_entities, ex.answer_entities
    if reason:
        out["reject_reason"] = reason
        out["reject_detail"] = f"could not link {'answer ' + repr(ex.answer) if reason == 'answer_not_linked' else 'question'}"
        return out
    kg = ctx.kg
    src = [kg.entity_index[e] for e in ex.question_entities]
    dst = [kg.entity_index[e] for e in ex.answer_entities]
    # Randomness derived from (seed, row id): the same row gets the same paths on any worker.
    rng = np.random.default_rng([ctx.seed, int(str(ex.id.encode().hex())[:12] or "0", 16)])
    # Over-sample candidates, then keep the k that fit the question best.
    wide = dataclasses.replace(ctx.params, k=ctx.params.k * ctx.oversample)
    found = rank_paths(kg, sample_paths(ctx.index, kg.triples, src, dst, wide, rng), ex.question)
    found = [p for p in found if p.hops][: ctx.params.k]
    if not found:
        out["reject_reason"] = "no_path"
        out["reject_detail"] = f"no path within {ctx.params.max_hops} hops from {ex.question_entities} to {ex.answer_entities}"
        return out
    named = [path_to_named(p, kg) for p in found]
    for path in named:  # every hop must be a real triple of the KG
        for h, r, t in path:
            if not kg.has_named_triple(h, r, t):
                raise AssertionError(f"path search returned a hop that is not a KG triple: {(h, r, t)}")
    out["paths"] = named
    out["path_complete"] = bool(found[0].complete)
    out["path_methods"] = [p.method for p in found]
    best = [named[0]]
    out["facts"] = path_facts(kg, best if found[0].complete else named)
    out["teacher_messages"] = json.dumps(rationale_request_messages(ex.question, ex.answer, out["facts"], ex.choices))
    return out


def path_entity_names(kg: KnowledgeGraph, paths: list[list[list[str]]]) -> list[str]:
    names: list[str] = []
    for path in paths[:1]:
        for h, _, t in path:
            for e in (h, t):
                n = kg.entity_name(e)
                if n not in names:
                    names.append(n)
    return names


def finish_row(row: dict[str, Any], kg: KnowledgeGraph, teacher: str, fallback_to_template: bool,
               min_path_coverage: float = 0.5) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Parse and verify a teacher generation. Returns (kept_row or None, rejected_record or None).

    With ``fallback_to_template`` a failed teacher rationale is replaced by the template one
    (teacher='template-fallback'), and the failed generation is still returned as a reject
    record so the run summary counts it.
    """
    answers = list(row.get("all_answers") or [row["answer"]])
    choices = list(row.get("choices") or [])
    facts = list(row.get("facts") or [])
    reject = None
    if teacher == "template":
        rationale, source = template_rationale(facts, row["answer"]), "template"
    else:
        gen_err = row.get("gen_error") or ""
        text = clean_generation(row.get("generation"))
        if gen_err:
            ok, reason = False, "generation_failed"
        else:
            ents = path_entity_names(kg, row.get("paths") or [])
            ok, reason = verify_rationale(text, answers, choices, ents, require_grounding=True,
                                          min_path_coverage=min_path_coverage)
        if ok:
            rationale, source = text, teacher
        else:
            reject = _record(row, reason, detail=gen_err or text[:500])
            if not fallback_to_template:
                return None, reject
            rationale, source = template_rationale(facts, row["answer"]), "template-fallback"
    kept = {
        "id": row["id"],
        "question": row["question"],
        "answer": row["answer"],
        "choices": choices,
        "all_answers": answers,
        "question_entities": list(row.get("question_entities") or []),
        "answer_entities": list(row.get("answer_entities") or []),
        "paths": [[list(h) for h in p] for p in (row.get("paths") or [])],
        "path_complete": bool(row.get("path_complete")),
        "rationale": rationale,
        "teacher": source,
        "num_hops": int(row.get("num_hops") or 0),
        "gen_tokens": int(row.get("gen_tokens") or 0),
    }
    return kept, reject


def _record(row: dict[str, Any], reason: str, detail: str = "") -> dict[str, Any]:
    return {
        "id": row.get("id"), "reason": reason, "detail": detail,
        "question": row.get("question"), "answer": row.get("answer"),
        "paths": row.get("paths") or [], "generation": row.get("generation", ""),
    }


def reject_record(row: dict[str, Any]) -> dict[str, Any]:
    return _record(row, row["reject_reason"], row.get("reject_detail", ""))


def qa_row(ex: QAExample) -> dict[str, Any]:
    """A QA example as a flat row for Ray Data (probes travel as JSON text)."""
    d = asdict(ex)
    d.pop("probes", None)
    return d
