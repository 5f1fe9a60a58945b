"""Walk sets of the bidirectional search and their cache.

``_Side``: the levels around one endpoint (level ``r`` = the nodes with a walk of exactly ``r``
hops to it) and its walk-length bits, stored sparsely (the nodes it reached). ``PathCache``:
sides shared across pairs and calls, LRU bounded in bytes; sides depend on the graph only (no
rng), so sharing them never changes a result. The bits of a node fit one integer of
``_bits_dtype(max_hops)`` (up to ``MAX_BIDIRECTIONAL_HOPS``). Memory per question does not grow
with the graph: the search loads the target side's bits into a per-thread work array of |V|
entries allocated once per thread (``_work_bits``) and resets exactly the entries it wrote
afterwards (also on an exception); levels are de-duplicated through one per-thread scratch
array (``_scratch``). The search itself: ``kale_ray.core.search.bidirectional``.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

from kale_ray.core.search.common import _frontier_edges

if TYPE_CHECKING:
    from kale_ray.core.search.arrays import _CSR


_BIT_DTYPES = ((7, np.uint8), (15, np.uint16), (31, np.uint32), (63, np.uint64))
_BITV: dict = {}  # (dtype, max_hops) -> [dtype(1 << r) for r in 0..max_hops]
MAX_BIDIRECTIONAL_HOPS = 63  # walk-length bits per node; longer searches use the "target" A*


def _bits_dtype(max_hops: int):
    for top, dt in _BIT_DTYPES:
        if max_hops <= top:
            return dt
    raise ValueError(f"bidirectional search supports max_hops <= {MAX_BIDIRECTIONAL_HOPS}")


_TLS = threading.local()  # per-thread work arrays (allocated once per thread, reset after use)


def _scratch(n: int) -> np.ndarray:
    """A per-thread int32 array of >= ``n`` entries (contents undefined; never reset)."""
    a = getattr(_TLS, "scratch", None)
    if a is None or a.size < n:
        a = _TLS.scratch = np.empty(max(n, 1), dtype=np.int32)
    return a


def _work_bits(n: int, dtype) -> np.ndarray:
    """A per-thread all-zero bit array of ``n`` entries of ``dtype``; whoever writes resets it."""
    d = getattr(_TLS, "bits", None)
    if d is None:
        d = _TLS.bits = {}
    key = np.dtype(dtype)
    a = d.get(key)
    if a is None or a.size < n:
        a = d[key] = np.zeros(max(n, 1), dtype=key)
    return a[:n]


def _unique_small(x: np.ndarray, n: int) -> np.ndarray:
    """The distinct values of ``x`` (ids < ``n``), first-kept order irrelevant, in O(len(x)) time
    and memory (a per-thread scratch array instead of sorting or a |V|-sized allocation)."""
    if x.size <= 1:
        return x
    scratch = _scratch(n)
    pos = np.arange(x.size, dtype=np.int32)
    scratch[x] = pos  # the last write per node wins
    return x[scratch[x] == pos]


class _Side:
    """Walk sets around one node ``x`` over the simple CSR, grown one level at a time.

    Level ``r`` = the nodes with a walk of exactly ``r`` hops to ``x``. ``load(M)`` writes the
    side's bits into a zeroed per-thread work array ``M`` (bit ``r`` of ``M[v]`` set iff ``v`` is
    in level ``r``, complete for ``r <= depth``) and returns the nodes it touched, so the caller
    resets only those: a side keeps its bits sparse (``_cnodes``/``_cvals``, bounded by the
    nodes it reached), never an array over the whole graph. Growing level ``j`` scans all CSR
    entries of the level-``j`` nodes: ``dst(j)`` and, on demand, ``src(j)``. Nothing here depends
    on an rng, so a side can be shared by every pair that has ``x`` as an endpoint.
    """

    __slots__ = ("root", "n", "dtype", "depth", "_cnodes", "_cvals", "_cdepth", "_levels", "_dst", "_lens", "_src",
                 "_cost", "nbytes")

    def __init__(self, root: int, n: int, dtype) -> None:
        self.root = root
        self.n = n
        self.dtype = np.dtype(dtype)
        self._cnodes: np.ndarray | None = None  # sparse bits: the nodes of levels 0.._cdepth ...
        self._cvals: np.ndarray | None = None  # ... and their bits (levels 0.._cdepth only)
        self._cdepth = -1
        self._levels: list[np.ndarray | None] = [None]  # level 0 (the root) built on demand
        self._dst: list[np.ndarray] = []
        self._lens: list[np.ndarray] = []
        self._src: list[np.ndarray | None] = []
        self._cost: list[int | None] = [None]
        self.nbytes = 64
        self.depth = 0  # levels grown

    def load(self, M: np.ndarray) -> np.ndarray:
        """OR this side's bits (levels ``0..depth``) into the zeroed work array ``M`` (of at
        least ``self.dtype``'s width); returns the touched nodes (to reset after the search)."""
        one = M.dtype.type
        if self._cdepth == self.depth:
            M[self._cnodes] = self._cvals
            return self._cnodes
        if self._cnodes is None:
            M[self.root] = 1
            start = 0
        else:
            M[self._cnodes] = self._cvals
            start = self._cdepth
        for j in range(start, self.depth):
            M[self._dst[j]] |= one(1 << (j + 1))
        parts = [np.array([self.root], dtype=np.int64)] + [self.level(r).astype(np.int64, copy=False)
                                                           for r in range(1, self.depth + 1)]
        nodes = _unique_small(np.concatenate(parts), self.n)
        if self._cnodes is not None:
            self.nbytes -= int(self._cnodes.nbytes + self._cvals.nbytes)
        self._cnodes, self._cvals, self._cdepth = nodes, M[nodes].astype(self.dtype), self.depth
        self.nbytes += int(self._cnodes.nbytes + self._cvals.nbytes)
        return nodes

    def level(self, r: int) -> np.ndarray:
        lv = self._levels[r]
        if lv is None:
            if r == 0:
                lv = self._levels[0] = np.array([self.root], dtype=np.int64)
                return lv
            dst = self._dst[r - 1]
            if r == 1:  # a row of the simple CSR has no repeated neighbour
                lv = dst
            else:  # de-duplicate without sorting: the last write per node wins
                lv = _unique_small(dst, self.n)
                self.nbytes += int(lv.nbytes)
            self._levels[r] = lv
        return lv

    def next_cost(self, csr: _CSR) -> int:
        """CSR entries that growing one more level scans (an upper bound past level 1)."""
        d = self.depth
        c = self._cost[d]
        if c is None:
            if d == 0:
                c = csr.ipl[self.root + 1] - csr.ipl[self.root]
            elif d == 1:  # the degrees of the root's neighbours
                c = int(csr.deg2[self.root])
            else:  # deg[dst(d - 1)].sum(), via deg2 over the (smaller) level when it is at hand
                lv = self._dst[0] if d == 2 else self._levels[d - 1]
                c = int(np.add.reduce(csr.deg2[lv] if lv is not None else csr.deg[self._dst[d - 1]]))
            self._cost[d] = c
        return c

    def grow(self, csr: _CSR) -> int:
        d = self.depth
        if d == 0:
            u, ipl = self.root, csr.ipl
            dst = csr.nbr[ipl[u]:ipl[u + 1]]
            lens = None
        else:
            lv = self.level(d)
            lens = csr.deg[lv]
            if not lens.all():  # no out-entries (a directed index): nothing to scan, keep reduceat segments non-empty
                keep = lens > 0
                lv, lens = lv[keep], lens[keep]
                self._levels[d] = lv
            if 0 < lv.size <= 24:  # a few rows: slicing beats building the entry ids
                ipl, nb = csr.ipl, csr.nbr
                dst = np.concatenate([nb[ipl[u]:ipl[u + 1]] for u in lv.tolist()])
            else:
                dst = csr.nbr[_frontier_edges(csr.indptr, lv)]
            self.nbytes += int(dst.nbytes + lens.nbytes)
        self._dst.append(dst)
        self._lens.append(lens)
        self._src.append(None)
        self._levels.append(None)
        self._cost.append(None)
        self.depth = d + 1
        return int(dst.size)

    def dst(self, j: int) -> np.ndarray:
        return self._dst[j]

    def offsets(self, j: int) -> np.ndarray:
        """Start of each level-``j`` node's entries in ``dst(j)`` (for ``np.*.reduceat``)."""
        o = self._src[j]
        if o is None:
            lens = self._lens[j]
            o = np.zeros(lens.size, dtype=np.intp)
            np.cumsum(lens[:-1], out=o[1:])
            self._src[j] = o
            self.nbytes += int(o.nbytes)
        return o


