"""Evaluation metrics (pure): accuracy with a Wilson interval, and KALE's known-and-incorrect rate.

A multi-hop question is *known* when the model answers every one of its hop facts right
when asked alone (its probes); it is *known & incorrect* when it is known and the model
still gets the multi-hop question wrong — the failure KALE's fine-tuning targets.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable

from kale_ray.runtime.report import wilson_interval


def summarize(predictions: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Metrics from scored predictions.

    Each prediction: ``kind`` ("question" | "probe"), ``qid`` (the multi-hop question it
    belongs to), ``correct`` (bool), ``parsed`` (bool), ``skipped`` (str reason or ""),
    ``num_hops``.
    """
    questions: dict[str, dict] = {}
    probes: dict[str, list[bool]] = defaultdict(list)
    skipped: dict[str, int] = defaultdict(int)
    unparsed = 0
    for p in predictions:
        if p.get("skipped"):
            skipped[p["skipped"]] += 1
            continue
        if p["kind"] == "question":
            questions[p["qid"]] = p
            unparsed += not p.get("parsed", True)
        else:
            probes[p["qid"]].append(bool(p["correct"]))
    n = len(questions)
    k = sum(bool(q["correct"]) for q in questions.values())
    by_hops: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for q in questions.values():
        by_hops[str(q.get("num_hops", 0))][0] += bool(q["correct"])
        by_hops[str(q.get("num_hops", 0))][1] += 1
    with_probes = [qid for qid in questions if probes.get(qid)]
    known = [qid for qid in with_probes if all(probes[qid])]
    ki = [qid for qid in known if not questions[qid]["correct"]]
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
        "skipped": dict(skipped),
    }
