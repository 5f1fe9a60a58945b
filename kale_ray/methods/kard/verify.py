"""The rationale verifier: keep a teacher rationale only if a model reading it predicts the gold answer.

Checks, in order, each returning ``(ok, reason)``:

1. ``empty_generation``: nothing said;
2. ``contradicts_gold``: its concluding statement names a wrong choice and no gold one;
3. ``answer_not_mentioned`` (only with ``require_mention``): it never names a gold answer;
4. ``verifier_wrong_answer``: given question + rationale, the verifier model's choice scores
   (log-likelihood of each choice as the answer) put a wrong choice first;
   ``verifier_tie``: a wrong choice ties the best gold one (no evidence either way).

Pure Python: the scores are computed elsewhere (:mod:`kale_ray.methods.kard.scoring`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

from kale_ray.core.parse import clean_generation, final_statement, _contains
from kale_ray.core.qa import normalize


def text_checks(rationale: str, answers: Sequence[str], choices: Sequence[str],
                require_mention: bool = False) -> tuple[bool, str]:
    text = clean_generation(rationale)
    norm = normalize(text)
    if len(norm) < 3:
        return False, "empty_generation"
    gold = {normalize(a) for a in answers}
    wrong = [c for c in choices if normalize(c) not in gold]
    final = normalize(final_statement(text))
    if not any(_contains(final, a) for a in answers) and any(_contains(final, w) for w in wrong):
        return False, "contradicts_gold"
    if require_mention and not any(_contains(norm, a) for a in answers):
        return False, "answer_not_mentioned"
    return True, ""


def verify_by_scores(choice_scores: Mapping[str, float], answers: Sequence[str]) -> tuple[bool, str]:
    """The verifier model's pick must be gold: best gold score strictly above every wrong one."""
    gold = {normalize(a) for a in answers}
    gold_scores = [s for c, s in choice_scores.items() if normalize(c) in gold]
    wrong_scores = [s for c, s in choice_scores.items() if normalize(c) not in gold]
    if not gold_scores:
        return False, "gold_not_in_choices"
    if not wrong_scores:
        return True, ""
    best_gold, best_wrong = max(gold_scores), max(wrong_scores)
    if best_gold > best_wrong:
        return True, ""
    return False, "verifier_tie" if best_gold == best_wrong else "verifier_wrong_answer"


def verify_rationale(rationale: str, answers: Sequence[str], choices: Sequence[str],
                     choice_scores: Mapping[str, float] | None = None,
                     require_mention: bool = False) -> tuple[bool, str]:
    """All checks; ``choice_scores=None`` means text checks only (``teacher.verifier: text``)."""
    ok, reason = text_checks(rationale, answers, choices, require_mention)
    if not ok or choice_scores is None:
        return ok, reason
    return verify_by_scores(choice_scores, answers)
