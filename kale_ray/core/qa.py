"""Questions: templated multi-hop QA generated from a KG, users' QA files, and entity linking.

Generated questions follow a relation chain from a start entity::

    Which concept X satisfies: alga is a A, and A is a X?

The gold answer set is every entity the chain reaches from the start (so a question is
scored right for any of them); a question is kept only if that set is small
(``max_answers``). The split holds out *questions*, not facts: test questions are
multi-hop, and every hop fact of every question (train and test) is also asked as a
1-hop training question, so a test failure is a failure to compose known facts (the
"known & incorrect" case KALE targets). Each multi-hop question carries its hop probes.

Distractors (``distractors=``, the config's ``qa.distractors``), by tier, narrowest first:
``reachable`` (in the range of the question's last relation, i.e. a tail of it somewhere in the
KG, and reached from the start entity by another relation chain of the same length: neither the
type nor "is it connected" tells the answer), ``range`` (in that range), ``tail`` (a tail of
another relation), ``any`` (any entity).

- ``"range"`` (the default, as before): uniform from the range, else from all entities
  (tiers ``range`` / ``any``).
- ``"reachable"``: uniform within each tier, in the order above; a tier too small is filled up
  from the next.
- ``"matched"``: the range's entities in proportion to how often each is the gold answer of such a
  question (estimated by a separate run of the same random walks), each draw swapped for a
  reachable entity of the same frequency class where there is one; then tails of other relations
  by their frequency, then any entity. A guess from the choices' frequencies alone is then much
  closer to chance (``benchmarks/bench_question_blind.py`` measures it).

``max_distractor_tier`` drops questions whose distractors would need a wider tier (``"range"``:
every distractor has the answer's type); ``max_answer_share`` caps how often one entity is the gold
answer among questions of one hop count and last relation (a relation whose questions all have
the same answer gives it away whatever the distractors).

Every multiple-choice example records the widest tier its distractors came from in
``distractor_tier`` (never a silent fallback). No distractor is a correct answer, by entity or by
name/alias. ``question_format="open"`` asks the same questions without choices; ``all_answers`` then
holds the names and aliases of every correct answer (scored by normalised exact match). A
question's hop probes use the question's format and distractor policy, so "known" is measured on
equal terms.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from kale_ray.core.kg import MAX_LINE_BYTES, KnowledgeGraph
from kale_ray.core.rejects import Rejects

VARS = ["A", "B", "C", "D", "E"]
DISTRACTOR_POLICIES = ("range", "reachable", "matched")
QUESTION_FORMATS = ("mc", "open")
TIERS = ("reachable", "range", "tail", "any")  # distractor tiers, narrowest first
REACH_CAP = 200_000  # largest frontier enumerated for the "reachable" tier
_BOM = b"\xef\xbb\xbf"


class QAFormatError(ValueError):
    """A QA file has a bad row; the message names file and line."""


@dataclass
class QAExample:
    id: str
    question: str
    answer: str  # gold answer text (display name)
    choices: list[str] = field(default_factory=list)  # empty = open question
    all_answers: list[str] = field(default_factory=list)  # every accepted answer text
    question_entities: list[str] = field(default_factory=list)  # KG entity ids (filled by linking)
    answer_entities: list[str] = field(default_factory=list)
    hops: list[list[str]] = field(default_factory=list)  # the generating chain's facts [h, r, t] (generated QA only)
    num_hops: int = 0
    probes: list[dict] = field(default_factory=list)  # 1-hop probe questions of each hop fact
    # generated multiple choice: the widest distractor tier used (reachable, range, tail, any); "" otherwise
    distractor_tier: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QAExample":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


# --------------------------------------------------------------------------- #
# Normalisation and linking
# --------------------------------------------------------------------------- #
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NONWORD = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """Lowercase, strip accents/punctuation/articles, ``_`` and ``-`` as spaces, squeeze spaces."""
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = text.lower().replace("_", " ").replace("-", " ")
    text = _NONWORD.sub(" ", text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


class EntityLinker:
    """Maps surface text to KG entity ids by normalised names and aliases.

    ``link_exact`` links a whole string (an answer); ``link_mentions`` finds entity names
    inside free text (a question) by greedy longest n-gram match.
    """

    def __init__(self, kg: KnowledgeGraph) -> None:
        self.kg = kg
        self.surface: dict[str, set[str]] = {}
        for eid in kg.entities:
            forms = {eid, kg.entity_name(eid), *kg.aliases.get(eid, [])}
            for form in forms:
                key = normalize(form)
                if key:
                    self.surface.setdefault(key, set()).add(eid)
        self.max_len = max((len(k.split()) for k in self.surface), default=1)

    def link_exact(self, text: str) -> list[str]:
        return sorted(self.surface.get(normalize(text), ()))

    def link_mentions(self, text: str) -> list[str]:
        tokens = normalize(text).split()
        found: list[str] = []
        i = 0
        while i < len(tokens):
            for n in range(min(self.max_len, len(tokens) - i), 0, -1):
                key = " ".join(tokens[i: i + n])
                if key in self.surface:
                    for eid in sorted(self.surface[key]):
                        if eid not in found:
                            found.append(eid)
                    i += n
                    break
            else:
                i += 1
        return found


def link_example(ex: QAExample, linker: EntityLinker) -> tuple[QAExample, str | None]:
    """Fill question/answer entities (keeping any given ones that exist); return a reason on failure."""
    kg = linker.kg
    q_ents = [e for e in ex.question_entities if e in kg.entity_index] or linker.link_mentions(ex.question)
    a_ents = [e for e in ex.answer_entities if e in kg.entity_index]
    if not a_ents:
        for ans in ex.all_answers or [ex.answer]:
            for e in linker.link_exact(ans):
                if e not in a_ents:
                    a_ents.append(e)
    ex.question_entities = q_ents
    ex.answer_entities = a_ents
    if not a_ents:
        return ex, "answer_not_linked"
    if not q_ents:
        return ex, "question_not_linked"
    return ex, None


# --------------------------------------------------------------------------- #
# Question generation
# --------------------------------------------------------------------------- #
def relation_phrase(kg: KnowledgeGraph, r: int) -> str:
    name = kg.relations[r]
    special = {"isa": "is a", "is_a": "is a"}
    if name in special:
        return special[name]
    words = kg.relation_name(r)
    if name.endswith("_of") or name.endswith("_in") or name.endswith("_to") or name.endswith("_with"):
        return "is " + words if not words.startswith(("is ", "has ")) else words
    return words


def chain_question(kg: KnowledgeGraph, start: int, rels: list[int]) -> str:
    """Which concept X satisfies: <start> r1 A, and A r2 X?"""
    n = len(rels)
    names = [kg.entity_name(start)] + VARS[: n - 1] + ["X"]
    clauses = [f"{names[i]} {relation_phrase(kg, rels[i])} {names[i + 1]}" for i in range(n)]
    return "Which concept X satisfies: " + ", and ".join(clauses) + "?"


class _ForwardIndex:
    """(head, relation) -> sorted tails, for following relation chains forward."""

    def __init__(self, kg: KnowledgeGraph) -> None:
        t = kg.triples
        self.by_hr: dict[tuple[int, int], np.ndarray] = {}
        order = np.lexsort((t[:, 2], t[:, 1], t[:, 0]))
        t = t[order]
        keys = t[:, 0] * (kg.num_relations + 1) + t[:, 1]
        bounds = np.flatnonzero(np.diff(keys)) + 1
        for chunk in np.split(t, bounds):
            if len(chunk):
                self.by_hr[(int(chunk[0, 0]), int(chunk[0, 1]))] = chunk[:, 2]
        self.out: dict[int, np.ndarray] = {}
        hb = np.flatnonzero(np.diff(t[:, 0])) + 1
        for chunk in np.split(t, hb):
            if len(chunk):
                self.out[int(chunk[0, 0])] = chunk[:, 1:]
        # the range of each relation: candidate distractors of the same "type", and how often each is its tail
        self.range: dict[int, np.ndarray] = {}
        self.range_count: dict[int, np.ndarray] = {}
        for r in np.unique(t[:, 1]):
            self.range[int(r)], self.range_count[int(r)] = np.unique(t[t[:, 1] == r][:, 2], return_counts=True)
        self.num_entities = kg.num_entities
        self._tail_count: np.ndarray | None = None
        self._reach: dict[tuple[int, int], np.ndarray | None] = {}
        self._names = kg.entity_name
        self._ids, self._aliases = kg.entities, kg.aliases
        self._norm: dict[int, str] = {}
        self._forms: dict[int, frozenset[str]] = {}

    def forms(self, e: int) -> frozenset[str]:
        """The normalised id, name and aliases of entity ``e`` (what reads as that entity; cached)."""
        got = self._forms.get(e)
        if got is None:
            eid = self._ids[e]
            aliases = self._aliases.get(eid, ())
            if not aliases:
                got = frozenset(x for x in (self.norm_name(e), normalize(eid)) if x)
            else:
                got = frozenset(x for x in (self.norm_name(e), normalize(eid), *map(normalize, aliases)) if x)
            self._forms[e] = got
        return got

    def norm_name(self, e: int) -> str:
        """The normalised display name of entity ``e`` (cached)."""
        got = self._norm.get(e)
        if got is None:
            got = self._norm[e] = normalize(self._names(e))
        return got

    @property
    def tail_count(self) -> np.ndarray:
        """How often each entity is the tail of a triple (any relation)."""
        if self._tail_count is None:
            tails = np.concatenate([v[:, 1] for v in self.out.values()]) if self.out else np.zeros(0, np.int64)
            self._tail_count = np.bincount(tails, minlength=self.num_entities)
        return self._tail_count

    def reach(self, start: int, n: int, cap: int = REACH_CAP) -> np.ndarray | None:
        """Sorted entities reached from ``start`` by some relation chain of exactly ``n`` hops.

        None when a frontier grows past ``cap`` entities (too costly to enumerate: the caller
        falls back to the next tier and records it).
        """
        key = (start, n)
        if key not in self._reach:
            frontier: np.ndarray | None = np.array([start], dtype=np.int64)
            for _ in range(n):
                parts = [self.out[int(e)][:, 1] for e in frontier if int(e) in self.out]
                frontier = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
                if len(frontier) > cap:
                    frontier = None
                    break
            self._reach[key] = frontier
        return self._reach[key]

    def follow(self, start: int, rels: list[int]) -> set[int]:
        frontier = {start}
        for r in rels:
            nxt: set[int] = set()
            for e in frontier:
                tails = self.by_hr.get((e, r))
                if tails is not None:
                    nxt.update(int(x) for x in tails)
            frontier = nxt
        return frontier


def _qid(*parts) -> str:
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


def answer_names(kg: KnowledgeGraph, entities, aliases: bool = True) -> list[str]:
    """Every accepted surface form of these entities: display names, then (``aliases``) their aliases;
    one string per normalised form, in that order."""
    out: list[str] = []
    seen: set[str] = set()
    for e in entities:
        eid = kg.entities[e] if isinstance(e, (int, np.integer)) else e
        for f in [kg.entity_name(eid)] + (list(kg.aliases.get(eid, [])) if aliases else []):
            key = normalize(f)
            if key and key not in seen:
                seen.add(key)
                out.append(f)
    return out


@dataclass
class DistractorPolicy:
    """How distractors are drawn (see the module docstring): ``name`` ("range" | "reachable" |
    "matched"), the widest tier a question may fall back to (``max_tier``; a question that needs a
    wider one is not generated), and for "matched" the estimated gold-answer frequencies
    ``gold_prior[(num_hops, relation)] = {entity: count}`` (``num_hops`` 0: hop probes)."""

    name: str = "range"
    max_tier: str = "any"
    gold_prior: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in DISTRACTOR_POLICIES:
            raise ValueError(f"distractors must be one of {DISTRACTOR_POLICIES}, got {self.name!r}")
        if self.max_tier not in TIERS:
            raise ValueError(f"max_distractor_tier must be one of {TIERS}, got {self.max_tier!r}")

    def allows(self, tier: str) -> bool:
        return TIERS.index(tier) <= TIERS.index(self.max_tier)


def _policy(distractors: "str | DistractorPolicy") -> DistractorPolicy:
    return distractors if isinstance(distractors, DistractorPolicy) else DistractorPolicy(str(distractors))


def _choices(kg: KnowledgeGraph, fwd: _ForwardIndex, gold: int, answers: set[int], last_rel: int,
             num_choices: int, rng: np.random.Generator, exclude: set[int] = frozenset(),
             policy: "str | DistractorPolicy" = "range", start: int | None = None, n_hops: int = 1,
             prior_key: int | None = None) -> tuple[list[str], str] | None:
    """(shuffled choice names, the widest distractor tier used), or None if too few distractors exist
    within the policy's widest tier."""
    policy = _policy(policy)
    k = num_choices - 1
    banned = set(answers) | set(exclude)
    # never a distractor that reads as a correct answer (another entity sharing a name or alias with one)
    taken = frozenset().union(*(fwd.forms(a) for a in answers))
    ok = lambda e: e not in banned and taken.isdisjoint(fwd.forms(e))  # noqa: E731
    if policy.name == "range":  # the original policy (the same random draws)
        pool = [int(e) for e in fwd.range.get(last_rel, []) if ok(int(e))]
        tier = "range"
        if len(pool) < k:  # not enough same-range distractors: widen to all entities
            pool = [e for e in range(kg.num_entities) if ok(e)]
            tier = "any"
        if len(pool) < k or not policy.allows(tier):
            return None
        picked = rng.choice(pool, size=k, replace=False).tolist()
    else:
        picked, tier = _tiered(kg, fwd, ok, last_rel, k, rng, policy, start, n_hops,
                               n_hops if prior_key is None else prior_key)
        if picked is None:
            return None
    opts = [kg.entity_name(gold)] + [kg.entity_name(e) for e in picked]
    rng.shuffle(opts)
    return opts, tier


