"""Parsing teacher generations and student answers, and verifying rationales.

A rationale is kept only if it is consistent with the gold answer:

1. it is non-empty and not cut off mid-way with nothing said (``empty_generation``);
2. it names the gold answer (any accepted answer text, after normalisation) —
   otherwise ``answer_not_mentioned``;
3. its concluding statement ("the answer is X", or the last sentence) does not name a
   wrong choice instead of the gold one — otherwise ``contradicts_gold``;
4. it is grounded in the path it was given: it names at least ``min_path_coverage`` of the
   path's entities other than the answer (the question entity and the intermediate ones),
   and at least one of them — otherwise ``not_grounded`` (``require_grounding``). "The
   answer is X." alone names the answer but explains nothing, and is rejected.

Each check returns ``(ok, reason)``, datatrove-style.
"""
from __future__ import annotations

import re
from typing import Sequence

from kale_ray.core.qa import normalize

_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_FINAL = re.compile(r"(?:the\s+)?answer\s+is\s*:?\s*(.+?)(?:[.\n]|$)", re.I)
_SENT = re.compile(r"(?<=[.!?])\s+")


def clean_generation(text: str | None) -> str:
    text = _THINK.sub("", text or "")
    return text.strip()


def _contains(haystack_norm: str, needle: str) -> bool:
    n = normalize(needle)
    return bool(n) and re.search(rf"(?<!\w){re.escape(n)}(?!\w)", haystack_norm) is not None


def final_statement(text: str) -> str:
    """The text the rationale concludes with: after the last 'answer is', else the last sentence."""
    matches = list(_FINAL.finditer(text))
    if matches:
        return matches[-1].group(1)
    sentences = [s for s in _SENT.split(text.strip()) if s.strip()]
    return sentences[-1] if sentences else ""


def verify_rationale(rationale: str, answers: Sequence[str], choices: Sequence[str] = (),
                     path_entities: Sequence[str] = (), require_grounding: bool = True,
                     min_path_coverage: float = 0.0) -> tuple[bool, str]:
    text = clean_generation(rationale)
    if len(normalize(text)) < 3:
        return False, "empty_generation"
    norm = normalize(text)
    if not any(_contains(norm, a) for a in answers):
        return False, "answer_not_mentioned"
    final = normalize(final_statement(text))
    wrong = [c for c in choices if not any(normalize(c) == normalize(a) for a in answers)]
    gold_in_final = any(_contains(final, a) for a in answers)
    if not gold_in_final and any(_contains(final, w) for w in wrong):
        return False, "contradicts_gold"
    gold = {normalize(a) for a in answers}
    support = [e for e in path_entities if normalize(e) not in gold]
    if require_grounding and support:
        named = sum(_contains(norm, e) for e in support)
        if named == 0 or named < min_path_coverage * len(support):
            return False, "not_grounded"
    return True, ""


def match_choice(generation: str, choices: Sequence[str]) -> str | None:
    """Map a free-text answer onto one of the choices; None if it names none or several.

    Exact normalised match first, then the choice the text starts with, then the single
    choice it contains (longest wins when one choice contains another).
    """
    text = normalize(clean_generation(generation))
    if not text:
        return None
    by_norm = {normalize(c): c for c in choices}
    if text in by_norm:
        return by_norm[text]
    # the text starts with the choice as whole words ("planter" does not start with "plant")
    starts = [c for n, c in by_norm.items() if n and text.startswith(n + " ")]
    if starts:
        return max(starts, key=lambda c: len(normalize(c)))
    found = [c for n, c in by_norm.items() if n and _contains(text, c)]
    if not found:
        return None
    longest = max(found, key=lambda c: len(normalize(c)))
    others = [c for c in found if not normalize(longest).count(normalize(c)) and c != longest]
    return None if others else longest


def is_correct(generation: str, answers: Sequence[str], choices: Sequence[str] = ()) -> tuple[bool, str | None]:
    """Score one prediction: choice matching for multiple choice, normalised match otherwise.

    Returns (correct, the parsed prediction or None when it cannot be parsed).
    """
    golds = {normalize(a) for a in answers}
    if choices:
        picked = match_choice(generation, choices)
        return (picked is not None and normalize(picked) in golds), picked
    pred = normalize(final_statement(clean_generation(generation)) or generation)
    first_line = normalize(clean_generation(generation).split("\n")[0])
    return (pred in golds or first_line in golds), (pred or None)
