"""Common QA dataset shapes -> our QA rows (pure: a row dict in, a QAExample dict or a reason out).

Formats (``qa.format``)::

    kale        ours: question, answer, choices (list or {label: text}), id, answers, ...
    csqa        CommonsenseQA / OpenBookQA: question {stem, choices [{label, text}]} (or a flat question /
                question_stem with choices {label: [...], text: [...]}) and answerKey
    medqa       MedQA: question, options ({A: text} or a list), answer_idx (letter or index) and/or answer
                (text, letter or index)
    mmlu        MMLU: question, choices (list), answer (index 0.. or letter)
    strategyqa  StrategyQA: question, boolean answer -> choices ["yes", "no"]

:func:`detect_format` picks one from a first row's keys (``auto``). ``columns`` maps our field names
(``question``, ``answer``, ``id``, ``choices``) to a source's column names; ``choices`` may name several
columns separated by commas (``A,B,C,D``: one option per column, labelled A, B, ... in that order).
:func:`convert_row` never guesses: a row it cannot read exactly raises :class:`RowError` with a reason
code (the QA reader's: ``malformed_qa``, ``answer_not_in_choices``) and a message naming the field.
A row without an id gets ``<source name>:<row index>``. The same input gives the same output.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

from kale_ray.core.qa import normalize

FORMATS = ("kale", "csqa", "medqa", "mmlu", "strategyqa")
FIELDS = ("question", "answer", "id", "choices")
# Bumped when a conversion's output changes for the same input: part of the synthesis settings.
VERSION = 1

# Where each format looks for a field when qa.columns does not name the column.
_DEFAULTS: dict[str, dict[str, tuple[str, ...]]] = {
    "kale": {"question": ("question",), "answer": ("answer",), "id": ("id",), "choices": ("choices",)},
    "csqa": {"question": ("question", "question_stem"), "answer": ("answerKey", "answer_key"), "id": ("id",),
             "choices": ("choices",)},
    "medqa": {"question": ("question",), "answer": ("answer_idx", "answer"), "id": ("id",),
              "choices": ("options", "choices")},
    "mmlu": {"question": ("question",), "answer": ("answer",), "id": ("id",), "choices": ("choices",)},
    "strategyqa": {"question": ("question",), "answer": ("answer",), "id": ("qid", "id"), "choices": ()},
}
# Our optional per-row fields, passed through for format=kale (the QA reader checks their types).
_KALE_EXTRA = ("answers", "all_answers", "question_entities", "answer_entities", "num_hops", "hops", "probes")
_YES_NO = {"true": True, "yes": True, "false": False, "no": False}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class RowError(ValueError):
    """A source row that does not convert: ``reason`` (a reject code) and a message naming the field."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _bad(message: str, reason: str = "malformed_qa") -> RowError:
    return RowError(reason, message)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _pick(row: Mapping, fmt: str, field: str, columns: Mapping[str, str] | None) -> tuple[str, Any]:
    """(column name, value) of ``field`` in ``row``: the mapped column, else the format's first present default."""
    name = (columns or {}).get(field) or ""
    if name:
        if "," in name and field == "choices":
            names = [n.strip() for n in name.split(",") if n.strip()]
            absent = [n for n in names if n not in row]
            if absent:
                raise _bad(f"no column {absent[0]!r} (qa.columns.choices)")
            return name, {LETTERS[i]: row[n] for i, n in enumerate(names)}
        if name not in row:
            raise _bad(f"no column {name!r} (qa.columns.{field})")
        return name, row[name]
    for cand in _DEFAULTS[fmt][field]:
        if cand in row and not _missing(row[cand]):
            return cand, row[cand]
    defaults = _DEFAULTS[fmt][field]
    return (defaults[0] if defaults else field), None


def _maybe_json(v: Any) -> Any:
    """A CSV cell holding a JSON list or object (choices, options) as that list or object."""
    if isinstance(v, str) and v.strip()[:1] in ("[", "{"):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def _text(v: Any, what: str) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)) or _missing(v):
        raise _bad(f"missing or empty {what!r}" if _missing(v) else f"{what!r} must be text, got {type(v).__name__}")
    return str(v).strip()


