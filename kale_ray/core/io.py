"""Local JSON / JSONL files written atomically (a temp file beside the target, then a rename), read back
strictly. The one writer of every method's small local outputs; URIs go through runtime.storage.Storage.

Pure: json + pathlib. numpy scalars and arrays are written as numbers and lists.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping


def json_default(obj: Any) -> Any:
    """numpy scalars / arrays (anything with ``tolist`` / ``item``) and sets, without importing numpy."""
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    item = getattr(obj, "item", None)
    if callable(item):
        return item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def json_default_or_str(obj: Any) -> Any:
    """:func:`json_default`, else the object's ``str`` (for rejected rows, which may hold anything)."""
    try:
        return json_default(obj)
    except TypeError:
        return str(obj)


def _atomic(path: str | Path, text_chunks: Iterable[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            for chunk in text_chunks:
                f.write(chunk)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]], *,
                default: Callable[[Any], Any] = json_default) -> int:
    """One JSON object per line, atomically; returns the number of rows written."""
    n = 0

    def lines():
        nonlocal n
        for row in rows:
            n += 1
            yield json.dumps(row, default=default, ensure_ascii=False) + "\n"

    _atomic(path, lines())
    return n


def write_json(path: str | Path, obj: Any) -> None:
    """An indented JSON document, atomically."""
    _atomic(path, [json.dumps(obj, indent=2, default=json_default, ensure_ascii=False)])


def read_jsonl(path: str | Path) -> list[dict]:
    """Every non-blank line of a JSONL file the project wrote (a bad line names the file and line)."""
    out = []
    with Path(path).open() as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
    return out
