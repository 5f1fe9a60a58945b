"""Long-form answers made of facts, and the rows KnowTuning's DPO stage trains on.

* :func:`neighbourhood_qa`: a default set from a KG -- "What do you know about <entity>?"
  answered by a few of the entity's own triples, one sentence each (every fact kept with
  its triple, so a revision can be checked exactly). A stand-in for a teacher-written
  long-form set (issue 3, step 1), good enough to exercise the pipeline on ``builtin:umls``;
* :func:`read_fact_qa_jsonl`: users' files, one ``{"id"?, "question", "facts"}`` per line
  with facts as ``"text"``, ``[text, triple|null]`` or ``{"text", "triple"?}``;
* :func:`build_pairs`: comparison pairs for every question, each question with its own
  ``rng`` derived from ``(seed, index)``;
* :func:`render_pair_rows`: pairs -> ``{id, prompt, chosen, rejected, kind}`` with the
  student's chat template (what :mod:`kale_ray.methods.knowtuning.dpo` collates).

Pure (numpy + the core) except :func:`render_pair_rows`, which needs a tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kale_ray.core.kg import KnowledgeGraph
from kale_ray.core.prompts import render_chat, student_messages
from kale_ray.core.rejects import Rejects
from kale_ray.methods.knowtuning.corrupt import KINDS, EntitySwapper, Fact, as_facts, comparison_pairs, fact_from_triple

LONG_FORM_SYSTEM = (
    "You answer questions about a knowledge graph. State every relevant fact you know, "
    "one short sentence per fact, most important first."
)


def neighbourhood_qa(kg: KnowledgeGraph, num_questions: int, facts_per_answer: int, rng: np.random.Generator,
                     min_facts: int = 2) -> list[dict[str, Any]]:
    """``[{id, question, facts}]`` for up to ``num_questions`` head entities with >= ``min_facts`` triples.

    An answer takes up to ``facts_per_answer`` of the entity's outgoing triples, one per
    relation first (more varied facts), in a random order.
    """
    t = kg.triples
    heads, counts = np.unique(t[:, 0], return_counts=True)
    heads = heads[counts >= max(min_facts, 1)]
    chosen = rng.choice(heads, size=min(num_questions, len(heads)), replace=False) if len(heads) else []
    out = []
    for h in (int(x) for x in chosen):
        own = t[t[:, 0] == h]
        own = own[rng.permutation(len(own))]
        first = [i for i, r in enumerate(own[:, 1]) if r not in set(own[:i, 1])]  # one per relation
        rest = [i for i in range(len(own)) if i not in set(first)]
        picked = own[(first + rest)[:facts_per_answer]]
        facts = [fact_from_triple(kg, kg.entities[a], kg.relations[b], kg.entities[c]) for a, b, c in picked]
        out.append({"id": f"nb-{kg.entities[h]}", "question": f"What do you know about {kg.entity_name(h)}?",
                    "facts": facts})
    return out


def read_fact_qa_jsonl(path: str | Path, rejects: Rejects | None = None) -> list[dict[str, Any]]:
    """A user's long-form QA file; a bad line is counted in ``rejects`` with its reason and line."""
    rejects = rejects if rejects is not None else Rejects()
    out = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            rejects.add("bad_json", file=str(path), line=lineno, message=str(e)[:200])
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not obj["question"].strip():
            rejects.add("missing_question", file=str(path), line=lineno)
            continue
        try:
            facts = as_facts(obj.get("facts") or [])
        except (ValueError, TypeError) as e:
            rejects.add("bad_facts", file=str(path), line=lineno, message=str(e)[:200])
            continue
        if not facts:
            rejects.add("no_facts", file=str(path), line=lineno)
            continue
        out.append({"id": str(obj.get("id", f"line{lineno}")), "question": obj["question"], "facts": facts})
    return out


def build_pairs(qas: Sequence[dict[str, Any]], kg: KnowledgeGraph, seed: int, beta: float = 0.5,
                kinds: Sequence[str] = KINDS, rejects: Rejects | None = None) -> list[dict[str, Any]]:
    """Comparison pairs of every question; question ``i`` draws from ``default_rng([seed, i])``."""
    swapper = EntitySwapper(kg)
    rows = []
    for i, qa in enumerate(qas):
        facts: list[Fact] = as_facts(qa["facts"])
        rows += comparison_pairs(qa["question"], facts, swapper, np.random.default_rng([seed, i]), beta=beta,
                                 kinds=kinds, prompt=qa.get("prompt"), id=str(qa.get("id", i)), rejects=rejects)
    return rows


def long_form_messages(question: str) -> list[dict[str, str]]:
    msgs = student_messages(question)
    msgs[0] = {"role": "system", "content": LONG_FORM_SYSTEM}
    return msgs


def render_pair_rows(pairs: Sequence[dict[str, Any]], tokenizer) -> list[dict[str, Any]]:
    """``{id, prompt, chosen, rejected, kind}``: prompt rendered with the chat template, answers + EOS."""
    eos = tokenizer.eos_token or ""
    out = []
    for i, p in enumerate(pairs):
        prompt = p.get("prompt") or render_chat(long_form_messages(p["question"]), tokenizer)
        out.append({"id": str(p.get("id", i)), "prompt": prompt, "chosen": p["chosen"] + eos,
                    "rejected": p["rejected"] + eos, "kind": p.get("kind", "")})
    return out