def _labelled(choices: Any, what: str) -> list[tuple[str, str]]:
    """[(label, text)] of a choices/options value: a list (labels A, B, ...), {label: text},
    {label: [...], text: [...]} (columnar, as in HF datasets) or [{label, text}]."""
    choices = _maybe_json(choices)
    if isinstance(choices, Mapping):
        if set(choices) >= {"label", "text"} and isinstance(choices["text"], (list, tuple)):
            labels, texts = list(choices["label"] or []), list(choices["text"] or [])
            if len(labels) != len(texts):
                raise _bad(f"{what!r} has {len(labels)} labels for {len(texts)} texts")
            pairs = list(zip(labels, texts))
        else:
            pairs = [(k, v) for k, v in choices.items() if not _missing(v)]  # a struct column pads absent keys
    elif isinstance(choices, (list, tuple)):
        if choices and all(isinstance(c, Mapping) for c in choices):
            if not all("text" in c for c in choices):
                raise _bad(f"{what!r}: every choice needs a 'text'")
            pairs = [(c.get("label", LETTERS[i] if i < len(LETTERS) else str(i)), c["text"]) for i, c in enumerate(choices)]
        else:
            pairs = [(LETTERS[i] if i < len(LETTERS) else str(i), c) for i, c in enumerate(choices)]
    else:
        raise _bad(f"{what!r} must be a list or a mapping of choices, got {type(choices).__name__}")
    out = []
    for label, text in pairs:
        out.append((_text(label, f"{what} label"), _text(text, f"{what} text")))
    if not out:
        raise _bad(f"{what!r} is empty")
    labels = [lab for lab, _ in out]
    if len(set(labels)) != len(labels):
        raise _bad(f"{what!r} repeats a label ({', '.join(labels)})")
    return out


def _span(labels: list[str]) -> str:
    return f"{labels[0]}-{labels[-1]}" if len(labels) > 2 else ", ".join(labels)


def _by_label(key: Any, pairs: list[tuple[str, str]], what: str) -> str:
    labels = [lab for lab, _ in pairs]
    k = _text(key, what)
    for lab, text in pairs:
        if lab == k or lab.upper() == k.upper():
            return text
    raise _bad(f"{what} {k!r} not among choice labels {_span(labels)}", "answer_not_in_choices")


def _by_index(i: int, pairs: list[tuple[str, str]], what: str) -> str:
    if not 0 <= i < len(pairs):
        raise _bad(f"{what} {i} out of range for {len(pairs)} choices (0-{len(pairs) - 1})", "answer_not_in_choices")
    return pairs[i][1]


def _is_index(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()) or (
        isinstance(v, str) and v.strip().isdigit())


def _gold(answer: Any, pairs: list[tuple[str, str]], what: str, index_first: bool) -> str:
    """The gold text of an answer that is a label, an index (0-based) or a choice's text."""
    labels = {lab.upper() for lab, _ in pairs}
    if _is_index(answer) and (index_first or str(answer).strip().upper() not in labels):
        return _by_index(int(float(answer)), pairs, what)
    text = _text(answer, what)
    if text.upper() in labels:
        return _by_label(text, pairs, what)
    for _, t in pairs:
        if normalize(t) == normalize(text):
            return t
    raise _bad(f"{what} {text!r} is neither a choice label ({_span([lab for lab, _ in pairs])}) nor a choice's text",
               "answer_not_in_choices")


def _row_id(row: Mapping, fmt: str, columns, source: str, index: int) -> str:
    _, v = _pick(row, fmt, "id", columns)
    if _missing(v):
        return f"{source}:{index}"
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


