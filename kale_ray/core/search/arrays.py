"""Per-index path-search arrays, shared by the bidirectional and the relation-following searches.

``_CSR``: a search CSR derived from the ``GraphIndex`` (self-loops dropped, rows sorted by
neighbour id); ``_Prepared``: the ``simple`` (parallel edges collapsed) and ``multi`` CSRs of an
index plus the relation id / direction of every entry, built once per index in the process or
wrapped around a shared artifact without a copy (``search_arrays`` / ``attach_search_arrays``:
``ColumnarKG`` stores them, workers attach them). ``_prepared(index)`` is the per-process
registry: an index's arrays and its shared ``PathCache`` (``path_cache``).
"""
from __future__ import annotations

import time
import weakref
from collections.abc import Mapping

import numpy as np

from kale_ray.core.kg import GraphIndex
from kale_ray.core.search.walks import PathCache


# --------------------------------------------------------------------------- #
# Search CSRs, built once per GraphIndex (or wrapped around shared arrays)
# --------------------------------------------------------------------------- #
class _CSR:
    """A search CSR derived from the index: self-loops dropped, rows sorted by neighbour id.

    All arrays may be read-only views of a shared artifact (``search_arrays`` /
    ``attach_search_arrays``); ``ipl`` is a zero-copy ``memoryview`` of ``indptr`` (scalar reads
    give Python ints, no per-process list of |V| ints).
    """

    __slots__ = ("indptr", "nbr", "eid", "tid", "deg", "ipl", "deg2")

    def __init__(self, indptr: np.ndarray, nbr: np.ndarray, eid: np.ndarray, tid: np.ndarray,
                 deg: np.ndarray | None = None, deg2: np.ndarray | None = None) -> None:
        self.indptr = indptr  # (N+1,) int64
        self.nbr = nbr  # (E',) intp
        self.eid = eid  # (E',) intp: the index's CSR edge id of each entry
        self.tid = tid  # (E',) intp: the triple of each entry
        self.deg = np.diff(indptr) if deg is None else deg
        self.ipl = _int_view(indptr)  # indptr as Python ints on scalar reads, in the search loops
        # deg2[u] = sum of the degrees of u's row entries: the entries a side scans when it grows the
        # level after u's (next_cost without gathering the degrees of a whole level's entries)
        if deg2 is None:
            cs = np.zeros(nbr.size + 1, dtype=np.int64)
            np.cumsum(self.deg[nbr], out=cs[1:])
            deg2 = cs[indptr[1:]] - cs[indptr[:-1]]
        self.deg2 = deg2

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}{k}": getattr(self, k) for k in _CSR_FIELDS}


_CSR_FIELDS = ("indptr", "nbr", "eid", "tid", "deg", "deg2")


def _int_view(a: np.ndarray):
    """A zero-copy view of an int64 array whose scalar reads are Python ints (a memoryview);
    falls back to a list when the array is not contiguous."""
    a = np.asarray(a)
    if a.dtype == np.int64 and a.flags.c_contiguous:
        try:
            return memoryview(a).cast("B").cast("q") if a.size else []
        except (TypeError, ValueError):
            pass
    return a.tolist()


