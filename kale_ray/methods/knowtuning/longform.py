"""Long-form QA that KnowTuning starts from, each answer with the KG facts it was built from.

* :func:`kg_long_form_qa`: questions about KG subjects (``qa.question_template``, e.g. "Describe the
  clinical features of {name}." on HPO diseases), answered by a sample of the subject's own
  triples of the chosen relations (``has_phenotype``), one sentence per fact; every fact keeps
  its triple, so Stage II can revise it exactly and the evaluation knows what a complete answer holds;
* :func:`read_long_form_jsonl`: users' files, one ``{"id"?, "question", "subject"?, "answer"?,
  "facts"}`` per line (facts as in :func:`kale_ray.methods.knowtuning.corrupt.as_facts`); a bad line is
  rejected with file, line and reason, never silently dropped;
* :func:`split_qa`: a seeded train / held-out split of the questions.

Pure (numpy + the KG core).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kale_ray.core.kg import KnowledgeGraph
from kale_ray.core.qa import EntityLinker
from kale_ray.core.rejects import Rejects
from kale_ray.methods.knowtuning.corrupt import answer_text, as_facts, fact_from_triple, facts_json


def kg_long_form_qa(kg: KnowledgeGraph, num_questions: int, facts_per_answer: int, rng: np.random.Generator,
                    relations: Sequence[str] = (), min_facts: int = 3, max_facts: int = 60,
                    question_template: str = "What do you know about {name}?") -> list[dict[str, Any]]:
    """``[{id, question, subject, facts, answer}]`` for up to ``num_questions`` subjects.

    A subject is a head with ``min_facts..max_facts`` triples of ``relations`` (all when empty);
    its answer holds ``facts_per_answer`` of them drawn at random (kept in the drawn order).
    """
    unknown = [r for r in relations if r not in kg.relation_index]
    if unknown:
        raise ValueError(f"qa.relations: {unknown} not in the KG (relations: {kg.relations[:20]})")
    t = kg.triples
    if relations:
        t = t[np.isin(t[:, 1], [kg.relation_index[r] for r in relations])]
    t = t[np.argsort(t[:, 0], kind="stable")]
    heads, starts, counts = np.unique(t[:, 0], return_index=True, return_counts=True)
    ok = (counts >= min_facts) & (counts <= max_facts)
    heads, starts, counts = heads[ok], starts[ok], counts[ok]
    if not len(heads):
        raise ValueError(f"no KG subject has {min_facts}..{max_facts} triples of relations {list(relations) or 'any'}")
    pick = rng.choice(len(heads), size=min(num_questions, len(heads)), replace=False)
    out = []
    for i in (int(x) for x in pick):
        own = t[starts[i]: starts[i] + counts[i]]
        own = own[rng.choice(len(own), size=min(facts_per_answer, len(own)), replace=False)]
        facts = [fact_from_triple(kg, kg.entities[a], kg.relations[b], kg.entities[c]) for a, b, c in own.tolist()]
        subject = kg.entities[int(heads[i])]
        out.append({"id": f"q-{subject}", "question": question_template.format(name=kg.entity_name(subject)),
                    "subject": subject, "facts": facts_json(facts), "answer": answer_text(facts)})
    return out


def read_long_form_jsonl(path: str | Path, kg: KnowledgeGraph, rejects: Rejects, prefix: str = "") -> list[dict]:
    """A user's long-form QA file -> the records :func:`kg_long_form_qa` makes (bad lines rejected)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"long-form QA file not found: {path}")
    linker: EntityLinker | None = None
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = {"file": str(path), "line": lineno}
        try:
            obj = json.loads(line)
        except ValueError as e:
            rejects.add("bad_json", **where, message=str(e)[:200])
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not obj["question"].strip():
            rejects.add("missing_question", **where)
            continue
        try:
            facts = as_facts(obj.get("facts") or [])
        except (ValueError, TypeError) as e:
            rejects.add("bad_facts", **where, message=str(e)[:200])
            continue
        if not facts:
            rejects.add("no_facts", **where)
            continue
        subject = obj.get("subject")
        if subject is not None and subject not in kg.entity_index:
            rejects.add("subject_not_in_kg", **where, subject=subject)
            continue
        if subject is None:
            heads = [f.triple[0] for f in facts if f.triple is not None and f.triple[0] in kg.entity_index]
            if heads:
                subject = heads[0]
            else:
                linker = linker or EntityLinker(kg)
                found = linker.link_mentions(obj["question"])
                subject = found[0] if found else None
        answer = obj.get("answer") if isinstance(obj.get("answer"), str) and obj["answer"].strip() else answer_text(facts)
        out.append({"id": f"{prefix}{obj.get('id', f'line{lineno}')}", "question": obj["question"].strip(),
                    "subject": subject, "facts": facts_json(facts), "answer": answer})
    return out


def split_qa(qas: Sequence[dict], test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded split of whole questions: no question is in both parts."""
    order = np.random.default_rng([seed, 1]).permutation(len(qas))
    n_test = int(round(test_fraction * len(qas)))
    if test_fraction > 0 and len(qas) >= 2:
        n_test = min(len(qas) - 1, max(1, n_test))
    test = set(order[:n_test].tolist())
    return [q for i, q in enumerate(qas) if i not in test], [q for i, q in enumerate(qas) if i in test]