def detect_format(row: Mapping, columns: Mapping[str, str] | None = None) -> str:
    """The format of a row from its keys (and the types of question/answer): one of :data:`FORMATS`.

    Raises ValueError naming the keys when no format fits (set ``qa.format`` / ``qa.columns``)."""
    cols = {k: v for k, v in (columns or {}).items() if v}
    q = row.get(cols.get("question", "question"))
    a = row.get(cols.get("answer", "answer"))
    if isinstance(q, Mapping) and "stem" in q or "answerKey" in row or "question_stem" in row:
        return "csqa"
    if "options" in row or "answer_idx" in row:
        return "medqa"
    has_q = cols.get("question", "question") in row
    if has_q and isinstance(a, bool):
        return "strategyqa"
    choices = row.get(cols.get("choices", "choices"))
    if has_q and _is_index(a) and not isinstance(a, str) and isinstance(choices, (list, tuple)) and (
            str(a) not in {str(c) for c in choices}):
        return "mmlu"
    if has_q and cols.get("answer", "answer") in row:
        return "kale"
    raise ValueError(f"cannot tell the QA format from the first row's keys {sorted(row)[:12]}: set qa.format "
                     f"({'|'.join(FORMATS)}) and/or qa.columns.question / qa.columns.answer")


def convert_row(row: Mapping, fmt: str, columns: Mapping[str, str] | None = None, source: str = "qa",
                index: int = 0) -> dict:
    """One source row as our QA row (the dict :func:`kale_ray.core.qa.read_qa_jsonl` reads), id first.

    Raises :class:`RowError` for a row that does not convert exactly (nothing is guessed or coerced)."""
    if fmt not in FORMATS:
        raise ValueError(f"qa.format: unknown format {fmt!r} ({', '.join(FORMATS)} or auto)")
    if not isinstance(row, Mapping):
        raise _bad(f"expected a record, got {type(row).__name__}")
    qcol, q = _pick(row, fmt, "question", columns)
    ccol, choices = _pick(row, fmt, "choices", columns)
    acol, a = _pick(row, fmt, "answer", columns)
    if fmt == "csqa" and isinstance(q, Mapping):  # {stem, choices: [{label, text}]}
        if choices is None:
            choices = q.get("choices")
            ccol = f"{qcol}.choices"
        q = q.get("stem")
        qcol = f"{qcol}.stem"
    question = _text(q, qcol)
    out: dict[str, Any] = {"id": _row_id(row, fmt, columns, source, index), "question": question}
    if fmt == "strategyqa":
        if isinstance(a, bool):
            yes = a
        elif isinstance(a, str) and a.strip().lower() in _YES_NO:
            yes = _YES_NO[a.strip().lower()]
        else:
            raise _bad(f"{acol!r} must be a boolean (or true/false/yes/no), got {a!r}")
        out.update(answer="yes" if yes else "no", choices=["yes", "no"])
        return out
    if fmt == "kale":
        answer = _text(a, acol)
        pairs = _labelled(choices, ccol) if not _missing(choices) and choices != [] else []
        texts = [t for _, t in pairs]
        if texts and normalize(answer) not in {normalize(t) for t in texts}:
            answer = _gold(answer, pairs, acol, index_first=False)  # a label ('B') of a multiple-choice row
        out.update(answer=answer, choices=texts)
        for k in _KALE_EXTRA:
            if k in row and row[k] is not None:
                out[k] = row[k]
        return out
    if _missing(choices) or choices == []:
        raise _bad(f"missing or empty {ccol!r}")
    pairs = _labelled(choices, ccol)
    if _missing(a):
        if fmt == "medqa" and not columns:
            a = row.get("answer")  # answer_idx absent: the answer text (or letter)
            acol = "answer"
        if _missing(a):
            raise _bad(f"missing or empty {acol!r}")
    if fmt == "csqa":
        answer = _by_label(a, pairs, acol)
    elif fmt == "mmlu":
        answer = _gold(a, pairs, acol, index_first=True)
    else:  # medqa: answer_idx is a label or an index; a given answer text must agree with it
        answer = _gold(a, pairs, acol, index_first=True)
        text = row.get("answer") if acol != "answer" and not (columns or {}).get("answer") else None
        if isinstance(text, str) and text.strip() and text.strip().upper() not in {lab.upper() for lab, _ in pairs} \
                and normalize(text) != normalize(answer):
            raise _bad(f"answer {text.strip()!r} disagrees with {acol} {str(a).strip()!r} ({answer!r})",
                       "answer_not_in_choices")
    out.update(answer=answer, choices=[t for _, t in pairs])
    return out