def _tiered(kg, fwd: _ForwardIndex, ok, last_rel: int, k: int, rng, policy: DistractorPolicy,
            start: int | None, n_hops: int, prior_key: int) -> tuple[list[int] | None, str]:
    """k distractors by tier: the last relation's range (reachable from the start first), then the
    tails of other relations, then any entity; the widest tier drawn from (None for the distractors
    when the policy's widest tier does not suffice).

    ``reachable``: uniform within each tier, the reachable part of the range first. ``matched``: the
    range's entities drawn in proportion to how often each is the gold answer of such a question
    (their estimated gold frequency, plus one pseudo-question spread by triple count), and each
    draw swapped for an entity reachable from the start of the same frequency class (within a
    factor of 2) where there is one: reachability is preferred without changing the frequencies.
    """
    rng_ents = fwd.range.get(last_rel, np.zeros(0, np.int64)).tolist()
    rng_cnt = fwd.range_count.get(last_rel, np.zeros(0, np.int64)).tolist()
    in_rng = set(rng_ents)
    reach = fwd.reach(start, n_hops) if start is not None else None
    reach_set = set(reach.tolist()) if reach is not None else set()
    in_range = [e for e in rng_ents if ok(e)]
    picked: list[int] = []
    if policy.name == "matched":
        gold = policy.gold_prior.get((prior_key, last_rel), {})
        total = float(sum(rng_cnt)) or 1.0
        cnt = dict(zip(rng_ents, rng_cnt))
        pool = list(in_range)
        w = np.asarray([gold.get(e, 0.0) + cnt[e] / total for e in pool], dtype=np.float64)
        band = np.floor(np.log2(w)).astype(np.int64) if len(pool) else np.zeros(0, np.int64)
        alive = np.ones(len(pool), dtype=bool)
        for _ in range(min(k, len(pool))):
            p = np.where(alive, w, 0.0)
            i = int(rng.choice(len(pool), p=p / p.sum()))
            if pool[i] not in reach_set:
                near = [j for j in np.flatnonzero(alive & (band == band[i])).tolist() if pool[j] in reach_set]
                if near:
                    i = near[int(rng.integers(len(near)))]
            alive[i] = False
            picked.append(pool[i])
        tiers_used = {"reachable" if e in reach_set else "range" for e in picked}
        widest = "range" if "range" in tiers_used else "reachable"
        if not policy.allows(widest):
            return None, widest
        order = ("tail", "any")
    else:
        widest = "reachable"
        order = TIERS
    for name in order:
        if len(picked) == k:
            break
        if not policy.allows(name):
            return None, name
        if name == "reachable":
            pool = [e for e in in_range if e in reach_set]
        elif name == "range":
            pool = [e for e in in_range if e not in reach_set]
        elif name == "tail":  # a tail of some other relation
            pool = [e for e in range(kg.num_entities) if fwd.tail_count[e] > 0 and e not in in_rng and ok(e)]
        else:
            pool = [e for e in range(kg.num_entities) if fwd.tail_count[e] == 0 and e not in in_rng and ok(e)]
        if not pool:
            continue
        m = min(k - len(picked), len(pool))
        if policy.name == "matched" and name == "tail":
            tw = np.asarray([float(fwd.tail_count[e]) for e in pool], dtype=np.float64)
            got = rng.choice(len(pool), size=m, replace=False, p=tw / tw.sum())
        else:
            got = rng.choice(len(pool), size=m, replace=False)
        picked += [pool[int(i)] for i in got]
        widest = name
    if len(picked) < k:
        return None, widest
    return picked, widest


