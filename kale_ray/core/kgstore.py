"""The KG as a shared, columnar artifact: flat numpy arrays, cached on disk, shared by workers.

``KnowledgeGraph`` (``kale_ray.core.kg``) keeps Python lists/dicts/sets; every Ray worker that
unpickles it holds its own copy (>3 GB at 1M entities). ``ColumnarKG`` keeps the same data as a
handful of flat arrays:

* strings (entity ids, names, aliases, relations, surface forms) as one ``uint8`` byte buffer plus
  ``int64`` offsets, decoded on access;
* entity lookup ``str -> int`` by a sorted array of 64-bit hashes of the ids plus a permutation
  (the string is verified on a hit, so hash collisions are harmless);
* triple membership by a (head, relation, tail)-sorted order: a per-head CSR of ``r * E + t``
  keys searched with ``np.searchsorted`` (no Python set);
* the path-search ``GraphIndex`` arrays and the search CSRs derived from them
  (``kale_ray.core.search.search_arrays``, ``ps_*``), stored so workers never rebuild or copy them
  (``index()`` attaches them: every worker's searches read the one shared copy);
* a surface-form index (normalised id/name/aliases, hashed and sorted, with entity ids) for
  ``ColumnarLinker``, the array twin of ``kale_ray.core.qa.EntityLinker``.

``to_arrays()`` / ``ColumnarKG.from_arrays`` wrap the arrays without copying (``ray.put`` them
once; every worker on a node then maps the same object-store copy), ``save`` / ``open`` use
``.npy`` files opened with ``mmap_mode='r'``, and ``load_columnar_kg`` builds once from the source
files (fast ``pyarrow.csv`` path for TSV/CSV, the line reader of ``kale_ray.core.kg`` otherwise)
and caches the artifact keyed by the files' path/size/mtime.

Pure core: numpy and pyarrow only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from kale_ray.core.kg import (
    MAX_LINE_BYTES,
    SKIPPED_FILE,
    GraphIndex,
    KGFormatError,
    KnowledgeGraph,
    _format_of,
    builtin_kg_files,
    is_header,
    kg_source_files,
    load_kg,
    note_header,
    read_bytes,
    read_kg_file,
    read_names,
)
from kale_ray.core.search import (
    REQUIRED_SEARCH_ARRAYS,
    SEARCH_ARRAY_NAMES,
    attach_landmark_table,
    attach_search_arrays,
    build_landmark_table,
    search_arrays,
)
from kale_ray.core.qa import _ARTICLES as _QA_ARTICLES
from kale_ray.core.qa import _NONWORD as _QA_NONWORD
from kale_ray.core.qa import normalize
from kale_ray.core.rejects import Rejects

FORMAT_VERSION = 2  # 2: the path-search arrays (ps_*, kale_ray.core.search.search_arrays)
KEEP_DUPLICATE_RECORDS = 100  # duplicate triples: counted, only the first few kept as records
KEEP_REJECT_ROWS_IN_META = 1000

PARSER_VERSION = 2  # 2: BOM, control characters, TSV headers, strict JSONL fields, compressed files (issue 13)
# bytes the line reader must judge: C0 controls but TAB/LF/CR, DEL, C1 controls (UTF-8 \xc2\x80-\x9f), a BOM
_CONTROL_BYTES = {
    "tsv": re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\xc2[\x80-\x9f]|\xef\xbb\xbf"),
    "csv": re.compile(rb"[\x00-\x0c\x0e-\x1f\x7f]|\xc2[\x80-\x9f]|\xef\xbb\xbf"),
}


# --------------------------------------------------------------------------- #
# Hashing and string tables
# --------------------------------------------------------------------------- #
def _norm(text: str) -> str:
    """``kale_ray.core.qa.normalize``; ASCII text skips the Unicode steps (identity for ASCII)."""
    if text.isascii():
        text = text.lower().replace("_", " ").replace("-", " ")
        text = _QA_NONWORD.sub(" ", text)
        text = _QA_ARTICLES.sub(" ", text)
        return " ".join(text.split())
    return normalize(text)


def _h64(b: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little")


def _hash_strings(strings: Iterable[str]) -> np.ndarray:
    return np.fromiter((_h64(s.encode("utf-8")) for s in strings), dtype=np.uint64)


def _pack_strings(strings) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 buffer, int64 offsets of len n+1) of a list of str or a pyarrow string array."""
    import pyarrow as pa

    arr = strings if isinstance(strings, (pa.Array, pa.ChunkedArray)) else pa.array(list(strings), type=pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], type=pa.large_string())
    arr = arr.cast(pa.large_string())
    n = len(arr)
    bufs = arr.buffers()
    if n == 0:
        return np.zeros(0, np.uint8), np.zeros(1, np.int64)
    offs = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset: arr.offset + n + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    start, end = int(offs[0]), int(offs[-1])
    return np.array(data[start:end], dtype=np.uint8), (offs - start).astype(np.int64)


