"""Row-level synthesis steps: pure functions over dict rows (no Ray), run inside Ray Data.

``link_and_search`` -> (teacher) -> ``finish_row``. Each step returns the row with either
its outputs filled or ``reject_reason`` set; nothing is dropped here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import unicodedata
from typing import Any

import numpy as np

from kale_ray.config import PathConfig
from kale_ray.core.kg import GraphIndex, KnowledgeGraph
from kale_ray.core.parse import clean_generation, verify_rationale
from kale_ray.core.search import KGPath, PathSearchParams, path_to_named, sample_paths
from kale_ray.core.prompts import rationale_request_messages, template_rationale
from kale_ray.core.qa import EntityLinker, QAExample, link_example, normalize, relation_phrase


def path_params(cfg: PathConfig) -> PathSearchParams:
    return PathSearchParams(
        max_hops=cfg.max_hops, k=cfg.k, num_anchors=cfg.num_anchors, anchor_hops=cfg.anchor_hops,
        bfs_fallback=cfg.bfs_fallback, partial_paths=cfg.partial_paths, max_expansions=cfg.max_expansions,
        heuristic=cfg.heuristic, landmarks=cfg.landmarks, fill_after_chain=cfg.fill_after_chain,
    )


_FUNCTION_WORDS = frozenset("a an the is are was be has have had of in to with by for on at as from into".split())
_NONWORD = re.compile(r"[^\w\s]")


def _tokens(text: str) -> list[str]:
    """``normalize`` without dropping articles: lowercase, accents/punctuation stripped, ``_``/``-`` as spaces."""
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(c for c in text if not unicodedata.combining(c))
    return _NONWORD.sub(" ", text.lower().replace("_", " ").replace("-", " ")).split()


class RelationWords:
    """Which KG relations a question mentions: an index of the relations' phrases, built once per KG.

    A relation's forms are its ``relation_phrase`` and its name (``relation_name``), as tokens
    (``_tokens``: like ``normalize`` but articles kept, so "is a" stays two words), each also
    without a leading "is"/"has"; a form that is one function word ("is", "of", ...) is
    dropped. A relation is mentioned when one of its forms occurs as a contiguous token run of
    the question and that run is not strictly inside a longer mention (so "is part of" does not
    also count as a mention of a relation named "part"). Only ``kg.relations`` and the two text
    helpers are used, so a duck-typed columnar KG works too.
    """

    def __init__(self, kg) -> None:
        self.num_relations = len(kg.relations)
        self.by_first: dict[str, list[tuple[int, tuple[str, ...]]]] = {}
        for r in range(self.num_relations):
            forms = set()
            for text in (relation_phrase(kg, r), kg.relation_name(r)):
                toks = tuple(_tokens(text))
                forms.add(toks)
                if len(toks) > 1 and toks[0] in ("is", "has"):
                    forms.add(toks[1:])
            for toks in forms:
                if toks and not (len(toks) == 1 and toks[0] in _FUNCTION_WORDS):
                    self.by_first.setdefault(toks[0], []).append((r, toks))

    def chain(self, question: str) -> list[set[int]]:
        """The relation mentions of the question in text order: one set of relation ids per
        mention (several only when relations share a phrase); repeats kept."""
        toks = _tokens(question)
        spans: list[tuple[int, int, int]] = []  # (start, end, relation)
        for i, tok in enumerate(toks):
            for r, form in self.by_first.get(tok, ()):
                j = i + len(form)
                if tuple(toks[i:j]) == form:
                    spans.append((i, j, r))
        groups: dict[tuple[int, int], set[int]] = {}
        for a, b, r in spans:
            if any(a2 <= a and b <= b2 and (b2 - a2) > (b - a) for a2, b2, _ in spans):
                continue  # inside a longer mention (another relation's, or a longer form of this one)
            groups.setdefault((a, b), set()).add(r)
        return [groups[key] for key in sorted(groups)]

    def mentions(self, question: str) -> dict[int, int]:
        """relation id -> index of its first mention in ``chain`` (text order)."""
        out: dict[int, int] = {}
        for i, rs in enumerate(self.chain(question)):
            for r in rs:
                out.setdefault(r, i)
        return out

    def weights(self, chain: list[set[int]], max_hops: int | None = None) -> np.ndarray | None:
        """Relation weights for ``find_paths``: 2-D (hop x relation, the mentioned chain) when the
        chain has 1..``max_hops`` mentions, else 1-D over the mentioned relations; None if none."""
        if not chain:
            return None
        if max_hops is not None and len(chain) <= max_hops:
            w = np.zeros((len(chain), self.num_relations), dtype=np.float64)
            for i, rs in enumerate(chain):
                w[i, list(rs)] = 1.0
            return w
        w = np.zeros(self.num_relations, dtype=np.float64)
        w[sorted(set().union(*chain))] = 1.0
        return w


class SynthContext:
    """What every path-search worker needs, built once per worker from the shared KG.

    ``linker``: a prebuilt ``EntityLinker`` (default: ``EntityLinker(kg)``). With
    ``cfg.follow_question_relations`` the question's relations steer the path search
    (``relation_words``, built here once per KG).
    """

    def __init__(self, kg: KnowledgeGraph, index: GraphIndex, cfg: PathConfig,
                 linker: EntityLinker | None = None) -> None:
        self.kg = kg
        self.index = index
        self.params = path_params(cfg)
        self.seed = cfg.seed
        self.oversample = max(1, cfg.oversample)
        self.wide_params = dataclasses.replace(self.params, k=self.params.k * self.oversample)
        self.linker = linker if linker is not None else EntityLinker(kg)
        self.follow_question_relations = bool(getattr(cfg, "follow_question_relations", False))
        self.relation_words = RelationWords(kg)
        # a plain ndarray view (an np.memmap subclass costs per slice in the search loops)
        self.triples = np.asarray(kg.triples)
        self._has_triple = getattr(kg, "has_triple", None)


def row_seed(seed: int, row_id: str) -> list[int]:
    """Seed words for a row's rng: the config seed and a 64-bit hash of the whole row id."""
    digest = hashlib.blake2b(str(row_id).encode("utf-8"), digest_size=8).digest()
    return [int(seed), int.from_bytes(digest, "little")]


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