def _make_question(kg, fwd, start: int, rels: list[int], walk: list[int], num_choices: int,
                   max_answers: int, rng, question_format: str = "mc", distractors: "str | DistractorPolicy" = "range",
                   prior_key: int | None = None) -> QAExample | None:
    answers = fwd.follow(start, rels)
    gold = walk[-1]
    if gold not in answers or len(answers) > max_answers or start in answers:
        return None
    tier = ""
    if question_format == "mc" and num_choices > 1:
        got = _choices(kg, fwd, gold, answers, rels[-1], num_choices, rng, {start}, policy=distractors,
                       start=start, n_hops=len(rels), prior_key=prior_key)
        if got is None:
            return None
        choices, tier = got
    else:
        choices = []
    if question_format == "open":  # scored by exact match over every correct answer's names and aliases
        gold_name = kg.entity_name(gold)  # first, then every correct answer's other names and aliases
        all_answers = [gold_name] + [a for a in answer_names(kg, [gold, *sorted(answers - {gold})]) if a != gold_name]
    else:
        all_answers = sorted(kg.entity_name(a) for a in answers)
    hops = [[kg.entities[walk[i]], kg.relations[rels[i]], kg.entities[walk[i + 1]]] for i in range(len(rels))]
    return QAExample(
        id=_qid(kg.entities[start], [kg.relations[r] for r in rels]),
        question=chain_question(kg, start, rels),
        answer=kg.entity_name(gold),
        choices=choices,
        all_answers=all_answers,
        question_entities=[kg.entities[start]],
        answer_entities=[kg.entities[gold]],
        hops=hops,
        num_hops=len(rels),
        distractor_tier=tier,
    )


