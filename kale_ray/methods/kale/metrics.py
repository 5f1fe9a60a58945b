"""Evaluation metrics (pure): accuracy with a Wilson interval, and KALE's known-and-incorrect rate.

A multi-hop question is *known* when the model answers every one of its hop facts right
when asked alone (its probes); it is *known & incorrect* when it is known and the model
still gets the multi-hop question wrong — the failure KALE's fine-tuning targets. "Known" is
measured on equal terms: a question whose probes are not in its own format (open, or multiple
choice with the same number of choices) is left out of that diagnostic and counted.

Also here: the open-answer scorer (:func:`score_open_answer`) and the shortcut check
(:func:`question_blind_baseline`): how well the choices alone, without the question's entity,
give the answer away.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from kale_ray.core.qa import QAExample, normalize
from kale_ray.runtime.report import wilson_interval


def score_open_answer(prediction: str | None, accepted: Sequence[str]) -> bool:
    """An open answer is right when, normalised, it equals a name or alias of any correct answer."""
    pred = normalize(prediction or "")
    return bool(pred) and pred in {normalize(a) for a in accepted}


def _format_of(p: Mapping[str, Any]) -> int | None:
    """A scored item's format: its number of choices (0 = open); None when the item does not say."""
    if "choices" not in p:
        return None
    return len(p.get("choices") or [])


