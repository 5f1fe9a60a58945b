"""Held-out general questions (``eval.general``): does fine-tuning on the KG cost general ability?

``builtin:general`` is ``kale_ray/data/general_qa.jsonl``: 200 four-choice general-knowledge questions
(everyday science, geography, history, arithmetic in words, language, common sense, units), none about
the training KG's biomedical types. Any QA JSONL the QA reader accepts works too; an optional
``category`` per row groups the accuracy. The questions are asked in the evaluation's one generation
pass as items of ``kind="general"`` (no hop probes), scored like the test questions, and kept out of
the multi-hop metrics (their own ``general_predictions.jsonl`` and ``general`` section).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kale_ray.config import ConfigError
from kale_ray.core.io import read_jsonl
from kale_ray.core.qa import QAExample, QAFormatError, read_qa_jsonl

BUILTIN_GENERAL = {"general": "general_qa.jsonl"}  # builtin:<name> -> file under kale_ray/data
PREDICTIONS = "general_predictions.jsonl"


def general_file(spec: str, key: str = "general") -> Path | None:
    """The QA file ``eval.general`` names: None for "", the shipped file for ``builtin:<name>``, else the
    path; an unknown builtin name (``ConfigError``) or a missing file (``FileNotFoundError``) names ``key``."""
    if not spec:
        return None
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_GENERAL:
            raise ConfigError(f"{key}: unknown builtin QA set {spec!r} (known: "
                              f"{', '.join('builtin:' + k for k in BUILTIN_GENERAL)})")
        return Path(__file__).resolve().parents[2] / "data" / BUILTIN_GENERAL[name]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}: no such QA file: {spec}")
    return path


def read_general(path: str | Path) -> list[tuple[QAExample, str]]:
    """(question, category) of every row; a bad row, a repeated id or an empty file raises
    ``QAFormatError`` naming file and line (the QA reader's ``on_error="error"``)."""
    path = Path(path)
    questions = list(read_qa_jsonl(path, on_error="error"))
    rows = _rows(path)
    if len(rows) != len(questions):  # the reader yields one example per non-blank line
        raise RuntimeError(f"{path}: read {len(questions)} questions from {len(rows)} rows")
    if not questions:
        raise QAFormatError(f"{path}: no questions")
    seen: dict[str, int] = {}
    out = []
    for q, (lineno, obj) in zip(questions, rows):
        if q.id in seen:
            raise QAFormatError(f"{path}:{lineno}: id {q.id!r} already used on line {seen[q.id]}")
        seen[q.id] = lineno
        category = obj.get("category", "")
        if not isinstance(category, str):
            raise QAFormatError(f"{path}:{lineno}: 'category' must be a string")
        out.append((q, category))
    return out


def _rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, JSON object) of the non-blank lines (the file has passed the reader)."""
    out = []
    for lineno, raw in enumerate(path.read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        text = raw.decode("utf-8").strip()
        if text:
            out.append((lineno, json.loads(text)))
    return out


def general_items(rows: list[tuple[QAExample, str]]) -> list[dict[str, Any]]:
    """One evaluation item per general question (``kind="general"``, no probes)."""
    return [{"item_id": f"general#{q.id}", "qid": f"general#{q.id}", "kind": "general", "category": category,
             "question": q.question, "choices": list(q.choices), "all_answers": list(q.all_answers or [q.answer]),
             "num_hops": 0} for q, category in rows]


def general_correct(eval_dir: str | Path) -> dict[str, bool]:
    """item id -> correct for the general questions an evaluation answered (skipped ones left out)."""
    path = Path(eval_dir) / PREDICTIONS
    if not path.exists():
        return {}
    return {r["item_id"]: bool(r["correct"]) for r in read_jsonl(path) if not r.get("skipped")}
