"""KnowTuning's knowledge comparison: worse answers made by disturbing the better answer's atomic facts.

An answer is a list of atomic facts, each a :class:`Fact` ``(text, triple)``: the sentence
as it appears in the answer and, when it comes from (or was linked to) the KG, the triple
``(head id, relation id, tail id)`` it states. Three disturbances, one per quality that
KnowTuning compares (Lyu et al. 2024, Stage II):

* **completeness** -- :func:`delete_facts`: drop ``beta`` (default 0.5) of the facts, at
  least one, never all;
* **factuality** -- :func:`revise_facts`: replace the tail (or the head) of ``beta`` of the
  facts' triples by another entity of the same relation's range (domain) so that the new
  triple is *not* a KG triple: an exact, checkable wrong fact (the paper asks an LLM to do it).
  Facts with no triple, or whose relation has no wrong entity to offer (on UMLS, 1081 of the
  6529 triples: e.g. ``issue_in`` has two tails and most heads have both), are returned marked
  ``unrevised`` with the reason, for an LLM reviser;
* **logicality** -- :func:`shuffle_facts`: the same facts in another order.

:func:`comparison_pairs` turns one question and its better answer into the
``{chosen, rejected, kind}`` rows that DPO trains on (:mod:`kale_ray.methods.knowtuning.dpo`).
Every function takes the ``rng`` (a ``numpy.random.Generator``) it draws from: same seed,
same pairs. A disturbance that cannot be made is skipped with a reason, never silently.

Pure: numpy and the KG core only (no torch, Ray or vLLM).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from kale_ray.core.kg import KnowledgeGraph
from kale_ray.core.qa import relation_phrase
from kale_ray.core.rejects import Rejects

Triple = tuple[str, str, str]  # (head id, relation id, tail id), as in the KG files
KINDS = ("delete", "revise", "shuffle")

# Why a disturbance or a revision was not made (keys of the pair builder's rejects).
TOO_FEW_FACTS = "too_few_facts"  # delete / shuffle need at least two facts
IDENTICAL_FACTS = "identical_facts"  # shuffle of facts that all read the same
NO_REVISABLE_FACT = "no_revisable_fact"  # revise: no fact could be made wrong with the KG
NO_TRIPLE = "no_triple"  # a fact without a triple: left for an LLM reviser
RELATION_NOT_IN_KG = "relation_not_in_kg"
NO_WRONG_ENTITY = "no_wrong_entity"  # every entity of the relation's range/domain makes a true triple


class Fact(NamedTuple):
    """One atomic fact: its sentence and, if known, the KG triple it states."""

    text: str
    triple: Triple | None = None


@dataclasses.dataclass
class Disturbed:
    """A worse answer: its facts and what was done to the better one.

    ``changes`` (JSON-ready):

    * delete: ``[{"index", "text"}]``, the removed facts (indices into the better answer);
    * revise: ``[{"index", "side", "old_entity", "new_entity", "old_triple", "new_triple",
      "old_text", "new_text", "text_edit"}]`` (``text_edit``: ``"replaced"`` when the entity's
      name was swapped inside the sentence, ``"reverbalized"`` when the sentence was rebuilt
      from the new triple);
    * shuffle: ``[{"order": [...]}]``, the better answer's indices in their new order.

    ``unrevised`` (revise only): ``[{"index", "reason"}]`` for every fact the KG could not
    make wrong (:data:`NO_TRIPLE`, :data:`RELATION_NOT_IN_KG`, :data:`NO_WRONG_ENTITY`).
    """

    kind: str
    facts: list[Fact]
    changes: list[dict[str, Any]]
    unrevised: list[dict[str, Any]] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------- facts and text


def relation_words(kg: KnowledgeGraph, r: str) -> str:
    """The verb phrase of a relation: ``isa`` -> "is a", ``process_of`` -> "is process of", ``interacts_with`` ->
    "interacts with" (no "is" before a verb in the third person)."""
    phrase = relation_phrase(kg, kg.relation_index[r])
    words = phrase.split()
    if len(words) > 1 and words[0] == "is" and words[1].endswith("s") and not words[1].endswith("ss"):
        return " ".join(words[1:])
    return phrase


def fact_from_triple(kg: KnowledgeGraph, h: str, r: str, t: str) -> Fact:
    """``("Alga is a plant.", (h, r, t))`` from entity/relation ids."""
    words = f"{kg.entity_name(h)} {relation_words(kg, r)} {kg.entity_name(t)}"
    return Fact(words[:1].upper() + words[1:] + ".", (h, r, t))


def as_facts(items: Iterable[Any]) -> list[Fact]:
    """Facts from what a JSON file holds: ``"text"``, ``[text, triple|null]`` or ``{"text", "triple"?}``."""
    out = []
    for item in items:
        if isinstance(item, Fact):
            out.append(item)
            continue
        if isinstance(item, str):
            text, triple = item, None
        elif isinstance(item, dict):
            text, triple = item.get("text"), item.get("triple")
        else:
            seq = list(item)
            text, triple = (seq[0], seq[1] if len(seq) > 1 else None)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a fact needs a non-empty text, got {item!r}")
        if triple is not None:
            triple = tuple(str(x) for x in triple)
            if len(triple) != 3:
                raise ValueError(f"a fact's triple needs 3 parts (head, relation, tail), got {item!r}")
        out.append(Fact(text.strip(), triple))
    return out


def answer_text(facts: Sequence[Fact]) -> str:
    """The answer the facts make: their sentences, in order, separated by spaces."""
    return " ".join(f.text.strip() for f in facts)


def facts_json(facts: Sequence[Fact]) -> list[dict[str, Any]]:
    return [{"text": f.text, "triple": None if f.triple is None else list(f.triple)} for f in facts]


def _share(beta: float, n: int) -> int:
    """``round(beta * n)`` half up, at least 1 and at most ``n - 1`` (for n >= 2)."""
    return min(n - 1, max(1, math.floor(beta * n + 0.5)))


def _check_beta(beta: float) -> None:
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}")


# --------------------------------------------------------------------------- completeness


def delete_facts(facts: Sequence[Fact], rng: np.random.Generator, beta: float = 0.5) -> Disturbed:
    """Drop ``round(beta * n)`` facts (at least one, never all); the rest keep their order.

    Needs at least two facts (one fact has nothing to keep), else ``ValueError``.
    """
    _check_beta(beta)
    n = len(facts)
    if n < 2:
        raise ValueError(f"{TOO_FEW_FACTS}: deleting needs at least 2 facts, got {n}")
    drop = set(int(i) for i in rng.choice(n, size=_share(beta, n), replace=False))
    kept = [f for i, f in enumerate(facts) if i not in drop]
    changes = [{"index": i, "text": facts[i].text} for i in sorted(drop)]
    return Disturbed("delete", kept, changes)


# --------------------------------------------------------------------------- factuality


class EntitySwapper:
    """Per relation of a KG, its range (tails) and domain (heads): where wrong entities come from.

    Build it once per KG and pass it to :func:`revise_facts` / :func:`comparison_pairs` in
    place of the KG when making many pairs (it costs one sort of the triples).
    """

    def __init__(self, kg: KnowledgeGraph):
        self.kg = kg
        t = kg.triples
        order = np.argsort(t[:, 1], kind="stable")
        t = t[order]
        bounds = np.flatnonzero(np.diff(t[:, 1])) + 1
        self.range: dict[int, np.ndarray] = {}
        self.domain: dict[int, np.ndarray] = {}
        for chunk in np.split(t, bounds):
            if len(chunk):
                r = int(chunk[0, 1])
                self.range[r] = np.unique(chunk[:, 2])  # sorted: a draw depends on rng only
                self.domain[r] = np.unique(chunk[:, 0])

    def wrong_entities(self, triple: Triple, side: str) -> list[str]:
        """Entity ids of ``r``'s range (``side="tail"``) or domain (``"head"``) whose swap gives no KG triple.

        Neither end of the triple is a candidate (no "X is result of X").
        """
        kg = self.kg
        h, r, t = triple
        ri = kg.relation_index[r]
        if side == "tail":
            return [kg.entities[e] for e in self.range.get(ri, ()) if kg.entities[e] not in (h, t)
                    and not kg.has_named_triple(h, r, kg.entities[e])]
        return [kg.entities[e] for e in self.domain.get(ri, ()) if kg.entities[e] not in (h, t)
                and not kg.has_named_triple(kg.entities[e], r, t)]


def _swap_name(text: str, old: str, new: str, last: bool) -> str | None:
    """``text`` with the first (``last=False``) or last occurrence of ``old`` replaced, case-insensitively."""
    hits = [m for m in re.finditer(re.escape(old), text, flags=re.IGNORECASE)]
    if not hits:
        return None
    m = hits[-1] if last else hits[0]
    if m.start() == 0:
        new = new[:1].upper() + new[1:]
    return text[: m.start()] + new + text[m.end():]


def _revise_one(fact: Fact, swapper: EntitySwapper, rng: np.random.Generator) -> tuple[Fact, dict] | str:
    """A wrong version of ``fact`` and its record, or the reason it cannot be made."""
    kg = swapper.kg
    if fact.triple is None:
        return NO_TRIPLE
    h, r, t = fact.triple
    if r not in kg.relation_index:
        return RELATION_NOT_IN_KG
    # The tail first: the fact stays about the same subject (the question's entity, usually).
    for side in ("tail", "head"):
        pool = swapper.wrong_entities(fact.triple, side)
        if not pool:
            continue
        new = pool[int(rng.integers(len(pool)))]
        old = t if side == "tail" else h
        new_triple = (h, r, new) if side == "tail" else (new, r, t)
        text = _swap_name(fact.text, kg.entity_name(old), kg.entity_name(new), last=side == "tail")
        edit = "replaced"
        if text is None:
            text, edit = fact_from_triple(kg, *new_triple).text, "reverbalized"
        record = {"side": side, "old_entity": old, "new_entity": new, "old_triple": list(fact.triple),
                  "new_triple": list(new_triple), "old_text": fact.text, "new_text": text, "text_edit": edit}
        return Fact(text, new_triple), record
    return NO_WRONG_ENTITY


def revise_facts(facts: Sequence[Fact], kg: KnowledgeGraph | EntitySwapper, rng: np.random.Generator,
                 beta: float = 0.5) -> Disturbed:
    """Make ``round(beta * n)`` facts wrong (at least one when any can be), in place, order kept.

    A fact is made wrong by swapping its triple's tail (the head when no tail will do) for an
    entity of the relation's range (domain) such that the new triple is not in the KG; the
    sentence gets the new entity's name in place of the old one (or is rebuilt from the new
    triple when the old name is not in it). The facts to revise are drawn at random. Facts the KG cannot revise are listed in ``unrevised`` with a reason;
    when none could be revised ``changes`` is empty and the facts are unchanged.
    """
    _check_beta(beta)
    swapper = kg if isinstance(kg, EntitySwapper) else EntitySwapper(kg)
    n = len(facts)
    want = max(1, math.floor(beta * n + 0.5)) if n else 0
    out = list(facts)
    changes: list[dict] = []
    unrevised: list[dict] = []
    for i in (int(x) for x in rng.permutation(n)):
        if facts[i].triple is None:
            unrevised.append({"index": i, "reason": NO_TRIPLE})  # always reported: an LLM may revise it
            continue
        if len(changes) == want:
            continue  # enough revised; this one was not tried
        got = _revise_one(facts[i], swapper, rng)
        if isinstance(got, str):
            unrevised.append({"index": i, "reason": got})
            continue
        out[i], record = got
        changes.append({"index": i, **record})
    changes.sort(key=lambda c: c["index"])
    unrevised.sort(key=lambda u: u["index"])
    return Disturbed("revise", out, changes, unrevised)


# --------------------------------------------------------------------------- logicality


def shuffle_facts(facts: Sequence[Fact], rng: np.random.Generator) -> Disturbed:
    """The same facts in another order (the sentences' order differs from the original).

    Needs at least two facts that read differently, else ``ValueError``.
    """
    n = len(facts)
    if n < 2:
        raise ValueError(f"{TOO_FEW_FACTS}: shuffling needs at least 2 facts, got {n}")
    texts = [f.text for f in facts]
    if len(set(texts)) < 2:
        raise ValueError(f"{IDENTICAL_FACTS}: every fact reads the same")
    while True:  # rejection sampling: a uniform order among those that read differently
        order = [int(i) for i in rng.permutation(n)]
        if [texts[i] for i in order] != texts:
            return Disturbed("shuffle", [facts[i] for i in order], [{"order": order}])


# --------------------------------------------------------------------------- pairs


def comparison_pairs(question: str, better_answer_facts: Sequence[Fact], kg: KnowledgeGraph | EntitySwapper,
                     rng: np.random.Generator, *, beta: float = 0.5, kinds: Sequence[str] = KINDS,
                     prompt: str | None = None, id: str | None = None,
                     rejects: Rejects | None = None) -> list[dict[str, Any]]:
    """One ``{chosen, rejected, kind}`` row per disturbance of the better answer (delete, revise, shuffle).

    Row: ``id`` (``"<id>:<kind>"`` when ``id`` is given), ``question``, ``prompt`` (when given:
    an already rendered model input), ``chosen`` / ``rejected`` (answer texts), ``kind``,
    ``chosen_facts`` / ``rejected_facts`` (``[{text, triple}]``), ``changes`` and, for
    ``revise``, ``unrevised`` (facts left for an LLM reviser). ``beta`` is the share deleted
    and the share revised. A kind that cannot be made is skipped and, with ``rejects``,
    counted with its reason (and the question's id).
    """
    facts = as_facts(better_answer_facts)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; expected some of {KINDS}")
    if "revise" in kinds and not isinstance(kg, EntitySwapper):
        kg = EntitySwapper(kg)
    chosen = answer_text(facts)
    rows = []
    for kind in kinds:
        try:
            if kind == "delete":
                worse = delete_facts(facts, rng, beta)
            elif kind == "shuffle":
                worse = shuffle_facts(facts, rng)
            else:
                worse = revise_facts(facts, kg, rng, beta)
        except ValueError as e:  # too few / identical facts: the message starts with the reason
            if rejects is not None:
                rejects.add(str(e).split(":", 1)[0], id=id, kind=kind, num_facts=len(facts))
            continue
        if kind == "revise" and not worse.changes:
            if rejects is not None:
                rejects.add(NO_REVISABLE_FACT, id=id, kind=kind, num_facts=len(facts), unrevised=worse.unrevised)
            continue
        row: dict[str, Any] = {"question": question}
        if id is not None:
            row = {"id": f"{id}:{kind}", **row}
        if prompt is not None:
            row["prompt"] = prompt
        row.update(chosen=chosen, rejected=answer_text(worse.facts), kind=kind, chosen_facts=facts_json(facts),
                   rejected_facts=facts_json(worse.facts), changes=worse.changes)
        if kind == "revise":
            row["unrevised"] = worse.unrevised
        rows.append(row)
    return rows