def summarize(predictions: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Metrics from scored predictions.

    Each prediction: ``kind`` ("question" | "probe"), ``qid`` (the multi-hop question it
    belongs to), ``correct`` (bool), ``parsed`` (bool), ``skipped`` (str reason or ""),
    ``num_hops``. Any other kind (``"general"``: :func:`summarize_general`) is left out.
    """
    questions: dict[str, dict] = {}
    probes: dict[str, list[bool]] = defaultdict(list)
    probe_formats: dict[str, set] = defaultdict(set)
    skipped: dict[str, int] = defaultdict(int)
    unparsed = 0
    for p in predictions:
        if p.get("kind") not in ("question", "probe"):
            continue
        if p.get("skipped"):
            skipped[p["skipped"]] += 1
            continue
        if p["kind"] == "question":
            questions[p["qid"]] = p
            unparsed += not p.get("parsed", True)
        else:
            probes[p["qid"]].append(bool(p["correct"]))
            probe_formats[p["qid"]].add(_format_of(p))
    n = len(questions)
    k = sum(bool(q["correct"]) for q in questions.values())
    by_hops: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for q in questions.values():
        by_hops[str(q.get("num_hops", 0))][0] += bool(q["correct"])
        by_hops[str(q.get("num_hops", 0))][1] += 1
    def same_format(qid: str) -> bool:
        fq = _format_of(questions[qid])
        return fq is None or all(f is None or f == fq for f in probe_formats[qid])

    mismatched = [qid for qid in questions if probes.get(qid) and not same_format(qid)]
    with_probes = [qid for qid in questions if probes.get(qid) and same_format(qid)]
    known = [qid for qid in with_probes if all(probes[qid])]
    ki = [qid for qid in known if not questions[qid]["correct"]]
    ki_by_hops: dict[str, dict[str, Any]] = {}
    for qid in with_probes:
        h = ki_by_hops.setdefault(str(questions[qid].get("num_hops", 0)),
                                  {"n_with_probes": 0, "n_known": 0, "n_known_and_incorrect": 0, "accuracy": 0.0,
                                   "probe_accuracy": 0.0, "_k": 0, "_pk": 0, "_pn": 0})
        h["n_with_probes"] += 1
        h["_k"] += bool(questions[qid]["correct"])
        h["_pk"] += sum(probes[qid])
        h["_pn"] += len(probes[qid])
        if all(probes[qid]):
            h["n_known"] += 1
            h["n_known_and_incorrect"] += not questions[qid]["correct"]
    for h in ki_by_hops.values():
        h["accuracy"] = h.pop("_k") / h["n_with_probes"]
        pk, pn = h.pop("_pk"), h.pop("_pn")
        h["probe_accuracy"] = pk / pn if pn else 0.0
        h["known_and_incorrect_rate"] = h["n_known_and_incorrect"] / h["n_with_probes"]
    n_probe = sum(len(v) for v in probes.values())
    k_probe = sum(sum(v) for v in probes.values())
    lo, hi = wilson_interval(k, n)
    return {
        "n_questions": n,
        "accuracy": k / n if n else 0.0,
        "accuracy_ci95": [lo, hi],
        "accuracy_by_hops": {h: {"accuracy": c / t if t else 0.0, "n": t} for h, (c, t) in sorted(by_hops.items())},
        "unparseable": unparsed,
        "probe_accuracy": k_probe / n_probe if n_probe else 0.0,
        "n_probes": n_probe,
        "n_with_probes": len(with_probes),
        "n_known": len(known),
        "n_known_and_incorrect": len(ki),
        # share of all probed questions that are known & incorrect (the paper's diagnostic)
        "known_and_incorrect_rate": len(ki) / len(with_probes) if with_probes else 0.0,
        # among questions whose facts are all known, the share answered wrong
        "known_and_incorrect_given_known": len(ki) / len(known) if known else 0.0,
        # per hop count, over the probed questions: accuracy, hop-fact (probe) accuracy, known & incorrect
        "known_and_incorrect_by_hops": dict(sorted(ki_by_hops.items())),
        # probed questions left out of the diagnostic: a probe not in the question's format
        "n_probe_format_mismatch": len(mismatched),
        "skipped": dict(skipped),
    }


def _accuracy(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """n, accuracy with its 95% Wilson interval and the share of answers that named a choice (parsed)."""
    n, k = len(rows), sum(bool(r["correct"]) for r in rows)
    lo, hi = wilson_interval(k, n)
    return {"n": n, "accuracy": k / n if n else 0.0, "accuracy_ci95": [lo, hi],
            "parse_rate": sum(bool(r.get("parsed")) for r in rows) / n if n else 0.0}


def summarize_general(predictions: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The held-out general questions (``kind="general"``): accuracy with a 95% Wilson interval, n, parse
    rate, overall and per ``category``; skipped items (too long, generation failed) are counted apart."""
    rows = [p for p in predictions if p.get("kind") == "general"]
    answered = [p for p in rows if not p.get("skipped")]
    by_category: dict[str, list] = defaultdict(list)
    for p in answered:
        by_category[p.get("category") or "uncategorised"].append(p)
    return {**_accuracy(answered), "skipped": len(rows) - len(answered),
            "by_category": {c: _accuracy(v) for c, v in sorted(by_category.items())}}


# --------------------------------------------------------------------------- #
# The shortcut check: a question-blind baseline
# --------------------------------------------------------------------------- #
BLIND_PRIORS = ("range", "tail", "answer")


def choice_prior(kg, relation: str | None = None) -> dict[str, float]:
    """Each entity's prior by display name: how often it is a tail of ``relation`` (its range), or of
    any relation (``relation=None``). An entity name shared by several entities sums their counts."""
    t = kg.triples
    if relation is not None:
        t = t[t[:, 1] == kg.relation_index[relation]] if relation in kg.relation_index else t[:0]
    counts = np.bincount(t[:, 2], minlength=kg.num_entities) if len(t) else np.zeros(kg.num_entities, np.int64)
    out: dict[str, float] = {}
    for e, c in enumerate(counts.tolist()):
        key = normalize(kg.entity_name(e))
        out[key] = out.get(key, 0.0) + float(c)
    return out


def blind_pick(choices: Sequence[str], prior: Mapping[str, float]) -> list[str]:
    """The choices a question-blind guesser picks from the choices alone: those of highest prior (ties kept)."""
    if not choices:
        return []
    scores = [prior.get(normalize(c), 0.0) for c in choices]
    best = max(scores)
    return [c for c, s in zip(choices, scores) if s == best]


def question_blind_baseline(kg, questions: Iterable[QAExample | Mapping[str, Any]], prior: str = "range"
                            ) -> dict[str, Any]:
    """Accuracy of guessing from the choices alone (no question entity), overall and per hop count.

    ``prior="range"``: pick the choice most often a tail of the question's last relation (the
    answer's type: it sees the relation, never the entity); ``"tail"``: most often a tail of any
    relation (the choices alone); ``"answer"``: most often the gold answer of the *other* given
    questions of the same hop count and last relation (the answer prior a model fine-tuned on such
    questions can learn; ``kg`` unused). Ties split the credit (1/ties if the gold answer is among
    them), so the number is an expectation, not a lucky draw. Open questions (no choices) guess
    among every entity name the same way (their chance: 1 / the number of names). Near ``chance``
    (the mean of 1/choices) means the choices do not give the answer away.
    """
    if prior not in BLIND_PRIORS:
        raise ValueError(f"prior must be one of {BLIND_PRIORS}, got {prior!r}")
    qs = [q if isinstance(q, QAExample) else QAExample.from_dict(dict(q)) for q in questions]
    qs = [q for q in qs if len(q.choices) >= 2 or not q.choices]
    names: list[str] = []  # an open question's candidates: every entity name
    if any(not q.choices for q in qs):
        names = sorted(choice_prior(kg, None))
    golds: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    if prior == "answer":
        for q in qs:
            golds[(q.num_hops, q.hops[-1][1] if q.hops else None)][normalize(q.answer)] += 1.0
    cache: dict[str | None, dict[str, float]] = {}
    by_hops: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for q in qs:
        rel = q.hops[-1][1] if q.hops else None
        if prior == "answer":
            table = dict(golds[(q.num_hops, rel)])
            table[normalize(q.answer)] -= 1.0  # leave this question out
        else:
            key = rel if prior == "range" else None
            if key not in cache:
                cache[key] = choice_prior(kg, key)
            table = cache[key]
        cands = q.choices or names
        picked = blind_pick(cands, table)
        gold = {normalize(a) for a in (q.all_answers or [q.answer])}
        hit = sum(normalize(c) in gold for c in picked)
        row = by_hops[str(q.num_hops)]
        row[0] += hit / len(picked)
        row[1] += 1.0 / len(cands)
        row[2] += 1
    n = sum(r[2] for r in by_hops.values())
    return {
        "prior": prior,
        "n": n,
        "accuracy": sum(r[0] for r in by_hops.values()) / n if n else 0.0,
        "chance": sum(r[1] for r in by_hops.values()) / n if n else 0.0,
        "by_hops": {h: {"accuracy": a / m, "chance": c / m, "n": m} for h, (a, c, m) in sorted(by_hops.items())},
    }


def gate(sft: Mapping[str, Any] | None, min_known_and_incorrect: float = 0.10) -> dict[str, Any]:
    """The testbed's gate, read off SFT's metrics before methods are compared: a model that answers
    the multi-hop questions better than their hop facts is not composing (the questions have a
    shortcut), and KALE has something to fix only where SFT is known & incorrect."""
    if not sft or not sft.get("n_with_probes"):
        return {}  # no hop probes (a user's QA file, or known_and_incorrect off): nothing to read the gate from
    composes = sft["accuracy"] <= sft["probe_accuracy"]
    enough = sft["known_and_incorrect_rate"] >= min_known_and_incorrect
    return {"sft_accuracy": sft["accuracy"], "sft_probe_accuracy": sft["probe_accuracy"],
            "multi_hop_at_most_hop_fact": composes, "sft_known_and_incorrect_rate": sft["known_and_incorrect_rate"],
            "min_known_and_incorrect": min_known_and_incorrect, "known_and_incorrect_enough": enough,
            "passed": bool(composes and enough)}
