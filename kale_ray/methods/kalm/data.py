"""KaLM data: triples -> training rows (both views + the triple-completion prompt), splits, KGQA items.

Pure core: numpy and :mod:`kale_ray.core` only (no torch, Ray or vLLM). Chat rendering is
passed in as a function (``render(messages) -> str``) so the rows are byte-identical to
what the model sees at evaluation.

One training row per triple, forward and (``add_inverse``) inverse, as in the official
code (``(h, r, t) -> (t, r + R, h)`` with the inverse relation's own text)::

    {"id": "t17" | "t17~inv",
     "head": 3, "relation": 12, "tail": 40,            # ids; relation >= R is an inverse
     "query_text": "[ steroid, interacts with ]",       # view A
     "key_text": "{ eicosanoid }",                      # view B
     "known_tails": [40, 41],                           # every training tail of (head, relation)
     "prompt": "<chat-rendered triple completion instruction>",
     "completion": "eicosanoid<|im_end|>"}              # L_LM is on these tokens only

``known_tails`` lets the collator mask in-batch false negatives without the whole KG.
Its size is the sum over (h, r) of fan-out squared (``prep_summary`` reports it): small
for UMLS (about 70k entries), large for a KG with (h, r) pairs of thousands of tails.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Iterable, Sequence

import numpy as np

from kale_ray.core.kg import KnowledgeGraph, builtin_kg_files, read_triples
from kale_ray.core.prompts import Message, student_messages
from kale_ray.core.rejects import Rejects

TRIPLE_COMPLETION_INSTRUCTION = "Given the head entity and relation, write a tail entity that completes the triple"
INVERSE_SUFFIX = "~inv"
TRUE, FALSE = "true", "false"
KGQA_TASKS = ("tail", "head", "relation", "triple", "tail_open")


# --------------------------------------------------------------------------- text


def inverse_relation_text(text: str, style: str = "prefix") -> str:
    """``"prefix"`` -> ``"inverse of <rel>"``, ``"suffix"`` -> ``"<rel> (reverse)"``."""
    if style == "prefix":
        return f"inverse of {text}"
    if style == "suffix":
        return f"{text} (reverse)"
    raise ValueError(f"unknown inverse relation style {style!r}; expected 'prefix' or 'suffix'")


@dataclasses.dataclass(frozen=True)
class KGText:
    """Entity texts ``(E,)`` and relation texts ``(2R,)``: relation ``r + R`` is the inverse of ``r``."""

    entities: list[str]
    relations: list[str]
    num_relations: int  # R, the forward relations

    @classmethod
    def from_kg(cls, kg: KnowledgeGraph, inverse_style: str = "prefix") -> "KGText":
        forward = [kg.relation_name(r) for r in range(kg.num_relations)]
        inverse = [inverse_relation_text(t, inverse_style) for t in forward]
        return cls([kg.entity_name(e) for e in range(kg.num_entities)], forward + inverse, kg.num_relations)


def query_text(head: str, relation: str) -> str:
    """View A, as the official code writes it: ``"[ head, relation ]"``."""
    return f"[ {head}, {relation} ]"


def key_text(entity: str) -> str:
    """View B: ``"{ entity }"``."""
    return f"{{ {entity} }}"


def completion_messages(head: str, relation: str) -> list[Message]:
    """Implicit alignment's instruction (the official Alpaca instruction, as one user turn)."""
    return [{"role": "user", "content": f"{TRIPLE_COMPLETION_INSTRUCTION}: {head}, {relation}"}]


# --------------------------------------------------------------------------- triples


def with_inverse(triples: np.ndarray, num_relations: int) -> np.ndarray:
    """``(N, 3)`` -> ``(2N, 3)``: the triples, then ``(t, r + R, h)`` for each, in the same order."""
    triples = np.asarray(triples, dtype=np.int64).reshape(-1, 3)
    inverse = np.stack([triples[:, 2], triples[:, 1] + num_relations, triples[:, 0]], axis=1)
    return np.concatenate([triples, inverse], axis=0)


def tails_by_query(triples: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """``{(h, r): sorted unique tails}`` over ``(N, 3)`` triples."""
    out: dict[tuple[int, int], set[int]] = {}
    for h, r, t in np.asarray(triples, dtype=np.int64).reshape(-1, 3).tolist():
        out.setdefault((h, r), set()).add(t)
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in out.items()}


def seeded_subset(triples: np.ndarray, n: int, seed: int, salt: str) -> np.ndarray:
    """``n`` rows (all if ``n`` is 0 or larger), a seeded sample in the original order."""
    if n <= 0 or n >= len(triples):
        return triples
    rng = np.random.default_rng([seed, int(hashlib.sha1(salt.encode()).hexdigest()[:8], 16)])
    keep = np.sort(rng.choice(len(triples), size=n, replace=False))
    return triples[keep]


