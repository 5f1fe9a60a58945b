"""Duplicate question ids across a QA file, found before the shards run in parallel.

One constant-memory scan keeps a 64-bit digest and a line number per id; only lines whose digest
repeats are read again for their exact ids. Each shard task gets its part (``dups_by_shard``) and
rejects a repeated id as ``duplicate_id`` naming the file, its line and the first line.
"""
from __future__ import annotations

import bisect
import json
import re
from array import array

import numpy as np

from kale_ray.core.kg import MAX_LINE_BYTES


# The id as the first key of a line (what write_qa_jsonl and json.dumps write): read without
# parsing the line. A value with an escape, a number, or "id" elsewhere goes through json.loads.
_ID_FIRST = re.compile(rb'\s*\{\s*"id"\s*:\s*"([^"\\]*)"')


def _line_id(raw: bytes) -> bytes | None:
    """The id a QA line carries (as read_qa_jsonl reads it), or None (none given: its generated id is unique)."""
    m = _ID_FIRST.match(raw)
    if m:
        return m.group(1) or None
    if b'"id"' not in raw:
        return None
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not obj.get("id"):
        return None
    return str(obj["id"]).encode("utf-8", "surrogatepass")


def _id_lines(path: str, max_lines: int = 0):
    """(line number, id bytes) of every line of a QA file that carries an id; one bounded read."""
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            lineno += 1
            if max_lines and lineno > max_lines:
                return
            if len(raw) > MAX_LINE_BYTES:  # rejected by the reader as line_too_long; its rest dropped
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(MAX_LINE_BYTES + 1)
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            rid = _line_id(raw)
            if rid is not None:
                yield lineno, rid


def duplicate_id_lines(path: str, max_lines: int = 0) -> dict[str, tuple[int, list[int]]]:
    """``{id: (first line, [every line carrying it])}`` for the ids that more than one line of the file carries.

    Globally correct while the shards are read in parallel, in memory that stays small: a first
    read keeps a 64-bit digest (Python's hash of the id's bytes: both reads run in this process)
    and a line number per id (16 bytes a line: 16 MB at 1e6 questions); only lines whose digest
    repeats are read again, for their exact ids (so a digest collision never rejects a row).
    "First" is the first line that carries the id, whatever else that line holds.
    """
    digests, lines = array("q"), array("Q")
    for lineno, rid in _id_lines(path, max_lines):
        digests.append(hash(rid))
        lines.append(lineno)
    if len(digests) < 2:
        return {}
    d = np.frombuffer(digests, dtype=np.int64)
    _, inverse, counts = np.unique(d, return_inverse=True, return_counts=True)
    again = np.frombuffer(lines, dtype=np.uint64)[counts[inverse] > 1]
    if not len(again):
        return {}
    wanted = set(again.tolist())
    by_id: dict[str, list[int]] = {}
    for lineno, rid in _id_lines(path, max_lines):
        if lineno in wanted:
            by_id.setdefault(_text(rid), []).append(lineno)
    return {i: (ls[0], ls) for i, ls in by_id.items() if len(ls) > 1}


def _text(rid: bytes) -> str:
    try:
        return rid.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:  # the reader rejects such a line (bad_encoding): no row has this id
        return rid.decode("utf-8", "replace")


def dups_by_shard(dups: dict[str, tuple[int, list[int]]], slices: list[tuple[int, int, int]]) -> dict[int, str]:
    """Each shard's part of ``duplicate_id_lines`` as the JSON its task reads (only shards with duplicates)."""
    starts = [fl for _, _, fl in slices]
    out: dict[int, dict] = {}
    for rid, (first, ls) in dups.items():
        for line in ls:
            shard = bisect.bisect_right(starts, line) - 1
            out.setdefault(shard, {}).setdefault(rid, [first, []])[1].append(line)
    return {k: json.dumps(v) for k, v in out.items()}
