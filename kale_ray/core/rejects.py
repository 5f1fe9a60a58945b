"""Every dropped row has a reason: a small counter that also keeps the rows aside."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterable


class Rejects:
    """Collects rejected rows with a ``reason``; counts per reason.

    >>> r = Rejects(); r.add("malformed_line", file="kg.tsv", line=3, text="a\\tb")
    >>> r.counts()
    {'malformed_line': 1}
    """

    def __init__(self, keep: int = 1_000_000) -> None:
        self._counts: Counter[str] = Counter()
        self.rows: list[dict[str, Any]] = []
        self._keep = keep

    def add(self, reason: str, **record: Any) -> None:
        self._counts[reason] += 1
        if len(self.rows) < self._keep:
            self.rows.append({"reason": reason, **record})

    def extend(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            row = dict(row)
            self.add(row.pop("reason"), **row)

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def total(self) -> int:
        return sum(self._counts.values())

    def __len__(self) -> int:
        return self.total()

    def write_jsonl(self, path: str | Path) -> None:
        from kale_ray.core.io import json_default_or_str, write_jsonl

        write_jsonl(path, self.rows, default=json_default_or_str)