@dataclasses.dataclass
class KGSplit:
    """Id triples ``(N, 3)`` of each split (forward relations only)."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    rejects: Rejects = dataclasses.field(default_factory=Rejects)

    @property
    def all_true(self) -> np.ndarray:
        """Every known triple (train + valid + test): the filter of the filtered setting."""
        return np.concatenate([self.train, self.valid, self.test], axis=0)


def _ids(kg: KnowledgeGraph, named: Iterable[tuple[str, str, str]]) -> np.ndarray:
    rows = [(kg.entity_index[h], kg.relation_index[r], kg.entity_index[t]) for h, r, t in named]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def split_kg(kg: KnowledgeGraph, split: str = "official", test_fraction: float = 0.1, seed: int = 0) -> KGSplit:
    """Train/valid/test triples.

    ``"official"``: a builtin KG's own files (pykeen's UMLS: 5216 / 652 / 661); ``"random"``
    (and any user KG): a seeded permutation, ``test_fraction`` each for test and valid. A
    triple found in an earlier split is dropped from the later one, with a reason.
    """
    rejects = Rejects()
    if split == "official" and kg.source.startswith("builtin:"):
        parts = []
        seen: set[tuple[int, int, int]] = set()
        for path in builtin_kg_files(kg.source.split(":", 1)[1]):
            ids = _ids(kg, read_triples(path))
            keep = []
            for row in ids.tolist():
                key = tuple(row)
                if key in seen:
                    rejects.add("duplicate_across_splits", file=path.name, triple=row)
                    continue
                seen.add(key)
                keep.append(row)
            parts.append(np.asarray(keep, dtype=np.int64).reshape(-1, 3))
        return KGSplit(parts[0], parts[1], parts[2], rejects)
    if split not in ("official", "random"):
        raise ValueError(f"unknown split {split!r}; expected 'official' or 'random'")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(kg.triples))
    n_test = max(1, int(round(test_fraction * len(order))))
    test, valid, train = order[:n_test], order[n_test: 2 * n_test], order[2 * n_test:]
    return KGSplit(kg.triples[np.sort(train)], kg.triples[np.sort(valid)], kg.triples[np.sort(test)], rejects)


# --------------------------------------------------------------------------- training rows


def training_rows(
    train: np.ndarray,
    text: KGText,
    render: Callable[[list[Message]], str],
    eos: str,
    add_inverse: bool = True,
    known_triples: np.ndarray | None = None,
) -> list[dict]:
    """One row per (forward and inverse) training triple; see the module docstring.

    ``known_tails`` come from ``known_triples`` (default: ``train``; pass the whole training
    split when ``train`` is a sample of it, so that fewer false negatives go unmasked).
    """
    train = np.asarray(train, dtype=np.int64).reshape(-1, 3)
    n = len(train)
    triples = with_inverse(train, text.num_relations) if add_inverse else train
    known_src = train if known_triples is None else np.asarray(known_triples, dtype=np.int64).reshape(-1, 3)
    known = tails_by_query(with_inverse(known_src, text.num_relations) if add_inverse else known_src)
    rows = []
    for i, (h, r, t) in enumerate(triples.tolist()):
        head, rel, tail = text.entities[h], text.relations[r], text.entities[t]
        rows.append({
            "id": f"t{i % n}{INVERSE_SUFFIX if i >= n else ''}",
            "head": h, "relation": r, "tail": t,
            "query_text": query_text(head, rel),
            "key_text": key_text(tail),
            "known_tails": known[(h, r)].tolist(),
            "prompt": render(completion_messages(head, rel)),
            "completion": f"{tail}{eos}",
        })
    return rows


def prep_summary(rows: Sequence[dict], split: KGSplit, text: KGText, trained: int | None = None) -> dict:
    return {
        "entities": len(text.entities),
        "relations": text.num_relations,
        "train_triples": int(len(split.train) if trained is None else trained),
        "train_split_triples": int(len(split.train)),
        "valid_triples": int(len(split.valid)),
        "test_triples": int(len(split.test)),
        "training_rows": len(rows),
        "inverse_rows": sum(1 for r in rows if r["id"].endswith(INVERSE_SUFFIX)),
        "known_tail_entries": sum(len(r["known_tails"]) for r in rows),
        "max_known_tails": max((len(r["known_tails"]) for r in rows), default=0),
        "split_rejects": split.rejects.counts(),
    }


# --------------------------------------------------------------------------- KGQA items


def _distractors(rng: np.random.Generator, pool: int, exclude: set[int], k: int) -> list[int] | None:
    """``k`` distinct ids in ``range(pool)`` outside ``exclude``; None when there are not enough."""
    allowed = [i for i in range(pool) if i not in exclude]
    if len(allowed) < k:
        return None
    return [allowed[j] for j in rng.choice(len(allowed), size=k, replace=False)]


def _mc_item(task: str, idx: int, question: str, gold: str, wrong: list[str],
             rng: np.random.Generator, triple: Sequence[int]) -> dict:
    choices = [gold] + wrong
    order = rng.permutation(len(choices))
    choices = [choices[j] for j in order]
    return {"item_id": f"{task}-{idx:05d}", "task": task, "question": question, "choices": choices,
            "all_answers": [gold], "triple": [int(x) for x in triple], "chance": 1.0 / len(choices),
            "messages": student_messages(question, choices)}


def kgqa_items(
    test: np.ndarray,
    all_true: np.ndarray,
    text: KGText,
    per_task: int,
    num_choices: int,
    rng: np.random.Generator,
    rejects: Rejects | None = None,
) -> list[dict]:
    """Multiple-choice KGQA over the first ``per_task`` test triples, four tasks.

    * ``tail``: "(h, r, ?)" — distractors are entities that are *not* known tails of (h, r),
      and not ``h`` itself (a small model that echoes the question would otherwise "name" it);
    * ``head``: "(?, r, t)" — distractors are not known heads of (r, t), and not ``t``;
    * ``relation``: "how are h and t related?" — distractors are relations not known between them;
    * ``triple``: "is (h, r, t) true?" — true/false, alternating the test triple and a corruption
      (its tail replaced by an entity that makes no known triple), so the classes are balanced;
    * ``tail_open``: open tail prediction with the *training* instruction (implicit alignment's
      prompt, as the official KGQA tail prediction): right if the answer is any known tail of
      (h, r); ``chance`` is then the share of entities that are right.

    Every multiple-choice item has exactly one correct choice (all known answers are kept out
    of the distractors). A triple whose question cannot be made is skipped with a reason.
    Each item carries its chat ``messages`` and its ``chance`` of being right by a random pick.
    """
    rejects = rejects if rejects is not None else Rejects()
    triples = np.asarray(test, dtype=np.int64).reshape(-1, 3)[:per_task]
    known = {tuple(x) for x in np.asarray(all_true, dtype=np.int64).reshape(-1, 3).tolist()}
    hr_t, rt_h, ht_r = {}, {}, {}
    for h, r, t in known:
        hr_t.setdefault((h, r), set()).add(t)
        rt_h.setdefault((r, t), set()).add(h)
        ht_r.setdefault((h, t), set()).add(r)
    n_ent, n_rel, k = len(text.entities), text.num_relations, num_choices - 1
    ent, rel = text.entities, text.relations
    items = []
    for i, (h, r, t) in enumerate(triples.tolist()):
        wrong = _distractors(rng, n_ent, hr_t[(h, r)] | {h}, k)
        if wrong is None:
            rejects.add("not_enough_distractors", task="tail", triple=[h, r, t])
        else:
            q = f"Which entity completes the triple ({ent[h]}, {rel[r]}, ?)"
            items.append(_mc_item("tail", i, q, ent[t], [ent[j] for j in wrong], rng, (h, r, t)))
        wrong = _distractors(rng, n_ent, rt_h[(r, t)] | {t}, k)
        if wrong is None:
            rejects.add("not_enough_distractors", task="head", triple=[h, r, t])
        else:
            q = f"Which entity completes the triple (?, {rel[r]}, {ent[t]})"
            items.append(_mc_item("head", i, q, ent[h], [ent[j] for j in wrong], rng, (h, r, t)))
        wrong = _distractors(rng, n_rel, ht_r[(h, t)], k)
        if wrong is None:
            rejects.add("not_enough_distractors", task="relation", triple=[h, r, t])
        else:
            q = f"What is the relation between {ent[h]} and {ent[t]}?"
            items.append(_mc_item("relation", i, q, rel[r], [rel[j] for j in wrong], rng, (h, r, t)))
        answers = sorted(hr_t[(h, r)])
        items.append({"item_id": f"tail_open-{i:05d}", "task": "tail_open",
                       "question": f"{TRIPLE_COMPLETION_INSTRUCTION}: {ent[h]}, {rel[r]}", "choices": [],
                       "all_answers": [ent[x] for x in answers], "triple": [h, r, t],
                       "chance": len(answers) / n_ent, "messages": completion_messages(ent[h], rel[r])})
        corrupt = None
        if i % 2 == 1:
            bad = _distractors(rng, n_ent, hr_t[(h, r)], 1)
            if bad is None:
                rejects.add("no_corruption", task="triple", triple=[h, r, t])
                continue
            corrupt = bad[0]
        shown = t if corrupt is None else corrupt
        q = f"Is this triple true: ({ent[h]}, {rel[r]}, {ent[shown]})?"
        items.append({"item_id": f"triple-{i:05d}", "task": "triple", "question": q, "choices": [TRUE, FALSE],
                      "all_answers": [TRUE if corrupt is None else FALSE], "triple": [h, r, shown], "chance": 0.5,
                      "messages": student_messages(q, [TRUE, FALSE])})
    return items


def kgqa_messages(item: dict) -> list[Message]:
    """The prompt of a KGQA item (its ``messages``: the student prompt, or the training instruction)."""
    return item["messages"]