def rank_paths(kg: KnowledgeGraph, paths: list[KGPath], question: str,
               mentioned: dict[int, int] | None = None, chain: list[set[int]] | None = None) -> list[KGPath]:
    """Complete paths first, then those closest to the question's relations, then shorter.

    With ``mentioned`` (relation id -> index of its first mention, ``RelationWords.mentions``)
    and ``chain`` (``RelationWords.chain``): complete paths first, then paths that follow the
    question's relation chain hop by hop (read forward as stored before backward), then the
    share of hops using a mentioned relation, the number of distinct mentioned relations used,
    hops in mention order, then shorter. Without them, the relation-word test of
    ``relation_relevance``.
    """
    if mentioned is None:
        qn = normalize(question)

        def key(p: KGPath):
            covered = len({r for _, r, _ in p.hops if _mentioned(kg, r, qn)})
            return (not p.complete, -relation_relevance(kg, p, qn), -covered, len(p.hops))

        return sorted(paths, key=key)

    def key2(p: KGPath):
        if not p.hops:
            return (not p.complete, 0.0, 0, 0, 0)
        rels = [r for _, r, _ in p.hops]
        share = sum(r in mentioned for r in rels) / len(rels)
        covered = len({r for r in rels if r in mentioned})
        return (not p.complete, -_follows_chain(p, chain or []), -share, -covered, -_in_order(p, mentioned),
                len(p.hops))

    return sorted(paths, key=key2)


def _follows_chain(p: KGPath, chain: list[set[int]]) -> int:
    """2: hop ``i`` uses a relation of ``chain[i]`` for every hop, all read forward; 1: the same
    relations, some hop walked backwards; 0: not the chain."""
    if not chain or len(p.hops) != len(chain) or any(r not in rs for (_, r, _), rs in zip(p.hops, chain)):
        return 0
    forward = all(p.nodes[i] == h and p.nodes[i + 1] == t for i, (h, _, t) in enumerate(p.hops))
    return 2 if forward else 1