class _Prepared:
    """Per-index search arrays, built once per ``GraphIndex`` (``search_arrays``) and read-only after.

    ``simple``: parallel edges collapsed to the first one in the index (``distinct_nodes``);
    ``multi``: parallel edges kept. Both without self-loops (a simple path never uses one).
    Built from the index in the process (``_Prepared(index)``) or wrapped around shared arrays
    without a copy (``_Prepared.from_arrays``, see ``attach_search_arrays``).
    """

    def __init__(self, index: GraphIndex | None, *, _arrays: dict | None = None, _num_nodes: int = 0) -> None:
        t0 = time.perf_counter()
        self._rel: tuple | None = None  # (triples, relation id per multi entry, forward), see entry_relations
        if _arrays is not None:
            a = {k: np.asarray(v) for k, v in _arrays.items()}  # np.memmap -> plain views (no copy)
            self.num_nodes = int(_num_nodes)
            self.multi = _CSR(*(a[f"ps_multi_{k}"] for k in _CSR_FIELDS[:4]),
                              deg=a["ps_multi_deg"], deg2=a["ps_multi_deg2"])
            if "ps_simple_indptr" in a:
                self.simple = _CSR(*(a[f"ps_simple_{k}"] for k in _CSR_FIELDS[:4]),
                                   deg=a["ps_simple_deg"], deg2=a["ps_simple_deg2"])
            else:
                self.simple = self.multi
            self.simple_key = a["ps_simple_key"]
            if "ps_entry_rel" in a:
                self._rel = (None, a["ps_entry_rel"], a["ps_entry_fwd"])
            self.build_s = time.perf_counter() - t0
            return
        n = int(index.num_nodes)
        self.num_nodes = n
        src = np.repeat(np.arange(n, dtype=np.int64), np.diff(index.indptr))
        nbr = index.nbr.astype(np.int64)
        keep = np.flatnonzero(src != nbr)
        key = src[keep] * max(n, 1) + nbr[keep]
        order = np.argsort(key, kind="stable")  # stable: equal (u, v) stay in index order
        key, eid = key[order], keep[order]
        counts = np.bincount(key // max(n, 1), minlength=n)
        self.multi = self._csr(counts, key % max(n, 1), eid, index.tid)
        first = np.ones(key.size, dtype=bool)
        first[1:] = key[1:] != key[:-1]
        if first.all():
            self.simple = self.multi
            self.simple_key = key  # (u * N + v) of each simple entry, sorted: hop lookup
        else:
            self.simple_key = key[first]
            s2 = self.simple_key // max(n, 1)
            self.simple = self._csr(np.bincount(s2, minlength=n), self.simple_key % max(n, 1), eid[first], index.tid)
        self.build_s = time.perf_counter() - t0

    @classmethod
    def from_arrays(cls, arrays: dict, num_nodes: int) -> "_Prepared":
        """Wrap ``search_arrays`` output as it is (no copy; read-only / mmap arrays are fine)."""
        return cls(None, _arrays=arrays, _num_nodes=num_nodes)

    def entry_relations(self, triples: np.ndarray) -> np.ndarray:
        """The relation id of every entry of ``multi`` (built once per triples array; the shared
        ones when wrapped around ``search_arrays`` built with the triples)."""
        cur = self._rel
        if cur is None or (cur[0] is not triples and cur[0] is not None):
            rel, fwd = _entry_relations(self.multi, self.num_nodes, triples)
            cur = self._rel = (triples, rel, fwd)
        return cur[1]

    def entry_forward(self, triples: np.ndarray) -> np.ndarray:
        """Whether each entry of ``multi`` walks its triple forward (head -> tail)."""
        self.entry_relations(triples)
        return self._rel[2]

    def arrays(self, triples: np.ndarray | None = None) -> dict[str, np.ndarray]:
        out = self.multi.arrays("ps_multi_")
        if self.simple is not self.multi:
            out.update(self.simple.arrays("ps_simple_"))
        out["ps_simple_key"] = self.simple_key
        if triples is not None:
            self.entry_relations(triples)
            out["ps_entry_rel"], out["ps_entry_fwd"] = self._rel[1], self._rel[2]
        return out

    @staticmethod
    def _csr(counts: np.ndarray, nbr: np.ndarray, eid: np.ndarray, tid: np.ndarray) -> _CSR:
        indptr = np.zeros(counts.size + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        eid = eid.astype(np.intp)  # intp: fancy indexing without a cast
        return _CSR(indptr, nbr.astype(np.intp), eid, np.asarray(tid)[eid].astype(np.intp))


def _entry_relations(multi: _CSR, n: int, triples) -> tuple[np.ndarray, np.ndarray]:
    if not multi.tid.size:
        return np.empty(0, dtype=np.intp), np.empty(0, dtype=bool)
    t = np.asarray(triples)
    rel = t[multi.tid, 1].astype(np.intp)
    fwd = t[multi.tid, 0] == np.repeat(np.arange(n), multi.deg)
    return rel, fwd


SEARCH_ARRAY_NAMES = tuple(f"ps_{c}_{k}" for c in ("multi", "simple") for k in _CSR_FIELDS) + (
    "ps_simple_key", "ps_entry_rel", "ps_entry_fwd")


REQUIRED_SEARCH_ARRAYS = SEARCH_ARRAY_NAMES[:len(_CSR_FIELDS)] + ("ps_simple_key",)


def search_arrays(index: GraphIndex, triples: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The path-search arrays of ``index`` (``SEARCH_ARRAY_NAMES``), to build once and share
    (``ColumnarKG`` stores them; workers ``attach_search_arrays``). With ``triples`` the relation
    id / direction of every entry is included (the relation-following searches need them).
    When the index has no parallel edges there are no ``ps_simple_*`` CSR arrays (the multi CSR
    serves both)."""
    return _Prepared(index).arrays(triples)


def attach_search_arrays(index: GraphIndex, arrays: Mapping[str, np.ndarray]) -> None:
    """Make ``_prepared(index)`` (every search on ``index`` in this process) use the shared
    ``search_arrays`` as they are: nothing |V|- or |E|-sized is copied or rebuilt."""
    missing = [k for k in REQUIRED_SEARCH_ARRAYS if k not in arrays]
    if missing:
        raise ValueError(f"search arrays missing: {missing}")
    if len(arrays["ps_multi_indptr"]) != int(index.num_nodes) + 1:
        raise ValueError("search arrays were built for another graph (indptr length differs)")
    _register(index, _Prepared.from_arrays(dict(arrays), int(index.num_nodes)))


# --------------------------------------------------------------------------- #
# Per-process registry: an index's arrays and its shared PathCache
# --------------------------------------------------------------------------- #
_REGISTRY: dict[int, tuple] = {}


def _register(index: GraphIndex, prep: _Prepared) -> tuple[_Prepared, PathCache]:
    key = id(index)

    def _drop(ref, key=key):
        cur = _REGISTRY.get(key)
        if cur is not None and cur[0] is ref:
            del _REGISTRY[key]

    cache = PathCache()
    _REGISTRY[key] = (weakref.ref(index, _drop), prep, cache)
    return prep, cache


def _prepared(index: GraphIndex) -> tuple[_Prepared, PathCache]:
    """The index's ``_Prepared`` arrays and shared ``PathCache`` (built on first use, per process,
    unless ``attach_search_arrays`` gave it shared ones)."""
    ent = _REGISTRY.get(id(index))
    if ent is not None and ent[0]() is index:
        return ent[1], ent[2]
    return _register(index, _Prepared(index))


def path_cache(index: GraphIndex) -> PathCache:
    """The shared bidirectional-search cache of ``index`` (e.g. to ``clear()`` it or read hits/misses)."""
    return _prepared(index)[1]


def _resolve_cache(index: GraphIndex, cache) -> tuple[_Prepared, PathCache]:
    prep, shared = _prepared(index)
    if cache is None or cache is True:
        return prep, shared
    if cache is False:
        return prep, PathCache()
    if not isinstance(cache, PathCache):
        raise TypeError(f"cache must be a PathCache, None or False, got {type(cache).__name__}")
    return prep, cache