class PathCache:
    """Bidirectional-search sides (walk sets around a node), shared across pairs; LRU bounded in bytes.

    Sides depend on the graph only (no rng), so sharing them never changes a result: a pair
    gets the same paths from a cold or a warm cache. ``find_paths``/``sample_paths`` use one
    cache per ``GraphIndex`` (per process) unless given one; ``cache=False`` disables it.
    """

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = int(max_bytes)
        self._sides: OrderedDict[int, _Side] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._sides)

    def side(self, node: int, n: int, dtype) -> _Side:
        sd = self._sides.get(node)
        if sd is not None and sd.dtype.itemsize >= np.dtype(dtype).itemsize and sd.n == n:
            self._sides.move_to_end(node)
            self.hits += 1
            return sd
        if sd is not None:
            self.bytes -= sd.nbytes
        sd = _Side(node, n, dtype)
        self._sides[node] = sd
        self.bytes += sd.nbytes
        self.misses += 1
        return sd

    def settle(self, sides: tuple[_Side, ...], before: int) -> None:
        """Account for growth of ``sides`` (their bytes were ``before``) and evict old ones."""
        for sd in sides:
            self.bytes += sd.nbytes
        self.bytes -= before
        if self.bytes <= self.max_bytes:
            return
        keep = {sd.root for sd in sides}
        while self.bytes > self.max_bytes and len(self._sides) > len(keep):
            node, sd = next(iter(self._sides.items()))
            if node in keep:
                self._sides.move_to_end(node)
                continue
            del self._sides[node]
            self.bytes -= sd.nbytes

    def clear(self) -> None:
        self._sides.clear()
        self.bytes = 0


def _bitv(dtype, H: int) -> list:
    bitv = _BITV.get((dtype, H))
    if bitv is None:
        one = np.dtype(dtype).type
        bitv = _BITV[(dtype, H)] = [one(1 << r) for r in range(H + 1)]
    return bitv
