"""KARD's data steps as pure functions: rationale selection, student rows, reranker rows, hit@k.

No Ray, vLLM or torch: the recipe (:mod:`kale_ray.methods.kard.recipe`) runs these between its Ray stages.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

from kale_ray.core.kg import KnowledgeGraph
from kale_ray.core.prompts import template_rationale
from kale_ray.core.qa import QAExample, normalize, relation_phrase
from kale_ray.methods.kard.prompts import student_completion, student_messages
from kale_ray.methods.kard.verify import text_checks, verify_by_scores

TEMPLATE_FALLBACK = "template-fallback"


def chain_rationale(q: QAExample, kg: KnowledgeGraph | None) -> str | None:
    """The exact verbalisation of a generated question's chain ("A is a B. B is a C. So the answer is C.")."""
    if not q.hops or kg is None:
        return None
    facts = []
    for h, r, t in q.hops:
        if h not in kg.entity_index or r not in kg.relation_index or t not in kg.entity_index:
            return None
        facts.append(f"{kg.entity_name(h)} {relation_phrase(kg, kg.relation_index[r])} {kg.entity_name(t)}")
    return template_rationale(facts, q.answer)


def select_rationales(q: QAExample, generations: Sequence[Mapping], fallback: str | None,
                      require_mention: bool = False) -> tuple[list[dict], list[dict]]:
    """Verified rationales of one question, and the rejected ones with their reasons.

    ``generations``: ``{sample, text, error, choice_scores (dict or None), teacher}`` per teacher
    sample; ``choice_scores=None`` with no error means text checks only. When none passes and
    ``fallback`` is given, the fallback is kept with ``teacher='template-fallback'``.
    """
    kept, rejected, seen = [], [], set()
    answers = q.all_answers or [q.answer]
    for g in generations:
        base = {"qid": q.id, "sample": g.get("sample"), "rationale": g.get("text") or "", "teacher": g.get("teacher")}
        if g.get("error"):
            rejected.append(dict(base, reason=g.get("reason") or "generation_failed", detail=str(g["error"])[:300]))
            continue
        ok, reason = text_checks(base["rationale"], answers, q.choices, require_mention)
        if ok and g.get("choice_scores") is not None:
            ok, reason = verify_by_scores(g["choice_scores"], answers)
        if ok:
            key = normalize(base["rationale"])
            if key in seen:
                ok, reason = False, "duplicate_rationale"
            seen.add(key)
        if ok:
            kept.append(base)
        else:
            rejected.append(dict(base, reason=reason, choice_scores=g.get("choice_scores")))
    if not kept and fallback:
        kept.append({"qid": q.id, "sample": -1, "rationale": fallback, "teacher": TEMPLATE_FALLBACK})
    return kept, rejected


def student_row(row_id: str, q: QAExample, rationale: str, knowledge: Sequence[str],
                render: Callable[[list], str], eos: str, teacher: str = "") -> dict:
    """A prompt/completion row for the 'sft' loss (CE on Explanation + Answer given Question [+ Knowledge])."""
    return {"id": row_id, "qid": q.id, "prompt": render(student_messages(q.question, q.choices, knowledge)),
            "completion": student_completion(rationale, q.answer, eos), "teacher": teacher,
            "with_knowledge": bool(knowledge)}


def merge_candidates(*rankings: Sequence[int], limit: int = 0) -> list[int]:
    """Union of passage rankings in order of first appearance (the reranker's candidate set)."""
    out: list[int] = []
    seen: set[int] = set()
    for ranking in rankings:
        for i in ranking:
            i = int(i)
            if i not in seen:
                seen.add(i)
                out.append(i)
    return out[:limit] if limit else out


def best_by_target(candidates: Sequence[int], targets: Sequence[float]) -> int | None:
    """The candidate with the highest target (BM25 vs the rationale); ties: the earlier; None if all 0."""
    if not candidates or max(targets) <= 0:
        return None
    best = max(range(len(candidates)), key=lambda j: (targets[j], -j))
    return int(candidates[best])


def hit_at_k(gold: int, ranking: Sequence[int], k: int) -> bool:
    return int(gold) in [int(x) for x in ranking[:k]]
