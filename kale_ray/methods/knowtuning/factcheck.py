"""Fact-level evaluation of long-form answers against the KG: link, check exactly, count.

An answer to a question about subject ``s`` is split into atomic facts (by the teacher or
:func:`~kale_ray.methods.knowtuning.atomic.split_sentences`). Each fact is checked by
:meth:`FactChecker.check`:

1. **link**: KG entities named in the fact (normalised names and aliases, longest n-gram
   first, names shorter than ``min_surface_chars`` skipped); the subject itself is not a claim;
2. **claims**: each other linked entity ``e`` claims a triple between ``s`` and ``e``; with
   ``match_relation`` and a relation phrase in the fact (``has phenotype``), only that relation counts;
3. **verdict**: ``correct`` when every claim is a KG triple (either direction), ``incorrect``
   when one is not, ``unverifiable`` when nothing but the subject links (counted apart, never
   as right or wrong).

Per answer (:func:`answer_metrics`): correct / incorrect / unverifiable facts and
**completeness**, the share of the answer's reference triples that a correct fact states.
Over answers (:func:`aggregate`): mean correct facts per answer, share correct and factual
error rate over the *verifiable* facts, unverifiable share, mean completeness.

Exact by construction: "Seizure" for a disease annotated only with "Focal seizure" is
incorrect (no reasoning over ``is_a``). Pure (numpy + the KG core).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np

from kale_ray.core.kg import KnowledgeGraph
from kale_ray.core.qa import normalize

CORRECT, INCORRECT, UNVERIFIABLE = "correct", "incorrect", "unverifiable"


@dataclasses.dataclass
class FactCheck:
    text: str
    status: str  # correct | incorrect | unverifiable
    linked: list[str]  # entity ids named (the subject excluded)
    claims: list[dict[str, Any]]  # [{"entity", "relations": [in the KG], "holds": bool}]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class FactChecker:
    """Checks facts about a subject entity against one KG (build it once: it indexes every name)."""

    def __init__(self, kg: KnowledgeGraph, min_surface_chars: int = 4, match_relation: bool = False,
                 skip_entities: Iterable[str] = ("HP:0000001", "HP:0000118", "HP:0000005")):
        self.kg = kg
        self.match_relation = match_relation
        skip = set(skip_entities)
        self.surface: dict[str, set[int]] = {}
        for i, eid in enumerate(kg.entities):
            if eid in skip:
                continue
            for form in {kg.entity_name(eid), *kg.aliases.get(eid, [])}:
                key = normalize(form)
                if len(key) >= min_surface_chars:
                    self.surface.setdefault(key, set()).add(i)
        self.max_len = max((len(k.split()) for k in self.surface), default=1)
        self.relation_phrases = {normalize(r): ri for ri, r in enumerate(kg.relations) if len(normalize(r)) >= 4}
    def link(self, text: str) -> list[int]:
        """Entity indices named in ``text``: greedy longest n-gram match, each span used once."""
        tokens = normalize(text).split()
        found: list[int] = []
        i = 0
        while i < len(tokens):
            for n in range(min(self.max_len, len(tokens) - i), 0, -1):
                ents = self.surface.get(" ".join(tokens[i: i + n]))
                if ents:
                    found += [e for e in sorted(ents) if e not in found]
                    i += n
                    break
            else:
                i += 1
        return found

    def relations_between(self, a: int, b: int) -> set[int]:
        """Relation ids of the KG triples between entities ``a`` and ``b``, either direction."""
        ts = self.kg.triple_set
        return {r for r in range(self.kg.num_relations) if (a, r, b) in ts or (b, r, a) in ts}

    def relations_named(self, text: str) -> set[int]:
        norm = f" {normalize(text)} "
        return {ri for phrase, ri in self.relation_phrases.items() if f" {phrase} " in norm}

    def check(self, text: str, subject: str) -> FactCheck:
        kg = self.kg
        s = kg.entity_index.get(subject)
        if s is None:
            raise KeyError(f"subject {subject!r} is not a KG entity")
        same_name = self.surface.get(normalize(kg.entity_name(subject)), set())
        linked = [e for e in self.link(text) if e != s and e not in same_name]
        rels = self.relations_named(text) if self.match_relation else set()
        claims = []
        for e in linked:
            known = self.relations_between(s, e)
            holds = bool(known & rels) if rels else bool(known)
            claims.append({"entity": kg.entities[e], "relations": sorted(kg.relations[r] for r in known),
                           "holds": holds})
        if not claims:
            status = UNVERIFIABLE
        else:
            status = CORRECT if all(c["holds"] for c in claims) else INCORRECT
        return FactCheck(text, status, [kg.entities[e] for e in linked], claims)


def answer_metrics(checks: Sequence[FactCheck], reference: Sequence[Sequence[str]], subject: str) -> dict[str, Any]:
    """Counts of one answer, and completeness over its reference triples ``[[h, r, t], ...]``.

    A reference triple is covered when a *correct* fact names its other entity (the one that is
    not ``subject``).
    """
    named_right = {e for c in checks if c.status == CORRECT for e in c.linked}
    others = [t if h == subject else h for h, _, t in (tuple(x) for x in reference)]
    covered = sum(1 for e in others if e in named_right)
    n = {k: sum(1 for c in checks if c.status == k) for k in (CORRECT, INCORRECT, UNVERIFIABLE)}
    return {"facts": len(checks), **n, "reference": len(others), "covered": covered,
            "completeness": covered / len(others) if others else float("nan")}


def aggregate(per_answer: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals over answers (each as :func:`answer_metrics` returns, optionally with ``rejected``)."""
    n = len(per_answer)
    tot = {k: int(sum(a[k] for a in per_answer)) for k in ("facts", CORRECT, INCORRECT, UNVERIFIABLE,
                                                           "reference", "covered")}
    verifiable = tot[CORRECT] + tot[INCORRECT]
    comp = [a["completeness"] for a in per_answer if np.isfinite(a["completeness"])]
    return {
        "answers": n,
        **{f"total_{k}": v for k, v in tot.items()},
        "facts_per_answer": tot["facts"] / n if n else float("nan"),
        "correct_facts_per_answer": tot[CORRECT] / n if n else float("nan"),
        "share_correct": tot[CORRECT] / verifiable if verifiable else float("nan"),
        "factual_error_rate": tot[INCORRECT] / verifiable if verifiable else float("nan"),
        "unverifiable_share": tot[UNVERIFIABLE] / tot["facts"] if tot["facts"] else float("nan"),
        "completeness": float(np.mean(comp)) if comp else float("nan"),
        "completeness_micro": tot["covered"] / tot["reference"] if tot["reference"] else float("nan"),
    }