class StringColumn(Sequence):
    """A read-only sequence of str over (uint8 buffer, int64 offsets); decodes on access."""

    __slots__ = ("buf", "off")

    def __init__(self, buf: np.ndarray, off: np.ndarray) -> None:
        self.buf, self.off = buf, off

    def __len__(self) -> int:
        return len(self.off) - 1

    def raw(self, i: int) -> bytes:
        return self.buf[int(self.off[i]): int(self.off[i + 1])].tobytes()

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} strings")
        return self.raw(i).decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        buf, off = self.buf, self.off
        for i in range(len(self)):
            yield buf[int(off[i]): int(off[i + 1])].tobytes().decode("utf-8")

    def __repr__(self) -> str:
        return f"StringColumn({len(self)} strings)"


class HashIndex(Mapping):
    """``str -> position`` over a StringColumn by sorted 64-bit hashes + permutation."""

    __slots__ = ("col", "hashes", "perm")

    def __init__(self, col: StringColumn, hashes: np.ndarray, perm: np.ndarray) -> None:
        self.col, self.hashes, self.perm = col, hashes, perm

    def find(self, s: str) -> int:
        if not isinstance(s, str):
            return -1
        b = s.encode("utf-8", "surrogatepass")
        h = np.uint64(_h64(b))
        i = int(np.searchsorted(self.hashes, h, side="left"))
        n = len(self.hashes)
        while i < n and self.hashes[i] == h:  # collisions: verify the string
            p = int(self.perm[i])
            if self.col.raw(p) == b:
                return p
            i += 1
        return -1

    def __getitem__(self, s: str) -> int:
        p = self.find(s)
        if p < 0:
            raise KeyError(s)
        return p

    def __contains__(self, s) -> bool:
        return self.find(s) >= 0

    def get(self, s, default=None):
        p = self.find(s)
        return default if p < 0 else p

    def __iter__(self) -> Iterator[str]:
        return iter(self.col)

    def __len__(self) -> int:
        return len(self.col)


