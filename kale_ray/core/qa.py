"""Questions: templated multi-hop QA generated from a KG, users' QA files, and entity linking.

Generated questions follow a relation chain from a start entity::

    Which concept X satisfies: alga is a A, and A is a X?

The gold answer set is every entity the chain reaches from the start (so a question is
scored right for any of them); a question is kept only if that set is small
(``max_answers``). The split holds out *questions*, not facts: test questions are
multi-hop, and every hop fact of every question (train and test) is also asked as a
1-hop training question, so a test failure is a failure to compose known facts (the
"known & incorrect" case KALE targets). Each multi-hop question carries its hop probes.
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
        # the range of each relation: candidate distractors of the same "type"
        self.range: dict[int, np.ndarray] = {}
        for r in np.unique(t[:, 1]):
            self.range[int(r)] = np.unique(t[t[:, 1] == r][:, 2])

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


def _choices(kg: KnowledgeGraph, fwd: _ForwardIndex, gold: int, answers: set[int], last_rel: int,
             num_choices: int, rng: np.random.Generator, exclude: set[int] = frozenset()) -> list[str] | None:
    banned = set(answers) | set(exclude)
    pool = [int(e) for e in fwd.range.get(last_rel, []) if int(e) not in banned]
    if len(pool) < num_choices - 1:  # not enough same-range distractors: widen to all entities
        pool = [e for e in range(kg.num_entities) if e not in banned]
    if len(pool) < num_choices - 1:
        return None
    picked = rng.choice(pool, size=num_choices - 1, replace=False).tolist()
    opts = [kg.entity_name(gold)] + [kg.entity_name(e) for e in picked]
    rng.shuffle(opts)
    return opts


def _make_question(kg, fwd, start: int, rels: list[int], walk: list[int], num_choices: int,
                   max_answers: int, rng) -> QAExample | None:
    answers = fwd.follow(start, rels)
    gold = walk[-1]
    if gold not in answers or len(answers) > max_answers or start in answers:
        return None
    choices = _choices(kg, fwd, gold, answers, rels[-1], num_choices, rng, {start}) if num_choices > 1 else []
    if choices is None:
        return None
    hops = [[kg.entities[walk[i]], kg.relations[rels[i]], kg.entities[walk[i + 1]]] for i in range(len(rels))]
    return QAExample(
        id=_qid(kg.entities[start], [kg.relations[r] for r in rels]),
        question=chain_question(kg, start, rels),
        answer=kg.entity_name(gold),
        choices=choices,
        all_answers=sorted(kg.entity_name(a) for a in answers),
        question_entities=[kg.entities[start]],
        answer_entities=[kg.entities[gold]],
        hops=hops,
        num_hops=len(rels),
    )


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
                   rng) -> QAExample | None:
    """The 1-hop question asking one fact (h, r, ?) with t as gold."""
    return _make_question(kg, fwd, h, [r], [h, t], num_choices, max_answers=10**9, rng=rng)


def generate_questions(kg: KnowledgeGraph, num_questions: int, hops: list[int], num_choices: int = 4,
                       max_answers: int = 3, seed: int = 0, max_tries_factor: int = 200) -> list[QAExample]:
    """Sample multi-hop chain questions by random walks; unique by (start, relation chain)."""
    rng = np.random.default_rng(seed)
    fwd = _ForwardIndex(kg)
    heads = np.array(sorted(fwd.out), dtype=np.int64)
    out: dict[str, QAExample] = {}
    tries = 0
    hop_choices = [h for h in hops if h >= 1]
    while len(out) < num_questions and tries < num_questions * max_tries_factor:
        tries += 1
        n = int(hop_choices[tries % len(hop_choices)])
        start = int(heads[rng.integers(len(heads))])
        walk = _random_walk(fwd, start, n, rng)
        if walk is None:
            continue
        ex = _make_question(kg, fwd, start, walk[1], walk[0], num_choices, max_answers, rng)
        if ex is None or ex.id in out:
            continue
        for i, (h, r, t) in enumerate(ex.hops):
            p = probe_for_fact(kg, fwd, kg.entity_index[h], kg.relation_index[r], kg.entity_index[t], num_choices, rng)
            if p is not None:
                p.id = f"{ex.id}-hop{i}"
                ex.probes.append(p.to_dict())
        if len(ex.probes) != len(ex.hops):
            continue  # cannot probe every hop: not usable for the known-and-incorrect diagnostic
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
        )


def write_qa_jsonl(rows: list[QAExample], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r.to_dict()) + "\n")
    tmp.replace(path)