def _in_order(p: KGPath, mentioned: dict[int, int]) -> int:
    """2: every hop is a mentioned relation, read forward, in mention order; 1: mention order
    only; 0: neither."""
    pos = [mentioned.get(r) for _, r, _ in p.hops]
    if any(x is None for x in pos) or pos != sorted(pos):
        return 0
    forward = all(p.nodes[i] == h and p.nodes[i + 1] == t for i, (h, _, t) in enumerate(p.hops))
    return 2 if forward else 1


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
               facts=[], teacher_messages="", path_mode="", path_follows_question=False)
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
    rng = np.random.default_rng(row_seed(ctx.seed, ex.id))
    # Over-sample candidates, then keep the k that fit the question best.
    wide = ctx.wide_params
    chain = ctx.relation_words.chain(ex.question)
    mentioned: dict[int, int] = {}
    for i, rs in enumerate(chain):
        for r in rs:
            mentioned.setdefault(r, i)
    weights = ctx.relation_words.weights(chain, ctx.params.max_hops) if ctx.follow_question_relations else None
    cand = sample_paths(ctx.index, ctx.triples, src, dst, wide, rng, relation_weights=weights)
    found = rank_paths(kg, cand, ex.question, *((mentioned, chain) if ctx.follow_question_relations else ()))
    found = [p for p in found if p.hops][: ctx.params.k]
    if not found:
        out["reject_reason"] = "no_path"
        out["reject_detail"] = f"no path within {ctx.params.max_hops} hops from {ex.question_entities} to {ex.answer_entities}"
        return out
    named = [path_to_named(p, kg) for p in found]
    for p, path in zip(found, named):  # every hop must be a real triple of the KG (id lookups, no re-hashing)
        for (hi, ri, ti), (h, r, t) in zip(p.hops, path):
            ok = ctx._has_triple(hi, ri, ti) if ctx._has_triple is not None else kg.has_named_triple(h, r, t)
            if not ok:
                raise AssertionError(f"path search returned a hop that is not a KG triple: {(h, r, t)}")
    out["paths"] = named
    out["path_complete"] = bool(found[0].complete)
    out["path_methods"] = [p.method for p in found]
    # "relation": the first path came from the relation-following search; else the search mode
    out["path_mode"] = "relation" if found[0].method == "relation" else (
        found[0].method if found[0].method in ("partial", "bfs") else ctx.params.heuristic)
    out["path_follows_question"] = any(r in mentioned for _, r, _ in found[0].hops)
    best = [named[0]]
    out["facts"] = path_facts(kg, best if found[0].complete else named)
    out["teacher_messages"] = json.dumps(rationale_request_messages(ex.question, ex.answer, out["facts"], ex.choices))
    return out


def answer_linked(ex: QAExample, linker: EntityLinker) -> bool:
    """Whether a question's answer links to the KG as ``link_example`` links it (a given answer entity
    that exists, or an answer text that names an entity). A test row that does not is kept, marked."""
    kg = linker.kg
    if any(e in kg.entity_index for e in ex.answer_entities):
        return True
    return any(linker.link_exact(a) for a in (ex.all_answers or [ex.answer]))


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
        "path_mode": str(row.get("path_mode") or ""),
        "path_follows_question": bool(row.get("path_follows_question")),
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


def duplicate_id_record(row: dict[str, Any], file: str, line: int, first_line: int) -> dict[str, Any]:
    """The reject of a QA row whose id an earlier line already carries: file, line and that first line."""
    rec = _record(row, "duplicate_id", f"{file}:{line}: id {str(row.get('id'))!r} already used on line {first_line}")
    rec.update(file=file, line=int(line), first_line=int(first_line))
    return rec


def teacher_failure_reason(reject: dict[str, Any]) -> str:
    """What a failed teacher row counts under in the run's failure tally: the reject's reason, and for a
    failed generation the kind of error (``generation_failed (http_500)``, ``... (http_connection_error)``)."""
    reason = str(reject.get("reason") or "unknown")
    if reason == "generation_failed":
        kind = str(reject.get("detail") or "").split(":", 1)[0].strip()
        if kind and len(kind) <= 40 and " " not in kind:
            reason += f" ({kind})"
    return reason


def qa_row(ex: QAExample) -> dict[str, Any]:
    """A QA example as a flat row for Ray Data (probes travel as JSON text)."""
    # A shallow copy (asdict's recursive deep copy was ~7% of a question's search time at 1M entities).
    d = {k: getattr(ex, k) for k in ex.__dataclass_fields__ if k != "probes"}
    for k, v in d.items():
        if isinstance(v, list):
            d[k] = [list(x) if isinstance(x, list) else x for x in v]
    return d