def _sorted_hashes(col_strings: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    h = _hash_strings(col_strings)
    perm = np.argsort(h, kind="stable").astype(np.int64)
    return h[perm], perm


class _NamesView(Mapping):
    """entity id -> display name (only entities of the KG that have one)."""

    def __init__(self, kg: "ColumnarKG") -> None:
        self._kg = kg

    def _pos(self, eid) -> int:
        p = self._kg.entity_index.find(eid) if isinstance(eid, str) else -1
        return p if p >= 0 and self._kg._has_name[p] else -1

    def __getitem__(self, eid: str) -> str:
        p = self._pos(eid)
        if p < 0:
            raise KeyError(eid)
        return self._kg._name_col[p]

    def __contains__(self, eid) -> bool:
        return self._pos(eid) >= 0

    def get(self, eid, default=None):
        p = self._pos(eid)
        return default if p < 0 else self._kg._name_col[p]

    def __iter__(self) -> Iterator[str]:
        ents = self._kg.entities
        for p in np.flatnonzero(self._kg._has_name):
            yield ents[int(p)]

    def __len__(self) -> int:
        return int(np.count_nonzero(self._kg._has_name))


class _AliasesView(Mapping):
    """entity id -> list of aliases (only entities that have some)."""

    def __init__(self, kg: "ColumnarKG") -> None:
        self._kg = kg

    def _pos(self, eid) -> int:
        kg = self._kg
        p = kg.entity_index.find(eid) if isinstance(eid, str) else -1
        return p if p >= 0 and kg._alias_ptr[p + 1] > kg._alias_ptr[p] else -1

    def _list(self, p: int) -> list[str]:
        kg = self._kg
        return [kg._alias_col[j] for j in range(int(kg._alias_ptr[p]), int(kg._alias_ptr[p + 1]))]

    def __getitem__(self, eid: str) -> list[str]:
        p = self._pos(eid)
        if p < 0:
            raise KeyError(eid)
        return self._list(p)

    def __contains__(self, eid) -> bool:
        return self._pos(eid) >= 0

    def get(self, eid, default=None):
        p = self._pos(eid)
        return default if p < 0 else self._list(p)

    def __iter__(self) -> Iterator[str]:
        ents = self._kg.entities
        for p in np.flatnonzero(np.diff(self._kg._alias_ptr) > 0):
            yield ents[int(p)]

    def __len__(self) -> int:
        return int(np.count_nonzero(np.diff(self._kg._alias_ptr) > 0))


# --------------------------------------------------------------------------- #
# The columnar KG
# --------------------------------------------------------------------------- #
_ARRAY_NAMES = (
    "ent_buf", "ent_off", "ent_hash", "ent_perm",
    "rel_buf", "rel_off",
    "name_buf", "name_off", "has_name",
    "alias_buf", "alias_off", "alias_ptr",
    "triples", "head_ptr", "spo_key",
    "gi_indptr", "gi_nbr", "gi_rel", "gi_tid", "gi_inv",
    "sf_hash", "sf_ent", "sf_buf", "sf_off",
) + REQUIRED_SEARCH_ARRAYS
_LANDMARK_ARRAY_NAMES = ("lm_nodes", "lm_dist")  # added to a cache folder on first use (ensure_landmarks)
_OPTIONAL_ARRAY_NAMES = tuple(k for k in SEARCH_ARRAY_NAMES if k not in REQUIRED_SEARCH_ARRAYS) + _LANDMARK_ARRAY_NAMES


def _rejects_to_meta(rejects: Rejects) -> dict:
    return {"counts": rejects.counts(), "rows": rejects.rows[:KEEP_REJECT_ROWS_IN_META]}


def _rejects_from_meta(d: dict) -> Rejects:
    r = Rejects()
    r.rows = [dict(x) for x in d.get("rows", [])]
    r._counts.update(d.get("counts", {}))
    return r


class ColumnarKG:
    """Array-backed, read-only stand-in for ``KnowledgeGraph`` (see the module docstring)."""

    def __init__(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"ColumnarKG format version {meta.get('version')} != {FORMAT_VERSION}")
        missing = [k for k in _ARRAY_NAMES if k not in arrays]
        if missing:
            raise ValueError(f"ColumnarKG arrays missing: {missing}")
        self.meta = meta
        self.arrays = arrays
        a = arrays
        self.source: str = meta.get("source", "")
        self.rejects: Rejects = _rejects_from_meta(meta.get("rejects", {}))
        self.undirected: bool = bool(meta.get("undirected", True))
        self.max_form_len: int = int(meta.get("max_form_len", 1))
        self._ent_col = StringColumn(a["ent_buf"], a["ent_off"])
        self.entities: StringColumn = self._ent_col
        self.entity_index = HashIndex(self._ent_col, a["ent_hash"], a["ent_perm"])
        self.relations: list[str] = list(StringColumn(a["rel_buf"], a["rel_off"]))
        self.relation_index: dict[str, int] = {r: i for i, r in enumerate(self.relations)}
        self._name_col = StringColumn(a["name_buf"], a["name_off"])
        self._has_name = a["has_name"]
        self._alias_col = StringColumn(a["alias_buf"], a["alias_off"])
        self._alias_ptr = a["alias_ptr"]
        self.names = _NamesView(self)
        self.aliases = _AliasesView(self)
        self.triples: np.ndarray = a["triples"]
        self._head_ptr = a["head_ptr"]
        self._spo_key = a["spo_key"]
        self._sf_col = StringColumn(a["sf_buf"], a["sf_off"])
        self._indexes: dict[bool, GraphIndex] = {}
        self.path: str | None = None  # the cache folder this KG is memory-mapped from (``open``), if any

    # ----- text ------------------------------------------------------------
    def entity_name(self, e: int | str) -> str:
        if isinstance(e, (int, np.integer)):
            p = int(e)
            eid = self._ent_col[p]
            if self._has_name[p]:
                name = self._name_col[p]
                if name:
                    return name
            return eid.replace("_", " ")
        return self.names.get(e) or e.replace("_", " ")

    def relation_name(self, r: int | str) -> str:
        rid = self.relations[r] if isinstance(r, (int, np.integer)) else r
        return rid.replace("_", " ")

    def verbalize(self, h: int, r: int, t: int) -> str:
        return f"{self.entity_name(h)} {self.relation_name(r)} {self.entity_name(t)}"

    # ----- facts -----------------------------------------------------------
    def has_triple(self, h: int, r: int, t: int) -> bool:
        h, r, t = int(h), int(r), int(t)
        E, R = self.num_entities, self.num_relations
        if not (0 <= h < E and 0 <= r < R and 0 <= t < E):
            return False
        lo, hi = int(self._head_ptr[h]), int(self._head_ptr[h + 1])
        if lo == hi:
            return False
        key = r * E + t
        i = lo + int(np.searchsorted(self._spo_key[lo:hi], key))
        return i < hi and int(self._spo_key[i]) == key

    def has_named_triple(self, h: str, r: str, t: str) -> bool:
        try:
            return self.has_triple(self.entity_index[h], self.relation_index[r], self.entity_index[t])
        except KeyError:
            return False

    def tails(self, h: int, r: int) -> np.ndarray:
        """Sorted tail ids of (h, r, ?)."""
        E = self.num_entities
        lo, hi = int(self._head_ptr[h]), int(self._head_ptr[h + 1])
        seg = self._spo_key[lo:hi]
        a, b = np.searchsorted(seg, [r * E, (r + 1) * E])
        return seg[a:b] - r * E

    @property
    def num_entities(self) -> int:
        return len(self._ent_col)

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

    def index(self, undirected: bool = True) -> GraphIndex:
        """The path-search CSR; the stored one when ``undirected`` matches the build, else built once."""
        undirected = bool(undirected)
        if undirected not in self._indexes:
            if undirected == self.undirected:
                a = self.arrays
                gi = self._indexes[undirected] = GraphIndex(
                    indptr=a["gi_indptr"], nbr=a["gi_nbr"], rel=a["gi_rel"], tid=a["gi_tid"], inv=a["gi_inv"],
                    num_nodes=self.num_entities,
                )
                attach_search_arrays(gi, {k: a[k] for k in SEARCH_ARRAY_NAMES if k in a})
                if all(k in a for k in _LANDMARK_ARRAY_NAMES):  # shared landmark distances (ALT)
                    attach_landmark_table(gi, {k: a[k] for k in _LANDMARK_ARRAY_NAMES})
            else:
                self._indexes[undirected] = GraphIndex.build(self.triples, self.num_entities, undirected=undirected)
        return self._indexes[undirected]

    def to_knowledge_graph(self) -> KnowledgeGraph:
        """A plain KnowledgeGraph copy (for code that needs the Python structures)."""
        return KnowledgeGraph(
            entities=list(self.entities), relations=list(self.relations), triples=np.array(self.triples),
            names=dict(self.names.items()), aliases={k: v for k, v in self.aliases.items()},
            rejects=self.rejects, source=self.source,
        )

    # ----- sharing and persistence -------------------------------------------
    def to_arrays(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta = dict(self.meta)
        meta["rejects"] = _rejects_to_meta(self.rejects)
        return meta, dict(self.arrays)

    @classmethod
    def from_arrays(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "ColumnarKG":
        """Wrap the arrays as they are (no copy: works on read-only object-store / mmap arrays)."""
        return cls(meta, arrays)

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta, arrays = self.to_arrays()
        for k, v in arrays.items():
            np.save(d / f"{k}.npy", np.asarray(v), allow_pickle=False)
        (d / "meta.json").write_text(json.dumps(meta, default=str))
        return d

    @classmethod
    def open(cls, directory: str | Path, mmap: bool = True) -> "ColumnarKG":
        d = Path(directory)
        meta = json.loads((d / "meta.json").read_text())
        names = _ARRAY_NAMES + tuple(k for k in _OPTIONAL_ARRAY_NAMES if (d / f"{k}.npy").exists())
        arrays = {k: np.load(d / f"{k}.npy", mmap_mode="r" if mmap else None, allow_pickle=False) for k in names}
        # Plain ndarray views of the maps: same pages, without np.memmap's per-slice Python overhead
        # (a third of the search's time went to memmap.__getitem__/__array_finalize__).
        arrays = {k: (v.view(np.ndarray) if isinstance(v, np.memmap) else v) for k, v in arrays.items()}
        kg = cls(meta, arrays)
        kg.path = str(d) if mmap else None
        return kg

    # ----- construction ----------------------------------------------------
    @classmethod
    def from_kg(cls, kg: KnowledgeGraph, undirected: bool = True) -> "ColumnarKG":
        """Convert a KnowledgeGraph (names/aliases of ids that are not entities are dropped)."""
        return _build(kg.entities, kg.relations, np.asarray(kg.triples, dtype=np.int64).reshape(-1, 3),
                      kg.names, kg.aliases, kg.rejects, kg.source, undirected)

    def __repr__(self) -> str:
        return (f"ColumnarKG(source={self.source!r}, entities={self.num_entities}, relations={self.num_relations}, "
                f"triples={len(self.triples)}, nbytes={self.nbytes()})")


def _build(entities, relations: list[str], triples: np.ndarray, names: Mapping, aliases: Mapping,
           rejects: Rejects, source: str, undirected: bool) -> ColumnarKG:
    """All arrays from entity strings (list or pyarrow array), relations, unique id triples, names."""
    ent_buf, ent_off = _pack_strings(entities)
    ent_col = StringColumn(ent_buf, ent_off)
    ent_list = entities if isinstance(entities, list) else (
        entities.to_pylist() if hasattr(entities, "to_pylist") else list(ent_col))
    E = len(ent_list)
    ent_hash, ent_perm = _sorted_hashes(ent_list)
    rel_buf, rel_off = _pack_strings(list(relations))
    R = len(relations)

    # names / aliases, per entity
    has_name = np.zeros(E, dtype=bool)
    name_list = [""] * E
    alias_counts = np.zeros(E, dtype=np.int64)
    alias_items: list[list[str]] = []
    alias_by_pos: dict[int, list[str]] = {}
    if names or aliases:
        pos = {e: i for i, e in enumerate(ent_list)}
        for eid, nm in (names or {}).items():
            p = pos.get(eid)
            if p is not None:
                has_name[p] = True
                name_list[p] = nm
        for eid, als in (aliases or {}).items():
            p = pos.get(eid)
            if p is not None and als:
                alias_by_pos[p] = list(als)
        for p in sorted(alias_by_pos):
            alias_counts[p] = len(alias_by_pos[p])
            alias_items.append(alias_by_pos[p])
        del pos
    name_buf, name_off = _pack_strings(name_list)
    alias_ptr = np.zeros(E + 1, dtype=np.int64)
    np.cumsum(alias_counts, out=alias_ptr[1:])
    alias_buf, alias_off = _pack_strings([a for als in alias_items for a in als])

    # membership: per-head CSR of r * E + t, sorted
    triples = np.ascontiguousarray(triples, dtype=np.int64).reshape(-1, 3)
    h = triples[:, 0]
    key = triples[:, 1] * E + triples[:, 2]
    if E * max(R, 1) * max(E, 1) < (1 << 62):
        order = np.argsort(h * (R * E) + key)  # one sort of a composite key (no overflow)
    else:
        order = np.lexsort((key, h))
    spo_key = key[order]
    head_ptr = np.zeros(E + 1, dtype=np.int64)
    np.cumsum(np.bincount(h, minlength=E), out=head_ptr[1:])
    gi = GraphIndex.build(triples, E, undirected=undirected)

    # surface forms: (normalised form, entity) pairs as in EntityLinker
    sf_keys: list[str] = []
    sf_ents: list[int] = []
    max_len = 1
    for i, eid in enumerate(ent_list):
        if not alias_counts[i] and not (has_name[i] and name_list[i]):
            k = _norm(eid)  # its display name (id with '_' as ' ') normalises the same
            if k:
                sf_keys.append(k)
                sf_ents.append(i)
            continue
        forms = {eid}
        if has_name[i] and name_list[i]:
            forms.add(name_list[i])
        if alias_counts[i]:
            forms.update(alias_by_pos[i])
        keys = {_norm(f) for f in forms}
        for k in keys:
            if k:
                sf_keys.append(k)
                sf_ents.append(i)
    for k in set(sf_keys):
        n = len(k.split())
        if n > max_len:
            max_len = n
    sf_hash_raw = _hash_strings(sf_keys)
    sf_ent_raw = np.asarray(sf_ents, dtype=np.int64)
    sf_order = np.lexsort((sf_ent_raw, sf_hash_raw))
    sf_buf, sf_off = _pack_strings([sf_keys[j] for j in sf_order])
    meta = {
        "version": FORMAT_VERSION, "source": source, "undirected": bool(undirected),
        "num_entities": E, "num_relations": R, "num_triples": int(len(triples)),
        "max_form_len": int(max_len) if sf_keys else 1, "rejects": _rejects_to_meta(rejects),
    }
    arrays = {
        "ent_buf": ent_buf, "ent_off": ent_off, "ent_hash": ent_hash, "ent_perm": ent_perm,
        "rel_buf": rel_buf, "rel_off": rel_off,
        "name_buf": name_buf, "name_off": name_off, "has_name": has_name,
        "alias_buf": alias_buf, "alias_off": alias_off, "alias_ptr": alias_ptr,
        "triples": triples, "head_ptr": head_ptr, "spo_key": spo_key,
        "gi_indptr": gi.indptr, "gi_nbr": gi.nbr, "gi_rel": gi.rel, "gi_tid": gi.tid, "gi_inv": gi.inv,
        "sf_hash": sf_hash_raw[sf_order], "sf_ent": sf_ent_raw[sf_order].astype(np.int32), "sf_buf": sf_buf, "sf_off": sf_off,
    }
    arrays.update(search_arrays(gi, triples))  # shared by every worker (see ColumnarKG.index)
    kg = ColumnarKG(meta, arrays)
    kg.rejects = rejects
    return kg


# --------------------------------------------------------------------------- #
# Linking
# --------------------------------------------------------------------------- #
class ColumnarLinker:
    """``EntityLinker`` over the surface-form arrays of a ColumnarKG (nothing grows with |E|)."""

    def __init__(self, kg: ColumnarKG) -> None:
        self.kg = kg
        a = kg.arrays
        self._hash = a["sf_hash"]
        self._ent = a["sf_ent"]
        self._keys = kg._sf_col
        self.max_len = kg.max_form_len

    def lookup(self, key: str) -> list[str]:
        """Sorted entity ids whose normalised form is exactly ``key``."""
        if not key:
            return []
        b = key.encode("utf-8", "surrogatepass")
        h = np.uint64(_h64(b))
        lo = int(np.searchsorted(self._hash, h, side="left"))
        if lo >= len(self._hash) or self._hash[lo] != h:
            return []
        hi = int(np.searchsorted(self._hash, h, side="right"))
        ents = self.kg.entities
        out = {ents[int(self._ent[j])] for j in range(lo, hi) if self._keys.raw(j) == b}
        return sorted(out)

    def link_exact(self, text: str) -> list[str]:
        return self.lookup(_norm(text))

    def link_mentions(self, text: str) -> list[str]:
        tokens = _norm(text).split()
        found: list[str] = []
        seen: set[str] = set()
        i = 0
        while i < len(tokens):
            for n in range(min(self.max_len, len(tokens) - i), 0, -1):
                hits = self.lookup(" ".join(tokens[i: i + n]))
                if hits:
                    for eid in hits:
                        if eid not in seen:
                            seen.add(eid)
                            found.append(eid)
                    i += n
                    break
            else:
                i += 1
        return found


# --------------------------------------------------------------------------- #
# Loading from files (fast pyarrow path with a line-reader fallback)
# --------------------------------------------------------------------------- #
def _fast_read(path: Path, rejects: Rejects | None = None):
    """(h, r, t) pyarrow string arrays of a clean TSV/CSV file, or None when the line reader must decide.

    The fast path is taken only when pyarrow's parse cannot differ from ``read_triples``: no
    comment lines, no bare carriage returns, no control characters or inner BOM, no line over
    MAX_LINE_BYTES, (CSV) no quotes, every row 3 non-empty columns with no surrounding whitespace,
    valid UTF-8. A leading BOM is dropped and a header on line 1 skipped (noted in ``rejects``)
    as the line reader does; compressed files are decompressed first.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    fmt = _format_of(path)
    if fmt not in ("tsv", "csv"):
        return None
    try:
        data = read_bytes(path)
    except KGFormatError:  # a corrupt compressed file: the line reader reports it
        return None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data or data[:1] in (b"\n", b"\r"):
        return None
    if data.startswith(b"#") or b"\n#" in data:
        return None
    if b"\r" in data and data.count(b"\r") != data.count(b"\r\n"):
        return None
    if fmt == "csv" and b'"' in data:
        return None
    if _CONTROL_BYTES[fmt].search(data):
        return None
    buf = np.frombuffer(data, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    bounds = np.concatenate(([-1], nl, [len(buf)] if (len(nl) == 0 or nl[-1] != len(buf) - 1) else []))
    if len(bounds) > 1 and int(np.max(np.diff(bounds))) > MAX_LINE_BYTES:  # line incl. newline
        return None
    first = data[: int(nl[0]) if len(nl) else len(data)]
    try:
        first_text = first.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return None
    skip_header = is_header(first_text, fmt)
    invalid = []

    def handler(row):
        invalid.append(row)
        return "skip"

    try:
        table = pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(column_names=["h", "r", "t"], skip_rows=1 if skip_header else 0,
                                           block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", quote_char=False,
                                             escape_char=False, newlines_in_values=False, ignore_empty_lines=True,
                                             invalid_row_handler=handler),
            convert_options=pacsv.ConvertOptions(column_types={"h": pa.string(), "r": pa.string(), "t": pa.string()},
                                                 strings_can_be_null=False, check_utf8=True),
        )
    except (pa.ArrowInvalid, pa.ArrowException, UnicodeDecodeError):
        return None
    if invalid:
        return None
    cols = []
    import pyarrow.compute as pc

    for name in ("h", "r", "t"):
        col = table.column(name)
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        if len(col) and (pc.any(pc.equal(pc.utf8_length(col), 0)).as_py()):
            return None  # empty field: the line reader names it
        cols.append(col)
    # whitespace around a field: Python's str.strip decides, checked on the distinct values only
    for col in cols:
        for s in pc.unique(col).to_pylist():
            if s != s.strip():
                return None
    if skip_header and rejects is not None:
        note_header(path, 1, first_text, rejects)
    return cols


def _read_file(path: Path, on_error: str, rejects: Rejects, jsonl_numbers: bool = False):
    import pyarrow as pa

    if not path.exists():
        raise FileNotFoundError(f"KG file not found: {path}")
    fast = _fast_read(path, rejects)
    if fast is not None:
        return fast
    hs, rs, ts = [], [], []
    for h, r, t in read_kg_file(path, on_error=on_error, rejects=rejects, jsonl_numbers=jsonl_numbers):
        hs.append(h); rs.append(r); ts.append(t)
    return [pa.array(hs, type=pa.string()), pa.array(rs, type=pa.string()), pa.array(ts, type=pa.string())]


def _encode_triples(parts: list[list], rejects: Rejects):
    """Entity/relation strings in first-appearance order + unique id triples (first occurrence kept)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    H = pa.chunked_array([p[0] for p in parts], type=pa.string()).combine_chunks()
    Rc = pa.chunked_array([p[1] for p in parts], type=pa.string()).combine_chunks()
    T = pa.chunked_array([p[2] for p in parts], type=pa.string()).combine_chunks()
    n = len(H)
    # entities appear h0, t0, h1, t1, ...: interleave so unique() keeps KnowledgeGraph's order
    both = pa.concat_arrays([H, T])
    inter = np.empty(2 * n, dtype=np.int64)
    inter[0::2] = np.arange(n)
    inter[1::2] = np.arange(n) + n
    ents = pc.unique(pc.take(both, pa.array(inter)))
    rels = pc.unique(Rc)
    hi = pc.index_in(H, value_set=ents).to_numpy(zero_copy_only=False).astype(np.int64)
    ti = pc.index_in(T, value_set=ents).to_numpy(zero_copy_only=False).astype(np.int64)
    ri = pc.index_in(Rc, value_set=rels).to_numpy(zero_copy_only=False).astype(np.int64)
    E, R = len(ents), len(rels)
    if n == 0:
        return ents, rels.to_pylist(), np.zeros((0, 3), np.int64)
    if E * E * max(R, 1) < (1 << 62):
        key = (hi * R + ri) * E + ti
        _, first = np.unique(key, return_index=True)
    else:
        trip = np.stack([hi, ri, ti], axis=1)
        _, first = np.unique(trip, axis=0, return_index=True)
    keep = np.sort(first)
    triples = np.stack([hi[keep], ri[keep], ti[keep]], axis=1)
    ndup = n - len(keep)
    if ndup:
        mask = np.ones(n, dtype=bool)
        mask[keep] = False
        dup_rows = np.flatnonzero(mask)
        shown = dup_rows[:KEEP_DUPLICATE_RECORDS]
        for j in shown:
            j = int(j)
            rejects.add("duplicate_triple", triple=[H[j].as_py(), Rc[j].as_py(), T[j].as_py()])
        rest = ndup - len(shown)
        if rest:
            rejects._counts["duplicate_triple"] += rest  # counted, not stored
    return ents, rels.to_pylist(), triples


def _source_files(source: str, rejects: Rejects | None = None, warn: bool = True) -> list[Path]:
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1].lower()
        if name == "hpo":
            from kale_ray.core.hpo import hpo_data_dir

            d = hpo_data_dir()
            return [d / "hp.obo", d / "phenotype.hpoa"]
        return builtin_kg_files(name)
    return kg_source_files(Path(source), rejects, warn=warn)


def build_columnar_kg(source: str, names: str | None = None, on_error: str = "error",
                      undirected: bool = True, *, jsonl_numbers: bool = False) -> ColumnarKG:
    """Build (no cache) from ``builtin:umls|nations|hpo`` or a user's file/folder, like ``load_kg``.

    The same line rules and rejects as ``load_kg`` (BOM, headers, control characters, compressed
    files, skipped folder entries); a bad line falls back from pyarrow to the line reader.
    """
    if on_error not in ("error", "skip"):
        raise ValueError(f"on_error must be 'error' or 'skip', not {on_error!r}")
    if source.startswith("builtin:"):
        return ColumnarKG.from_kg(load_kg(source, names=names, on_error=on_error, jsonl_numbers=jsonl_numbers),
                                  undirected=undirected)
    rejects = Rejects()
    files = _source_files(source, rejects)
    parts = [_read_file(f, on_error, rejects, jsonl_numbers) for f in files]
    name_map: dict[str, str] = {}
    alias_map: dict[str, list[str]] = {}
    if names:
        name_map, alias_map = read_names(names, on_error=on_error, rejects=rejects, jsonl_numbers=jsonl_numbers)
    ents, rels, triples = _encode_triples(parts, rejects)
    if len(triples) == 0:
        raise KGFormatError(f"{source}: no valid triples (rejected: {rejects.counts()})")
    return _build(ents, rels, triples, name_map, alias_map, rejects, source, undirected)


def default_cache_dir() -> Path:
    root = os.environ.get("KALE_RAY_CACHE")
    return Path(root) / "kg" if root else Path.home() / ".cache" / "kale_ray" / "kg"


def _stat_entry(p: Path) -> list:
    rp = p.expanduser().resolve()
    st = rp.stat()
    return [str(rp), st.st_size, st.st_mtime_ns]


def cache_key(source: str, names: str | None = None, on_error: str = "error", undirected: bool = True,
              *, jsonl_numbers: bool = False) -> str:
    """Hash of format/parser version, every source file's resolved path/size/mtime_ns, names file, options."""
    skipped = Rejects()
    files = _source_files(source, skipped, warn=False)
    parts: dict[str, Any] = {
        "version": FORMAT_VERSION, "parser": PARSER_VERSION, "source": source, "on_error": on_error,
        "undirected": bool(undirected), "jsonl_numbers": bool(jsonl_numbers),
        "files": [_stat_entry(f) for f in files],
        "skipped": sorted(r["file"] for r in skipped.rows),
        "names": _stat_entry(Path(names)) if names else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def ensure_landmarks(kg: "ColumnarKG") -> "ColumnarKG":
    """The KG with its landmark table (``heuristic=landmark``): built once per graph and stored in
    its cache folder, so every worker maps the same pages. A KG without a folder builds it in memory."""
    if all(k in kg.arrays for k in _LANDMARK_ARRAY_NAMES):
        return kg
    table = build_landmark_table(kg.index(kg.undirected))
    if not kg.path:
        kg.arrays.update(table.arrays())
        attach_landmark_table(kg.index(kg.undirected), table)
        return kg
    d = Path(kg.path)
    for k, v in table.arrays().items():
        tmp = d / f".{k}.{os.getpid()}.npy"
        np.save(tmp, v, allow_pickle=False)
        os.replace(tmp, d / f"{k}.npy")  # atomic: a concurrent reader sees the whole file or none
    return ColumnarKG.open(d)


def cached_path(source: str, names: str | None = None, on_error: str = "error",
                cache_dir: str | Path | None = None, undirected: bool = True, *,
                jsonl_numbers: bool = False) -> Path | None:
    """The cache folder of ``source`` with these options when it is already built, else ``None``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / cache_key(source, names, on_error, undirected, jsonl_numbers=jsonl_numbers)
    return target if (target / "meta.json").exists() else None


def load_columnar_kg(source: str, names: str | None = None, on_error: str = "error",
                     cache_dir: str | Path | None = None, undirected: bool = True, *,
                     jsonl_numbers: bool = False) -> ColumnarKG:
    """Open the cached artifact of ``source`` (mmap) or build it once and cache it atomically."""
    if on_error not in ("error", "skip"):
        raise ValueError(f"on_error must be 'error' or 'skip', not {on_error!r}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(source, names, on_error, undirected, jsonl_numbers=jsonl_numbers)
    target = root / key
    if (target / "meta.json").exists():
        try:
            cached = ColumnarKG.open(target)
        except (OSError, ValueError, json.JSONDecodeError):
            shutil.rmtree(target, ignore_errors=True)  # a broken cache entry: rebuild
        else:
            skipped = [Path(r["file"]).name for r in cached.rejects.rows if r.get("reason") == SKIPPED_FILE]
            if skipped:  # said again on every load, as a fresh build would
                logging.getLogger(__name__).warning("KG folder %s: skipped %d not read as triples: %s",
                                                    source, len(skipped), ", ".join(skipped))
            return cached
    kg = build_columnar_kg(source, names=names, on_error=on_error, undirected=undirected, jsonl_numbers=jsonl_numbers)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        kg.save(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    opened = ColumnarKG.open(target)
    opened.rejects = kg.rejects
    return opened