class _AnswerBalance:
    """Caps how often one entity is the gold answer among questions of one (hop count, last relation):
    a question is kept only while its gold's count stays within ``share`` of them (at least one each).
    ``share`` 0: no cap."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.count: dict[tuple[int, int], dict[int, int]] = {}
        self.total: dict[tuple[int, int], int] = {}

    def allows(self, key: tuple[int, int], gold: int) -> bool:
        if not self.share:
            return True
        c = self.count.get(key, {}).get(gold, 0)
        return c + 1 <= max(1.0, self.share * (self.total.get(key, 0) + 1))

    def add(self, key: tuple[int, int], gold: int) -> None:
        c = self.count.setdefault(key, {})
        c[gold] = c.get(gold, 0) + 1
        self.total[key] = self.total.get(key, 0) + 1


def _gold_prior(fwd: "_ForwardIndex", heads: np.ndarray, hop_choices: list[int], max_answers: int, seed: int,
                tries: int, answer_share: float = 0.0) -> dict:
    """Estimated gold-answer frequencies of the generator: ``{(num_hops, last relation): {entity: count}}``
    over the distinct questions of a separate run of the same random walks (and ``(0, relation)``
    over their distinct hop facts: the probes' golds)."""
    rng = np.random.default_rng([seed, 1])
    seen: dict[tuple, int] = {}
    balance = _AnswerBalance(answer_share)
    facts: dict[tuple[int, int], int] = {}
    for i in range(1, tries + 1):
        n = int(hop_choices[i % len(hop_choices)])
        start = int(heads[rng.integers(len(heads))])
        got = _random_walk(fwd, start, n, rng)
        if got is None:
            continue
        walk, rels = got
        answers = fwd.follow(start, rels)
        if walk[-1] not in answers or len(answers) > max_answers or start in answers:
            continue
        if (start, tuple(rels)) in seen or not balance.allows((n, rels[-1]), walk[-1]):
            continue
        balance.add((n, rels[-1]), walk[-1])
        seen[(start, tuple(rels))] = walk[-1]
        for j, r in enumerate(rels):
            facts.setdefault((walk[j], r), walk[j + 1])
    out: dict = {}
    for (start, rels), g in seen.items():
        c = out.setdefault((len(rels), rels[-1]), {})
        c[g] = c.get(g, 0) + 1
    for (_, r), t in facts.items():
        c = out.setdefault((0, r), {})
        c[t] = c.get(t, 0) + 1
    return out


def _random_walk(fwd: _ForwardIndex, start: int, n: int, rng) -> tuple[list[int], list[int]] | None:
    walk, rels = [start], []
    for _ in range(n):
        out = fwd.out.get(walk[-1])
        if out is None or len(out) == 0:
            return None
        # prefer edges that do not revisit a node
        ok = [i for i in range(len(out)) if int(out[i, 1]) not in walk]
        if not ok:
            return None
        r, t = out[ok[int(rng.integers(len(ok)))]]
        rels.append(int(r))
        walk.append(int(t))
    return walk, rels


def probe_for_fact(kg: KnowledgeGraph, fwd: _ForwardIndex, h: int, r: int, t: int, num_choices: int,
                   rng, question_format: str = "mc",
                   distractors: "str | DistractorPolicy" = "range") -> QAExample | None:
    """The 1-hop question asking one fact (h, r, ?) with t as gold, in the given format and with the
    given distractor policy (a question's probes use the question's: "known" on equal terms)."""
    return _make_question(kg, fwd, h, [r], [h, t], num_choices, max_answers=10**9, rng=rng,
                          question_format=question_format, distractors=distractors, prior_key=0)


def generate_questions(kg: KnowledgeGraph, num_questions: int, hops: list[int], num_choices: int = 4,
                       max_answers: int = 3, seed: int = 0, max_tries_factor: int = 200, *,
                       question_format: str = "mc", distractors: str = "range",
                       max_distractor_tier: str = "any", max_answer_share: float = 0.0) -> list[QAExample]:
    """Sample multi-hop chain questions by random walks; unique by (start, relation chain).

    ``question_format``: "mc" (``num_choices`` choices; fewer than 2 = open, as before) or "open";
    ``distractors``: "range" | "reachable" | "matched"; ``max_distractor_tier``: the widest tier
    ("reachable" | "range" | "tail" | "any") a question's distractors may come from, else the
    question is not generated (see the module docstring); ``max_answer_share`` > 0: keep a question
    only while its gold answer is at most that share of the questions of its hop count and last
    relation (so the answer's prior does not give it away; 0: no cap). The hop probes use the same
    format and policy. The defaults generate what this function always did.
    """
    if not 0.0 <= max_answer_share <= 1.0:
        raise ValueError(f"max_answer_share must be in [0, 1], got {max_answer_share}")
    if question_format not in QUESTION_FORMATS:
        raise ValueError(f"question_format must be one of {QUESTION_FORMATS}, got {question_format!r}")
    policy = DistractorPolicy(distractors, max_distractor_tier)
    rng = np.random.default_rng(seed)
    fwd = _ForwardIndex(kg)
    heads = np.array(sorted(fwd.out), dtype=np.int64)
    hop_choices = [h for h in hops if h >= 1]
    if policy.name == "matched" and question_format == "mc" and num_choices > 1:
        budget = min(num_questions * max_tries_factor, max(20 * num_questions, 2000))
        policy.gold_prior = _gold_prior(fwd, heads, hop_choices, max_answers, seed, budget, max_answer_share)
    balance = _AnswerBalance(max_answer_share)
    out: dict[str, QAExample] = {}
    tries = 0
    while len(out) < num_questions and tries < num_questions * max_tries_factor:
        tries += 1
        n = int(hop_choices[tries % len(hop_choices)])
        start = int(heads[rng.integers(len(heads))])
        walk = _random_walk(fwd, start, n, rng)
        if walk is None:
            continue
        if policy.name != "range" and _qid(kg.entities[start], [kg.relations[r] for r in walk[1]]) in out:
            continue  # a question already asked (the original policy draws its choices first: same draws as before)
        if not balance.allows((n, walk[1][-1]), walk[0][-1]):
            continue
        ex = _make_question(kg, fwd, start, walk[1], walk[0], num_choices, max_answers, rng, question_format, policy)
        if ex is None or ex.id in out:
            continue
        for i, (h, r, t) in enumerate(ex.hops):
            p = probe_for_fact(kg, fwd, kg.entity_index[h], kg.relation_index[r], kg.entity_index[t], num_choices, rng,
                               question_format, policy)
            if p is not None:
                p.id = f"{ex.id}-hop{i}"
                ex.probes.append(p.to_dict())
        if len(ex.probes) != len(ex.hops):
            continue  # cannot probe every hop: not usable for the known-and-incorrect diagnostic
        balance.add((n, walk[1][-1]), walk[0][-1])
        out[ex.id] = ex
    return list(out.values())


def split_questions(questions: list[QAExample], test_fraction: float, seed: int = 0
                    ) -> tuple[list[QAExample], list[QAExample]]:
    """Hold out multi-hop *questions*; every hop fact is asked in train as a 1-hop question.

    Returns (train, test). Test holds only multi-hop questions (num_hops >= 2). Train holds
    the remaining questions plus one 1-hop question per distinct hop fact of all questions.
    """
    rng = np.random.default_rng(seed + 7919)
    multi = [q for q in questions if q.num_hops >= 2]
    order = rng.permutation(len(multi))
    n_test = int(round(len(multi) * test_fraction))
    test_ids = {multi[i].id for i in order[:n_test]}
    test = [q for q in multi if q.id in test_ids]
    train = [q for q in questions if q.id not in test_ids]
    # One training question per distinct text: a generated 1-hop question and a hop probe
    # asking the same (head, relation) are the same question (all their answers are accepted).
    seen = {normalize(q.question) for q in train}
    for q in questions:
        for p in q.probes:
            probe = QAExample.from_dict(p)
            text = normalize(probe.question)
            if text in seen:
                continue
            seen.add(text)
            probe.id = _qid(probe.question_entities, probe.question)
            train.append(probe)
    # a test question must not be asked in train under the same text
    test_text = {normalize(q.question) for q in test}
    train = [q for q in train if normalize(q.question) not in test_text]
    return train, test


# --------------------------------------------------------------------------- #
# QA files
# --------------------------------------------------------------------------- #
def read_qa_jsonl(path: str | Path, rejects: Rejects | None = None, on_error: str = "skip",
                  byte_range: tuple[int, int] | None = None, first_line: int = 1) -> Iterator[QAExample]:
    """Users' QA: JSONL with ``question``, ``answer``, optional ``choices``, ``id``, ``answers``.

    A bad row is rejected with file and line (``on_error="skip"``, the default: counted in
    ``rejects``) or raises ``QAFormatError`` (``on_error="error"``). ``byte_range=(start, end)``
    reads only the lines that start in ``[start, end)`` (``start`` at a line start, numbered from
    ``first_line``): how a synthesis shard reads its slice of a large file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"QA file not found: {path}")
    rejects = rejects if rejects is not None else Rejects()
    yield from _read_qa_lines(path, _byte_range_lines(path, byte_range, first_line), rejects, on_error)


def _bounded_lines(f) -> Iterator[tuple[bytes, int]]:
    """(line, its full length in bytes) of a binary file; a line over MAX_LINE_BYTES is cut there
    (its rest read and dropped, so memory stays bounded), and then ``len(line) > MAX_LINE_BYTES``."""
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        size = len(raw)
        rest = raw
        while len(raw) > MAX_LINE_BYTES and rest and not rest.endswith(b"\n"):
            rest = f.readline(MAX_LINE_BYTES)
            size += len(rest)
        yield raw, size


def _byte_range_lines(path: Path, byte_range: tuple[int, int] | None, first_line: int) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of the file or of the lines starting in ``byte_range``; a leading BOM is dropped."""
    with path.open("rb") as f:
        start, end = byte_range if byte_range is not None else (0, None)
        if start:
            f.seek(start)
        pos, lineno = start, first_line
        for raw, size in _bounded_lines(f):
            if end is not None and pos >= end:
                break
            if pos == 0 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            yield lineno, raw
            pos += size
            lineno += 1


def line_offsets(path: str | Path, every: int, max_lines: int = 0, chunk: int = 1 << 24) -> list[tuple[int, int, int]]:
    """Cut a text file into slices of ``every`` lines without holding it: ``[(start, end, first_line)]``.

    Reads it once in ``chunk``-byte pieces (constant memory). ``max_lines`` > 0 stops after that
    many lines.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    cuts, pos, lines = [0], 0, 0
    size = Path(path).stat().st_size
    with Path(path).open("rb") as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            i = 0
            while True:
                j = buf.find(b"\n", i)
                if j < 0:
                    break
                lines += 1
                if max_lines and lines >= max_lines:
                    cuts.append(pos + j + 1)
                    return _slices(cuts, pos + j + 1, every)
                if lines % every == 0:
                    cuts.append(pos + j + 1)
                i = j + 1
            pos += len(buf)
    return _slices(cuts, size, every)


def _slices(cuts: list[int], end: int, every: int) -> list[tuple[int, int, int]]:
    if cuts[-1] != end:
        cuts.append(end)
    out = []
    for k in range(len(cuts) - 1):
        if cuts[k + 1] > cuts[k]:
            out.append((cuts[k], cuts[k + 1], 1 + k * every))
    return out


def _read_qa_lines(path: Path, lines: Iterator[tuple[int, bytes]], rejects: Rejects, on_error: str) -> Iterator[QAExample]:
    def bad(lineno: int, msg: str, text: str, reason: str) -> None:
        if on_error == "error":  # one line, no chained traceback: the CLI prints it as it is
            raise QAFormatError(f"{path}:{lineno}: {msg}") from None
        rejects.add(reason, file=str(path), line=lineno, message=msg, text=text[:200])

    for lineno, raw in lines:
        if len(raw) > MAX_LINE_BYTES:
            bad(lineno, f"line longer than {MAX_LINE_BYTES} bytes", repr(raw[:80]), "line_too_long")
            continue
        try:
            text, failed = raw.decode("utf-8").strip(), None
        except UnicodeDecodeError as e:
            text, failed = None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
            if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                failed = "UTF-16 text (byte-order mark); save the file as UTF-8"
        if text is None:
            bad(lineno, failed, repr(raw[:80]), "bad_encoding")
            continue
        if not text:
            continue
        try:
            obj, failed = json.loads(text), None
        except json.JSONDecodeError as e:
            failed = f"not valid JSON ({e.msg})"
        except (ValueError, RecursionError) as e:  # an integer over the digit limit, deep nesting
            failed = f"not valid JSON ({type(e).__name__})"
        if failed is not None:
            bad(lineno, failed, text, "malformed_qa")
            continue
        if not isinstance(obj, dict):
            bad(lineno, "expected a JSON object", text, "malformed_qa")
            continue
        q, a = obj.get("question"), obj.get("answer")
        if not isinstance(q, str) or not q.strip():
            bad(lineno, "missing or empty 'question'", text, "malformed_qa")
            continue
        if not isinstance(a, (str, int, float)) or not str(a).strip():
            bad(lineno, "missing or empty 'answer'", text, "malformed_qa")
            continue
        choices = obj.get("choices") or []
        if isinstance(choices, dict):  # {"A": "...", ...}
            choices = list(choices.values())
        if not isinstance(choices, list) or not all(isinstance(c, (str, int, float)) for c in choices):
            bad(lineno, "'choices' must be a list of strings", text, "malformed_qa")
            continue
        choices = [str(c) for c in choices]
        a = str(a)
        if len(a) == 1 and a.isalpha() and choices and normalize(a) not in {normalize(c) for c in choices}:
            idx = ord(a.upper()) - ord("A")  # a letter answer for a multiple-choice row
            if 0 <= idx < len(choices):
                a = choices[idx]
        if choices and normalize(a) not in {normalize(c) for c in choices}:
            bad(lineno, f"answer {a!r} is not one of the choices", text, "answer_not_in_choices")
            continue
        # "all_answers" is what write_qa_jsonl writes; "answers" is the documented input key
        extra = obj.get("answers") if obj.get("answers") is not None else obj.get("all_answers")
        lists = {"answers": extra, "question_entities": obj.get("question_entities"),
                 "answer_entities": obj.get("answer_entities")}
        wrong = [k for k, v in lists.items() if v is not None and not (
            isinstance(v, list) and all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in v))]
        if wrong:
            bad(lineno, f"'{wrong[0]}' must be a list of strings", text, "malformed_qa")
            continue
        num_hops, hops, probes = obj.get("num_hops"), obj.get("hops"), obj.get("probes")
        if num_hops is not None and (isinstance(num_hops, bool) or not isinstance(num_hops, int)):
            bad(lineno, "'num_hops' must be an integer", text, "malformed_qa")
            continue
        if hops is not None and not (isinstance(hops, list) and all(isinstance(h, list) for h in hops)):
            bad(lineno, "'hops' must be a list of [head, relation, tail] lists", text, "malformed_qa")
            continue
        if probes is not None and not (isinstance(probes, list) and all(isinstance(x, dict) for x in probes)):
            bad(lineno, "'probes' must be a list of objects", text, "malformed_qa")
            continue
        all_answers = [str(x) for x in extra or []] or [a]
        if a not in all_answers:
            all_answers = [a] + all_answers
        yield QAExample(
            id=str(obj.get("id") or _qid(str(path), lineno, q)),
            question=q.strip(), answer=a, choices=choices, all_answers=all_answers,
            question_entities=[str(x) for x in lists["question_entities"] or []],
            answer_entities=[str(x) for x in lists["answer_entities"] or []],
            num_hops=int(num_hops or 0),
            hops=hops or [],
            probes=probes or [],
            distractor_tier=obj["distractor_tier"] if isinstance(obj.get("distractor_tier"), str) else "",
        )


def write_qa_jsonl(rows: list[QAExample], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r.to_dict()) + "\n")
    tmp.replace(path)
