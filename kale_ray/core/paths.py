"""KI path synthesis (KALE): multi-path A* between question and answer entities on a KG.

Pure core: numpy and the standard library only (networkx only lazily, inside the interop
helpers at the bottom). Everything runs on the CSR ``GraphIndex`` of ``kale_ray.core.kg``.

Search
------
For a (source, target) pair we look for up to ``k`` distinct simple paths of at most
``max_hops`` hops, shortest first, with a multi-path A* (or, ``heuristic="bidirectional"``,
a meet-in-the-middle enumeration, below):

* ``f(e) = g(e) + h(e)``; ``g`` = hops so far.
* ``heuristic="landmark"`` (default, the paper's): ``h`` is the landmark (ALT) lower bound
  from ``num_anchors`` anchors sampled uniformly (with ``rng``) from the ``anchor_hops``-hop
  neighbourhood of the target (distance 1..m, the target itself excluded). The paper's form is
  ``h(e) = max_i [d(a_i, t) - d(a_i, e)]^+`` (``two_sided=False``). By default we use the
  standard two-sided ALT form on the undirected hop graph, ``h(e) = max_i |d(a_i, t) -
  d(a_i, e)|``: it contains the paper's term, is also admissible (triangle inequality both
  ways) and is far stronger away from the target (the one-sided term never exceeds ``m``).
  Distances come from BFS over the same index, so ``h`` never overestimates the hop distance.
  Anchor BFS stops at depth ``d(a, t) + max_hops - 1``; an unreached node is clamped to one
  more (still a lower bound), which already gives ``h >= max_hops`` and prunes it at any
  ``g >= 1``. Every node but the target also gets ``h >= 1``. All terms are 1-Lipschitz, so
  ``h`` is consistent as well.
* ``heuristic="target"`` (an extension, much faster on hub-heavy graphs): the target is its own
  and only landmark, ``h(e) = d(t, e)`` -- exact up to depth ``R = max_hops - 2`` from one
  cheap BFS, ``R + 1`` beyond, and a vectorised one-level look-ahead for the source's children
  (``R + 1`` if a neighbour is at ``R``, else ``R + 2``). After the first expansion every
  pruning decision is exact: a meet-in-the-middle that scans the target's and the source's
  small balls instead of the whole graph. No ``rng`` draws for the heuristic.
* ``heuristic="bidirectional"`` (an extension, the fastest; not an A*): meet in the middle
  without a heuristic. Walk sets grow level by level around the source and the target (always
  the side whose next level scans fewer CSR entries), bit ``r`` of a node meaning "has a walk
  of exactly ``r`` hops to the target"; the bits the enumeration needs beyond the target
  side's depth are completed on the source side's levels. Then, for ``L = d(s,t) ..
  max_hops``, a depth-first enumeration of the simple paths of exactly ``L`` hops keeps only
  children with the right bit (the shortest length never dead-ends), children in a random
  order from ``rng``. Lengths grow only as far as needed for k paths. Same results contract
  as the A* modes (k shortest simple paths, shortest first, the same path lengths); the walk
  sets depend on the graph only, so they are cached per endpoint across pairs and calls
  (``PathCache``; one per ``GraphIndex`` by default) without changing any result. Paths
  report ``"bidir"``. ``max_expansions`` counts enumerated non-goal states. Up to
  ``MAX_BIDIRECTIONAL_HOPS`` (63) hops, beyond which the ``"target"`` A* runs instead.
  The index must be undirected (as ``GraphIndex.build`` makes it by default), as for all modes.
  With numba installed the enumeration runs compiled (same paths, draws and stats; see
  ``_build_numba_enum``; ``KALE_RAY_NUMBA=0`` forces the Python loop).
  Memory per question does not grow with the graph: a side stores its levels and its bits
  sparsely (the nodes it reached); the search loads the target side's bits into a per-thread
  work array of |V| entries allocated once per thread (``_work_bits``) and resets exactly the
  entries it wrote afterwards (also on an exception); levels are de-duplicated through one
  per-thread scratch array (``_scratch``). The default mode of ``PathConfig``.
* ``relation_weights`` (all modes, optional): a per-relation relevance vector (e.g. the
  relations a question mentions), or a hop x relation matrix (a relation chain). Paths whose
  hops all use relevant relations are searched first (``_sequence_paths`` for a chain,
  ``_relation_paths`` for a set; sparse dict/set searches bounded by ``max_expansions`` rows)
  and ranked first (method ``"relation"``); the ordinary search fills up to ``k``.
* ``"landmark"`` by default takes its landmarks from a table built once per graph
  (``landmarks="table"``: 16 farthest-point landmarks, a BFS from each, ``N x 16`` bytes, stored
  in the KG's cache folder and memory-mapped by every worker; ``h`` is evaluated only for the
  nodes the A* reads, so nothing |V|-sized is allocated per question). ``landmarks="sampled"``
  is the paper's per-target anchors above, and ``"target"`` still builds a |V|-sized ``h`` per
  target (``landmark_heuristic``; BFS from the anchors over most of a small-world graph): use
  them for the paper's algorithm or cross-checks, not at scale.
* States are paths (tree search), so after the first goal we keep popping the frontier to
  collect up to ``k`` paths; a node may be reached again through a different parent path.
  A child is kept only if ``g + 1 + h(child) <= max_hops`` and it is not already on its
  path (simple paths). With an admissible ``h`` every prefix of a path of length L has
  ``f <= L``, so goals pop in non-decreasing length: the first k goals are k shortest simple
  paths. Ties on ``f`` prefer deeper states, then a random key from ``rng`` (equal-length
  alternatives vary with the seed but are reproducible). The children of one expansion that
  share ``f`` enter the heap as one lazily consumed batch (a hub's thousand children cost
  one push); ``max_expansions`` counts expanded (popped non-goal) states.
* With ``distinct_nodes=True`` (default) two paths are distinct when their node sequences
  differ (parallel edges between the same two nodes collapse to the first one in the index);
  with ``False`` paths that differ only in the triple used for a hop are distinct too.

Fallback and partial paths
--------------------------
* If the search (A* or the bidirectional enumeration) expands ``max_expansions`` states
  before it has ``k`` paths and ``bfs_fallback`` is on, a BFS tree from the source (depth
  ``max_hops``) gives a shortest path for sure, and a second best-first search with the
  exact-distance ``"target"`` heuristic (same budget) adds further paths. Paths found this
  way report ``"bfs"``; they are merged with the search's ones,
  de-duplicated and sorted by length. With ``bfs_fallback`` off, the paths A* found so far
  (possibly none) are returned.
* A pair has *no* complete path only when that is proven (A* ran out of frontier, the
  heuristic of the source already exceeds ``max_hops``, the bidirectional walk sets do not
  meet within ``max_hops``, or the fallback BFS does not reach
  the target). Then, with ``partial_paths``, we return one ``"partial"`` path: among the
  nodes within ``max_hops`` hops of the source we pick the one with the smallest exact hop
  distance to the target (ties: fewer hops, then lower id) and return the BFS-tree path to
  it. That end node is always exactly ``max_hops`` hops out on a shortest source->target
  path, so the partial path is the longest prefix of a shortest path toward the target. If
  the target is in another connected component (no notion of "toward"), or either endpoint
  is isolated, no partial path is returned.

Every hop is a real KG triple: a CSR edge maps back through ``tid`` to ``triples[tid]``,
reported in its stored forward orientation even when the walk used it backwards
(``KGPath.nodes`` carries the walk direction).
"""
from __future__ import annotations

import heapq
import numbers
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from kale_ray.core.kg import GraphIndex, KnowledgeGraph

__all__ = [
    "PathSearchParams",
    "KGPath",
    "LandmarkHeuristic",
    "bfs_distances",
    "bfs_tree",
    "landmark_heuristic",
    "PathCache",
    "path_cache",
    "search_arrays",
    "attach_search_arrays",
    "SEARCH_ARRAY_NAMES",
    "JIT_STATS",
    "find_paths",
    "find_paths_many",
    "sample_paths",
    "path_to_named",
    "graph_index_from_networkx",
    "to_simple_undirected_networkx",
]


HEURISTICS = ("landmark", "target", "bidirectional")

# --------------------------------------------------------------------------- #
# Parameters and results
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class PathSearchParams:
    max_hops: int = 3
    k: int = 3  # distinct paths per (source, target) pair
    num_anchors: int = 4
    anchor_hops: int = 2  # m: anchors sampled from the m-hop neighbourhood of the target
    bfs_fallback: bool = True
    partial_paths: bool = True
    max_expansions: int = 20000
    # extensions (see module docstring)
    two_sided: bool = True  # |d(a,t) - d(a,e)| (ALT) instead of the paper's [d(a,t) - d(a,e)]^+
    distinct_nodes: bool = True  # k paths differ in their node sequences
    # "landmark" (paper: sampled anchors) | "target" (the target as its only landmark) |
    # "bidirectional" (meet in the middle, no A*; the fastest)
    heuristic: str = "landmark"
    # "landmark" only: "table" (ALT over landmarks precomputed once per graph, ``landmark_table``;
    # nothing |V|-sized per question) | "sampled" (the paper: anchors drawn near each target, a
    # BFS from each per target -- O(|V|) per question)
    landmarks: str = "table"

    def __post_init__(self) -> None:
        if self.heuristic not in HEURISTICS:
            raise ValueError(f"PathSearchParams.heuristic must be one of {HEURISTICS}, got {self.heuristic!r}")
        if self.landmarks not in ("table", "sampled"):
            raise ValueError(f"PathSearchParams.landmarks must be 'table' or 'sampled', got {self.landmarks!r}")
        for name, lo in (("max_hops", 0), ("k", 1), ("num_anchors", 0), ("anchor_hops", 1), ("max_expansions", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
                raise ValueError(f"PathSearchParams.{name} must be an integer >= {lo}, got {v!r}")


@dataclass
class KGPath:
    hops: list[tuple[int, int, int]]  # real triples (head, relation, tail), each read FORWARD as stored
    nodes: list[int]  # the walk's node sequence source..end (len = len(hops) + 1)
    complete: bool  # reaches the target
    method: str  # "astar" | "bidir" | "bfs" | "partial" | "trivial"

    @property
    def length(self) -> int:
        """Number of hops (0 for a trivial path)."""
        return len(self.hops)

    @property
    def source(self) -> int:
        return self.nodes[0]

    @property
    def end(self) -> int:
        return self.nodes[-1]

    def key(self, distinct_nodes: bool = True) -> tuple:
        """Identity used for de-duplication."""
        return tuple(self.nodes) if distinct_nodes else (tuple(self.nodes), tuple(self.hops))

    def to_dict(self) -> dict:
        return {"hops": [list(h) for h in self.hops], "nodes": list(self.nodes),
                "complete": self.complete, "method": self.method}


@dataclass
class LandmarkHeuristic:
    """Per-target lower bounds ``h`` (int32 over all nodes) on the hop distance to ``target``."""

    target: int
    anchors: np.ndarray  # (A,) int64 anchor ids
    anchor_target_dist: np.ndarray  # (A,) int32: d(anchor, target)
    h: np.ndarray  # (num_nodes,) int32
    two_sided: bool = True
    bfs_edges: int = 0  # CSR entries scanned to build it
    exact_depth: int | None = None  # "target" mode: h is the exact distance up to this depth (see _best_first)


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #
def _check_node(index: GraphIndex, x, role: str) -> int:
    if type(x) is int and 0 <= x < index.num_nodes:  # fast path
        return x
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{role} id {x!r} is not an integer entity id")
    n = int(index.num_nodes)
    xi = int(x)
    if xi < 0 or xi >= n:
        raise ValueError(f"{role} id {xi} is out of range: the graph has {n} entities (ids 0..{n - 1})")
    return xi


def _check_triples(index: GraphIndex, triples: np.ndarray) -> np.ndarray:
    if type(triples) is np.ndarray and triples.ndim == 2 and triples.shape[1] == 3 and len(triples):
        return triples  # fast path
    triples = np.asarray(triples)
    if triples.ndim != 2 or triples.shape[1] != 3:
        raise ValueError(f"triples must be an (N, 3) array of (head, relation, tail) ids, got shape {triples.shape}")
    if index.num_edges and len(triples) == 0:
        raise ValueError("triples is empty but the index has edges; pass the triples the index was built from")
    return triples


def _bump(stats: dict | None, key: str, n: int = 1) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + int(n)


# --------------------------------------------------------------------------- #
# BFS (level-synchronous, vectorised over the CSR arrays)
# --------------------------------------------------------------------------- #
def _frontier_edges(indptr: np.ndarray, frontier: np.ndarray) -> np.ndarray:
    """CSR edge ids of all out-edges of ``frontier`` (concatenated, in frontier order)."""
    starts = indptr[frontier]
    lens = indptr[frontier + 1] - starts
    total = int(lens.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    offsets = np.cumsum(lens) - lens
    return np.repeat(starts - offsets, lens) + np.arange(total, dtype=np.int64)


def _next_frontier(dist: np.ndarray, new: np.ndarray, d: int) -> np.ndarray:
    if new.size * 16 > dist.size:
        return np.flatnonzero(dist == d)
    return np.unique(new)


def bfs_distances(index: GraphIndex, source: int, max_depth: int | None = None, *,
                  stats: dict | None = None) -> np.ndarray:
    """Hop distances from ``source`` over the index (int32, -1 = unreachable or beyond ``max_depth``)."""
    source = _check_node(index, source, "source")
    n = int(index.num_nodes)
    indptr, nbr = index.indptr, index.nbr
    dist = np.full(n, -1, dtype=np.int32)
    dist[source] = 0
    frontier = np.array([source], dtype=np.int64)
    d = 0
    scanned = 0
    while frontier.size and (max_depth is None or d < max_depth):
        e = _frontier_edges(indptr, frontier)
        scanned += e.size
        nb = nbr[e]
        nb = nb[dist[nb] < 0]
        if nb.size == 0:
            break
        d += 1
        dist[nb] = d
        frontier = _next_frontier(dist, nb, d)
    _bump(stats, "bfs_edges", scanned)
    return dist


def bfs_tree(index: GraphIndex, source: int, max_depth: int | None = None, *, stats: dict | None = None):
    """BFS distances plus, per reached node, the CSR edge it was first reached by (-1 for none).

    Returns ``(dist int32, parent_edge int64, parent_node int64)``. Deterministic: a node's
    parent is its first occurrence in the (frontier-sorted, CSR-ordered) edge list.
    """
    source = _check_node(index, source, "source")
    n = int(index.num_nodes)
    indptr, nbr = index.indptr, index.nbr
    dist = np.full(n, -1, dtype=np.int32)
    pedge = np.full(n, -1, dtype=np.int64)
    pnode = np.full(n, -1, dtype=np.int64)
    dist[source] = 0
    frontier = np.array([source], dtype=np.int64)
    d = 0
    scanned = 0
    while frontier.size and (max_depth is None or d < max_depth):
        starts = indptr[frontier]
        lens = indptr[frontier + 1] - starts
        e = _frontier_edges(indptr, frontier)
        scanned += e.size
        src = np.repeat(frontier, lens)
        nb = nbr[e]
        keep = dist[nb] < 0
        nb, e, src = nb[keep], e[keep], src[keep]
        if nb.size == 0:
            break
        d += 1
        uniq, first = np.unique(nb, return_index=True)
        dist[uniq] = d
        pedge[uniq] = e[first]
        pnode[uniq] = src[first]
        frontier = uniq.astype(np.int64)
    _bump(stats, "bfs_edges", scanned)
    return dist, pedge, pnode


# --------------------------------------------------------------------------- #
# Landmark heuristic
# --------------------------------------------------------------------------- #
def landmark_heuristic(index: GraphIndex, target: int, params: PathSearchParams, rng: np.random.Generator,
                       *, stats: dict | None = None) -> LandmarkHeuristic:
    """Lower bounds ``h`` on the hop distance to ``target`` for all nodes (see module doc).

    ``params.heuristic == "landmark"``: anchors sampled in the m-hop ball of ``target``.
    ``"target"``: the target is the only landmark: exact BFS distances to it up to depth
    ``R = max_hops - 2`` (``R + 1`` beyond). ``_best_first`` completes this with a one-level
    look-ahead for the source's children, after which every pruning decision is exact --
    a meet-in-the-middle (a depth-R BFS from the target plus the source's neighbours' edge
    lists) instead of a BFS over most of the graph.
    """
    target = _check_node(index, target, "target")
    local: dict = {}
    h = np.zeros(index.num_nodes, dtype=np.int32)
    exact_depth = None
    if params.heuristic in ("target", "bidirectional"):
        exact_depth = max(params.max_hops - 2, 0)
        h = bfs_distances(index, target, max_depth=exact_depth, stats=local)
        h[h < 0] = exact_depth + 1
        anchors = np.array([target], dtype=np.int64)
        adist = np.zeros(1, dtype=np.int32)
    else:
        ball = bfs_distances(index, target, max_depth=params.anchor_hops, stats=local)
        cand = np.flatnonzero(ball > 0)
        if cand.size > params.num_anchors:
            anchors = np.sort(rng.choice(cand, size=params.num_anchors, replace=False)).astype(np.int64)
        else:
            anchors = cand.astype(np.int64)
        adist = ball[anchors].astype(np.int32)
        for a, dat in zip(anchors.tolist(), adist.tolist()):
            if params.two_sided:
                # h_a >= max_hops already prunes every non-source state, so d(a,e) is only
                # needed up to d(a,t) + max_hops - 1; beyond, clamp to depth+1 (admissible)
                depth = dat + max(params.max_hops - 1, 0)
                da = bfs_distances(index, a, max_depth=depth, stats=local)
                da[da < 0] = depth + 1
                np.maximum(h, np.abs(da - dat), out=h)
            else:
                # [d(a,t) - d(a,e)]^+ is non-zero only where d(a,e) < d(a,t): depth d(a,t)-1 suffices
                da = bfs_distances(index, a, max_depth=dat - 1, stats=local)
                da[da < 0] = dat
                np.maximum(h, np.maximum(dat - da, 0), out=h)
    np.maximum(h, 1, out=h)  # every node but the target is at least one hop away
    h[target] = 0
    _bump(stats, "bfs_edges", local.get("bfs_edges", 0))
    _bump(stats, "heuristics")
    return LandmarkHeuristic(target=target, anchors=anchors, anchor_target_dist=adist, h=h,
                             two_sided=params.two_sided, bfs_edges=int(local.get("bfs_edges", 0)),
                             exact_depth=exact_depth)


# --------------------------------------------------------------------------- #
# Landmark distances, precomputed once per graph (ALT)
# --------------------------------------------------------------------------- #
NUM_LANDMARKS = 16  # per graph: 16 BFS at build time, N x 16 bytes, shared by every question


@dataclass
class LandmarkTable:
    """Hop distances from a few landmarks to every node: ``dist[v, l] = d(landmarks[l], v)``.

    Built once per graph (``landmark_table``); ``sentinel`` marks an unreachable node. Row
    layout (N, L), so the bound for a node's neighbours reads contiguous rows.
    """

    landmarks: np.ndarray  # (L,) int64
    dist: np.ndarray  # (N, L) uint8 or uint16
    sentinel: int
    bfs_edges: int = 0

    def arrays(self) -> dict[str, np.ndarray]:
        return {"lm_nodes": self.landmarks, "lm_dist": self.dist}


def build_landmark_table(index: GraphIndex, num: int = NUM_LANDMARKS) -> LandmarkTable:
    """Farthest-point landmarks (the first is the highest-degree node; each next one is the node
    farthest from those chosen, so other components get one too), a full BFS from each."""
    n = int(index.num_nodes)
    deg = np.diff(index.indptr)
    stats: dict = {}
    cols, chosen = [], []
    mind = np.full(n, np.iinfo(np.int32).max, dtype=np.int64)
    nxt = int(np.argmax(deg)) if n else 0
    for _ in range(min(num, int((deg > 0).sum()))):
        chosen.append(nxt)
        d = bfs_distances(index, nxt, stats=stats)
        cols.append(d)
        far = np.where(d < 0, np.iinfo(np.int32).max - 1, d).astype(np.int64)
        np.minimum(mind, far, out=mind)
        cand = np.where((deg > 0) & (mind > 0), mind, -1)
        if cand.max(initial=-1) <= 0:
            break
        nxt = int(np.argmax(cand))
    top = max((int(c.max(initial=0)) for c in cols), default=0)
    dtype = np.uint8 if top < 255 else np.uint16
    sentinel = int(np.iinfo(dtype).max)
    dist = np.full((n, len(cols)), sentinel, dtype=dtype)
    for j, c in enumerate(cols):
        ok = c >= 0
        dist[ok, j] = c[ok]
    return LandmarkTable(np.array(chosen, dtype=np.int64), dist, sentinel, int(stats.get("bfs_edges", 0)))


_LANDMARKS: dict[int, tuple] = {}  # id(index) -> (weakref, LandmarkTable)


def landmark_table(index: GraphIndex, *, build: bool = True) -> LandmarkTable | None:
    """The index's landmark table: attached (``attach_landmark_table``), else built once per
    process and kept for the index's lifetime."""
    cur = _LANDMARKS.get(id(index))
    if cur is not None and cur[0]() is index:
        return cur[1]
    if not build:
        return None
    table = build_landmark_table(index)
    attach_landmark_table(index, table)
    return table


def attach_landmark_table(index: GraphIndex, table: LandmarkTable | Mapping[str, np.ndarray]) -> None:
    """Use a shared table (e.g. memory-mapped from the KG cache) for every search on ``index``."""
    if not isinstance(table, LandmarkTable):
        dist = table["lm_dist"]
        table = LandmarkTable(np.asarray(table["lm_nodes"]), dist, int(np.iinfo(dist.dtype).max))
    if table.dist.shape[0] != int(index.num_nodes):
        raise ValueError("landmark table was built for another graph (row count differs)")
    key = id(index)

    def _drop(ref, key=key):
        cur = _LANDMARKS.get(key)
        if cur is not None and cur[0] is ref:
            del _LANDMARKS[key]

    _LANDMARKS[key] = (weakref.ref(index, _drop), table)


class _TableBound:
    """``h[v]`` for any node or node array, from a ``LandmarkTable``: two-sided ALT,
    ``max_l |d(l, t) - d(l, v)|`` (at least 1 off the target; ``big`` when one of ``v`` and ``t``
    is reachable from a landmark and the other is not: another component). Computed for the
    nodes asked only: nothing |V|-sized per question."""

    def __init__(self, table: LandmarkTable, target: int, big: int) -> None:
        self.D = table.dist
        self.sent = table.sentinel
        self.target = target
        self.big = big
        self.dt = self.D[target].astype(np.int32)
        self.t_un = self.dt == self.sent

    def __getitem__(self, idx):
        dv = self.D[idx].astype(np.int32)
        un = dv == self.sent
        diff = np.abs(dv - self.dt)
        diff[un & self.t_un] = 0
        diff[un ^ self.t_un] = self.big
        h = diff.max(axis=-1, initial=0)
        h = np.maximum(h, 1)
        if np.ndim(idx) == 0:
            return np.int32(0 if int(idx) == self.target else h)
        h = h.astype(np.int32)
        h[np.asarray(idx) == self.target] = 0
        return h

    def __len__(self) -> int:
        return int(self.D.shape[0])


def table_heuristic(index: GraphIndex, target: int, params: PathSearchParams, *,
                    stats: dict | None = None) -> LandmarkHeuristic:
    """The ``"landmark"`` heuristic from the graph's precomputed landmarks (no BFS per target)."""
    target = _check_node(index, target, "target")
    table = landmark_table(index)
    _bump(stats, "heuristics")
    return LandmarkHeuristic(target=target, anchors=table.landmarks,
                             anchor_target_dist=table.dist[target].astype(np.int32),
                             h=_TableBound(table, target, params.max_hops + 1), two_sided=True, bfs_edges=0)


def _target_heuristic(index: GraphIndex, target: int, params: PathSearchParams, rng: np.random.Generator,
                      stats: dict | None) -> LandmarkHeuristic:
    if params.heuristic == "landmark" and params.landmarks == "table":
        return table_heuristic(index, target, params, stats=stats)
    return landmark_heuristic(index, target, params, rng, stats=stats)


# --------------------------------------------------------------------------- #
# Multi-path A*
# --------------------------------------------------------------------------- #
def _edge_hop(index: GraphIndex, triples: np.ndarray, e: int) -> tuple[int, int, int]:
    row = triples[int(index.tid[e])]
    return (int(row[0]), int(row[1]), int(row[2]))


def _lookahead(index: GraphIndex, h: np.ndarray, nodes: np.ndarray, depth: int) -> tuple[np.ndarray, int]:
    """For nodes beyond the exact BFS depth of ``h`` (so ``d >= depth + 1``): ``depth + 1`` if a
    neighbour is at exactly ``depth``, else ``depth + 2`` (both exact lower bounds)."""
    indptr = index.indptr
    e = _frontier_edges(indptr, nodes)
    lens = indptr[nodes + 1] - indptr[nodes]
    hit = np.zeros(e.size + 1, dtype=np.int64)
    np.cumsum(h[index.nbr[e]] == depth, out=hit[1:])
    ends = np.cumsum(lens)
    near = hit[ends] - hit[ends - lens] > 0
    return np.where(near, depth + 1, depth + 2).astype(h.dtype), int(e.size)


def _best_first(index: GraphIndex, triples: np.ndarray, source: int, target: int, h: np.ndarray,
                params: PathSearchParams, rng: np.random.Generator, method: str,
                stats: dict | None, exact_depth: int | None = None) -> tuple[list[KGPath], bool]:
    """Collect up to k simple paths in non-decreasing length. Returns (paths, budget_exhausted).

    Tree search over paths: with an admissible ``h`` every prefix of a path of length L has
    ``f <= L``, so goals pop in non-decreasing length and the first k are k shortest.
    ``exact_depth`` (``"target"`` heuristic): ``h`` is exact up to that depth and clamped to
    ``exact_depth + 1`` beyond; children whose clamped ``f`` still fits ``max_hops`` get a
    one-level look-ahead (only the source's children when ``exact_depth = max_hops - 2``).
    """
    max_hops, k = params.max_hops, params.k
    if int(h[source]) > max_hops:
        return [], False
    indptr, nbr = index.indptr, index.nbr
    s_node: list[int] = []  # states = paths, as parent pointers
    s_parent: list[int] = []
    s_edge: list[int] = []
    # Lazy children (partial expansion): the children of one expansion that share f sit in the
    # heap as one batch, in random order, and hand out one child per pop -- a hub's thousands of
    # children cost one push, not thousands. Pop order equals pushing them one by one with
    # equal keys.
    b_nodes: list[list[int]] = [[source]]
    b_edges: list[list[int]] = [[-1]]
    b_parent: list[int] = [-1]
    b_pos: list[int] = [0]
    heap: list[tuple[int, int, float, int]] = [(int(h[source]), 0, 0.0, 0)]
    goals: list[int] = []
    expansions = 0
    scanned = 0
    exhausted = False
    budget = params.max_expansions
    distinct_nodes = params.distinct_nodes
    lookahead_g = None if exact_depth is None else max_hops - exact_depth - 1  # look ahead while g1 <= this
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        _f, ng, _tie, bid = heap[0]
        j = b_pos[bid]
        bn = b_nodes[bid]
        if j + 1 < len(bn):
            b_pos[bid] = j + 1
        else:
            pop(heap)
        u = bn[j]
        sid = len(s_node)
        s_node.append(u)
        s_parent.append(b_parent[bid])
        s_edge.append(b_edges[bid][j])
        if u == target:
            goals.append(sid)
            if len(goals) >= k:
                break
            continue
        if expansions >= budget:
            exhausted = True
            break
        expansions += 1
        g1 = 1 - ng
        lo, hi = int(indptr[u]), int(indptr[u + 1])
        scanned += hi - lo
        nb = nbr[lo:hi]
        hv = h[nb]
        if lookahead_g is not None and g1 <= lookahead_g:
            unk = np.flatnonzero(hv == exact_depth + 1)
            if unk.size:
                hv[unk], n_la = _lookahead(index, h, nb[unk].astype(np.int64), exact_depth)
                scanned += n_la
        mask = hv <= max_hops - g1
        p = sid
        while p >= 0:  # simple paths: no node of the current path again
            mask &= nb != s_node[p]
            p = s_parent[p]
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            continue
        if idx.size > 1:
            if distinct_nodes:
                _, first = np.unique(nb[idx], return_index=True)
                if first.size < idx.size:
                    idx = idx[first]
            ties = rng.random(idx.size)
            order = np.argsort(ties)
            idx, ties = idx[order], ties[order]
            fv = hv[idx]
            order = np.argsort(fv, kind="stable")
            idx, ties, fv = idx[order], ties[order], fv[order]
            cuts = [0, *(np.flatnonzero(fv[1:] != fv[:-1]) + 1).tolist(), idx.size]
        else:
            ties = rng.random(1)
            fv = hv[idx]
            cuts = [0, 1]
        vs = nb[idx].tolist()
        es = (idx + lo).tolist()
        fl = fv.tolist()
        tl = ties.tolist()
        for c0, c1 in zip(cuts[:-1], cuts[1:]):
            nbid = len(b_nodes)
            b_nodes.append(vs[c0:c1])
            b_edges.append(es[c0:c1])
            b_parent.append(sid)
            b_pos.append(0)
            push(heap, (g1 + fl[c0], -g1, tl[c0], nbid))
    _bump(stats, "expansions", expansions)
    _bump(stats, "edges_scanned", scanned)
    paths = []
    for sid in goals:
        nodes, edges = [], []
        p = sid
        while p >= 0:
            nodes.append(s_node[p])
            if s_edge[p] >= 0:
                edges.append(s_edge[p])
            p = s_parent[p]
        nodes.reverse()
        edges.reverse()
        hops = [_edge_hop(index, triples, e) for e in edges]
        paths.append(KGPath(hops=hops, nodes=nodes, complete=True, method=method))
    return paths, exhausted


# --------------------------------------------------------------------------- #
# Bidirectional exact search (meet in the middle)
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


class _NumpyWalks:
    """Walk sets on numpy arrays, cached per endpoint in a ``PathCache`` (see ``_bidirectional``)."""

    def __init__(self, prep: _Prepared, cache: PathCache, source: int, target: int, H: int, dtype) -> None:
        self.prep, self.cache, self.source, self.H = prep, cache, source, H
        n = prep.num_nodes
        self.S = cache.side(source, n, dtype)
        self.T = cache.side(target, n, dtype)
        self.new_sides = (self.S.depth == 0) + (self.T.depth == 0)
        self.before = self.S.nbytes + self.T.nbytes
        self.a = self.b = 0
        self.grown = 0
        self.refined = None  # (source levels, exact target depth) of the last completion
        self.M = None  # the per-thread work array, once the target side is loaded into it
        self.loaded = 0  # target-side levels written into M
        self.touched: list = []  # node arrays written into M: reset to 0 by finish()
        self.dtype = dtype
        _scratch(n)  # the per-thread scratch array exists before the first level is de-duplicated
        self.bitv = _bitv(dtype, H)
        self.mask = (1 << (8 * np.dtype(dtype).itemsize)) - 1  # a Python-int shift stays within the dtype

    def prepare(self, L: int) -> bool:
        """Make bits up to L exact where the enumeration reads them; does the source have bit L?"""
        S, T, csr, bitv = self.S, self.T, self.prep.simple, self.bitv
        a, b = self.a, self.b
        while a + b < L:
            ct = 0 if b < T.depth else T.next_cost(csr)
            cs = 0 if a < S.depth else S.next_cost(csr)
            if ct <= cs:
                if b == T.depth:
                    self.grown += T.grow(csr)
                b += 1
            else:
                if a == S.depth:
                    self.grown += S.grow(csr)
                a += 1
        self.a, self.b = a, b
        M = self.M
        if M is None:
            M = self.M = _work_bits(self.prep.num_nodes, self.dtype)
            self.touched.append(T.load(M))
            self.loaded = T.depth
        elif self.loaded < T.depth:  # the target side grew since it was loaded
            one = M.dtype.type
            for j in range(self.loaded, T.depth):
                dst = T.dst(j)
                M[dst] |= one(1 << (j + 1))
                self.touched.append(dst)
            self.loaded = T.depth
        bexact = T.depth
        src = self.source
        if bexact < L:
            ra = L - bexact  # source-side levels the length-L walks need
            # meet test: a walk of exactly L hops exists iff a walk of ra hops from the source
            # ends on a node with a walk of bexact hops to the target
            g = M[S.dst(ra - 1)]
            if ra == 1:  # one OR-reduction is both the meet test and the completion of the source
                orall = int(np.bitwise_or.reduce(g)) if g.size else 0
                if not (orall >> bexact) & 1:
                    return False
                if self.refined != (1, bexact):
                    M[src] |= (orall << 1) & self.mask
                    self.touched.append(src)
                    self.refined = (1, bexact)
            else:
                if not (g & bitv[bexact]).any():
                    return False
                if self.refined != (ra, bexact):
                    # complete the source-side levels ra-1 .. 0, deepest first: a node has a walk of
                    # r hops to the target iff a neighbour has one of r - 1 (shift-OR over its
                    # scanned entries). Only true facts are added, so they may stay in the shared
                    # target side; level j ends up exact up to bexact + ra - j >= L - j.
                    for j in range(ra - 1, 0, -1):
                        if j < ra - 1:
                            g = M[S.dst(j)]
                        lv = S.level(j)
                        M[lv] |= np.bitwise_or.reduceat(g, S.offsets(j)) << 1
                        self.touched.append(lv)
                    g = M[S.dst(0)]
                    M[src] |= (int(np.bitwise_or.reduce(g)) << 1) & self.mask if g.size else 0
                    self.touched.append(src)
                    self.refined = (ra, bexact)
        return bool((int(M[src]) >> L) & 1)

    def release(self) -> None:
        """Reset the entries of the work array this search wrote (it is all zeros again)."""
        M = self.M
        if M is not None:
            for x in self.touched:
                M[x] = 0
            self.touched.clear()
            self.M = None

    def finish(self) -> int:
        self.release()
        self.cache.settle((self.S, self.T), self.before)
        return self.grown


def _bitv(dtype, H: int) -> list:
    bitv = _BITV.get((dtype, H))
    if bitv is None:
        one = np.dtype(dtype).type
        bitv = _BITV[(dtype, H)] = [one(1 << r) for r in range(H + 1)]
    return bitv


def _bidirectional(index: GraphIndex, triples: np.ndarray, source: int, target: int, params: PathSearchParams,
                   rng: np.random.Generator, stats: dict | None, cache) -> tuple[list[KGPath], bool]:
    """Up to k shortest simple paths by meet-in-the-middle; returns (paths, budget_exhausted).

    For ``L = 1 .. max_hops``, until k paths are found:

    1. Grow walk sets around the source (depth ``a``) and the target (depth ``b``) until
       ``a + b >= L``, always growing the side whose next level scans fewer CSR entries
       (levels already in the cache are free). Short pairs never look far.
    2. Bit ``r`` of ``M[v]`` = "``v`` has a walk of exactly ``r`` hops to the target", complete
       for ``r <= b`` from the target side. For ``b < r <= L`` it is completed on the source
       side's levels ``j <= a - 1`` only (a shift-OR over their scanned entries, deepest level
       first): exactly the nodes the enumeration can stand on with ``r`` hops left.
    3. If the source has bit ``L``: depth-first enumeration of the simple paths of exactly ``L``
       hops, a child at position ``j`` kept only if it has bit ``L - j`` (so the shortest length
       never dead-ends, longer ones only where a walk is not simple), children in a random
       order drawn from ``rng``.
    """
    prep, cache = _resolve_cache(index, cache)
    H, k = params.max_hops, params.k
    dtype = _bits_dtype(H)
    row_csr = prep.simple if params.distinct_nodes else prep.multi
    ipl, nbr = row_csr.ipl, row_csr.nbr
    distinct = params.distinct_nodes
    budget = params.max_expansions
    bitv = _bitv(dtype, H)
    walks = _NumpyWalks(prep, cache, source, target, H, dtype)
    expansions = scanned = 0
    exhausted = False
    found: list[tuple[list[int], list[int]]] = []
    raw = rng.bit_generator.random_raw  # one 64-bit draw per random pick (lazy Fisher-Yates)
    M = None
    nb = _enum_numba(rng)  # the compiled enumeration (same paths, draws and counters), or None
    if nb is not None:
        kern, fnp, stp = nb
        bitva = _BITV.get((dtype, H, "array"))
        if bitva is None:
            bitva = _BITV[(dtype, H, "array")] = np.array(bitv, dtype=dtype)
            _warm_numba(kern, dtype)

    def children(u: int, r: int) -> list:
        """Frame [nodes, next, offsets, lo] of u's neighbours with a walk of exactly r hops to the
        target (their positions in the row CSR: ``lo + offsets[i]``)."""
        lo, hi = ipl[u], ipl[u + 1]
        row = nbr[lo:hi]
        if r == 0:  # only the target has a walk of 0 hops to the target
            j0, j1 = int(row.searchsorted(target)), int(row.searchsorted(target, "right"))
            return [[target] * (j1 - j0), 0, list(range(j0, j1)), lo]
        idx = (M[row] & bitv[r]).nonzero()[0]
        return [row[idx].tolist(), 0, idx.tolist(), lo]

    try:
        for L in range(1, H + 1):
            if not walks.prepare(L):
                continue
            M = walks.M
            # ---- enumerate the simple paths of exactly L hops ----
            if expansions >= budget:
                exhausted = True
                break
            expansions += 1
            lo = ipl[source]
            if L == 1 and distinct:  # the source has bit 1: it is a neighbour of the target
                found.append(([source, target], [lo + int(nbr[lo:ipl[source + 1]].searchsorted(target))]))
                if len(found) >= k:
                    break
                continue
            if nb is not None:
                nf, out_n, out_e, ex, sc, exhausted = kern(row_csr.indptr, nbr, M, bitva, source, target, L, distinct,
                                                          k - len(found), budget - expansions, fnp, stp)
                expansions += ex
                scanned += sc
                if nf:
                    found.extend(zip(out_n[:nf].tolist(), out_e[:nf].tolist()))
                if exhausted or len(found) >= k:
                    break
                continue
            path = [source]
            pe: list[int] = []
            on = {source}
            fr = children(source, L - 1)
            scanned += ipl[source + 1] - lo
            stack = [fr]
            last = L - 1  # position whose nodes are neighbours of the target
            while stack:
                fr = stack[-1]
                c, i = fr[0], fr[1]
                m = len(c)
                if i >= m:
                    stack.pop()
                    if len(path) > 1:
                        on.discard(path.pop())
                        pe.pop()
                    continue
                if m - i > 1:  # random order, drawn lazily: pick one of the remaining children
                    j = i + ((raw() * (m - i)) >> 64)
                    c[i], c[j] = c[j], c[i]
                    es = fr[2]
                    es[i], es[j] = es[j], es[i]
                fr[1] = i + 1
                v = c[i]
                if v in on:
                    continue
                pos = len(path)
                if v == target:
                    if pos == L:
                        found.append((path + [v], pe + [fr[3] + fr[2][i]]))
                        if len(found) >= k:
                            break
                    continue
                if expansions >= budget:
                    exhausted = True
                    break
                expansions += 1
                if distinct and pos == last:  # v is a neighbour of the target: a path
                    lo = ipl[v]
                    found.append((path + [v, target],
                                  pe + [fr[3] + fr[2][i], lo + int(nbr[lo:ipl[v + 1]].searchsorted(target))]))
                    if len(found) >= k:
                        break
                    continue
                path.append(v)
                pe.append(fr[3] + fr[2][i])
                on.add(v)
                stack.append(children(v, L - pos - 1))
                scanned += ipl[v + 1] - ipl[v]
            if exhausted or len(found) >= k:
                break
    finally:  # a failed search must not leave bits in the shared work array
        walks.release()
    _bump(stats, "sides", walks.new_sides)
    _bump(stats, "bfs_edges", walks.finish())
    _bump(stats, "expansions", expansions)
    _bump(stats, "edges_scanned", scanned)
    if not found:
        return [], exhausted
    flat = [e for _, pe in found for e in pe]
    rows = triples[row_csr.tid[flat]].tolist()
    paths, off = [], 0
    for nodes, _ in found:
        n = len(nodes) - 1
        paths.append(KGPath(hops=list(map(tuple, rows[off:off + n])), nodes=nodes, complete=True, method="bidir"))
        off += n
    return paths, exhausted


# --------------------------------------------------------------------------- #
# Optional numba kernels for the bidirectional enumeration (numpy/Python fallback above)
# --------------------------------------------------------------------------- #
# The depth-first enumeration is the same algorithm as the Python loop in ``_bidirectional``,
# compiled with numba when it is installed: the same children (row order, bit filter), the same
# lazy Fisher-Yates picks -- each one 64-bit draw from the Generator's own bit generator, called
# through its C function pointer, so the Generator's stream advances exactly as with
# ``bit_generator.random_raw`` -- the same budget and counters, hence the same paths and stats.
# Used only where ``random_raw`` *is* ``next_uint64`` (the 64-bit bit generators below) and
# ``KALE_RAY_NUMBA`` is not "0". ``JIT_STATS`` records the one-off cost (numba import plus
# compile or on-disk cache load, per process): benchmarks report it alongside the search.
_RAW64_BITGENS = tuple(getattr(np.random, name) for name in ("PCG64", "PCG64DXSM", "SFC64", "Philox")
                       if hasattr(np.random, name))
JIT_STATS: dict = {"available": None, "import_s": 0.0, "compile_s": 0.0, "kernels": []}
_NB: dict = {}  # "enum": the dispatcher; (bitgen type) -> next_uint64 address


def _numba_enabled() -> bool:
    ok = JIT_STATS["available"]
    if ok is None:
        ok = False
        if os.environ.get("KALE_RAY_NUMBA", "1").strip().lower() not in ("0", "false", "no", "off"):
            t0 = time.perf_counter()
            try:
                _NB["enum"] = _build_numba_enum()
                ok = True
            except Exception:  # numba missing or broken: the numpy/Python path
                ok = False
            JIT_STATS["import_s"] = time.perf_counter() - t0
        JIT_STATS["available"] = ok
    return ok


def _build_numba_enum():
    import numba
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def next_u64(typingctx, fnptr, state):
        """``bitgen->next_uint64(bitgen->state)`` from the two addresses."""
        sig = types.uint64(types.uintp, types.uintp)

        def codegen(context, builder, sig, args):
            i8p = ir.IntType(8).as_pointer()
            fnty = ir.FunctionType(ir.IntType(64), (i8p,))
            fp = builder.inttoptr(args[0], fnty.as_pointer())
            return builder.call(fp, (builder.inttoptr(args[1], i8p),))
        return sig, codegen

    # a module global, not a closure cell: numba's on-disk cache keys on closure contents (an
    # intrinsic there would miss the cache in every new process)
    globals()["_nb_next_u64"] = next_u64

    def enum(indptr, nbr, M, bitv, source, target, L, distinct, kleft, budget_left, fnptr, state):
        """Simple paths source -> target of exactly L hops (see ``_bidirectional``): returns
        (found, nodes (cap, L + 1), entries (cap, L), expansions, scanned, exhausted)."""
        cap = min(kleft, 16)
        out_n = np.empty((cap, L + 1), dtype=np.int64)
        out_e = np.empty((cap, L), dtype=np.int64)
        nf = 0
        path = np.empty(L + 1, dtype=np.int64)
        pe = np.empty(L + 1, dtype=np.int64)
        fstart = np.empty(L + 1, dtype=np.int64)
        fend = np.empty(L + 1, dtype=np.int64)
        fcur = np.empty(L + 1, dtype=np.int64)
        bn = np.empty(256, dtype=np.int64)  # the frames' children, stacked
        be = np.empty(256, dtype=np.int64)
        exp = 0
        scanned = 0
        exhausted = False
        mask32 = np.uint64(0xFFFFFFFF)
        s32 = np.uint64(32)
        path[0] = source
        plen = 1
        u = source
        r = L - 1
        depth = 0
        used = 0
        while True:
            # ---- push the frame of u's children with bit r (r == 0: the target's entries) ----
            lo = indptr[u]
            hi = indptr[u + 1]
            if used + (hi - lo) > bn.size:
                size = max(2 * bn.size, used + (hi - lo))
                bn2 = np.empty(size, dtype=np.int64)
                be2 = np.empty(size, dtype=np.int64)
                bn2[:used] = bn[:used]
                be2[:used] = be[:used]
                bn = bn2
                be = be2
            fstart[depth] = used
            fcur[depth] = used
            if r == 0:
                for e in range(lo, hi):
                    if nbr[e] == target:
                        bn[used] = target
                        be[used] = e
                        used += 1
            else:
                b = bitv[r]
                for e in range(lo, hi):
                    w = nbr[e]
                    if M[w] & b:
                        bn[used] = w
                        be[used] = e
                        used += 1
            fend[depth] = used
            depth += 1
            scanned += hi - lo
            # ---- run until the next push ----
            pushed = False
            while depth > 0:
                f = depth - 1
                i = fcur[f]
                m = fend[f]
                if i >= m:
                    depth -= 1
                    used = fstart[f]
                    if plen > 1:
                        plen -= 1
                    continue
                if m - i > 1:  # the high 64 bits of raw * (m - i), as the Python loop's ``>> 64``
                    x = _nb_next_u64(fnptr, state)  # noqa: F821 (set above)
                    n = np.uint64(m - i)
                    hi_ = (x >> s32) * n
                    lo_ = (x & mask32) * n
                    j = i + np.int64((hi_ + (lo_ >> s32)) >> s32)
                    t = bn[i]
                    bn[i] = bn[j]
                    bn[j] = t
                    t = be[i]
                    be[i] = be[j]
                    be[j] = t
                fcur[f] = i + 1
                v = bn[i]
                onpath = False
                for q in range(plen):
                    if path[q] == v:
                        onpath = True
                        break
                if onpath:
                    continue
                pos = plen
                if v == target:
                    if pos == L:
                        if nf == cap:
                            cap *= 2
                            n2 = np.empty((cap, L + 1), dtype=np.int64)
                            e2 = np.empty((cap, L), dtype=np.int64)
                            n2[:nf] = out_n[:nf]
                            e2[:nf] = out_e[:nf]
                            out_n = n2
                            out_e = e2
                        out_n[nf, :plen] = path[:plen]
                        out_n[nf, plen] = v
                        out_e[nf, :plen - 1] = pe[:plen - 1]
                        out_e[nf, plen - 1] = be[i]
                        nf += 1
                        if nf >= kleft:
                            return nf, out_n, out_e, exp, scanned, exhausted
                    continue
                if exp >= budget_left:
                    return nf, out_n, out_e, exp, scanned, True
                exp += 1
                if distinct and pos == L - 1:  # v is a neighbour of the target: a path
                    if nf == cap:
                        cap *= 2
                        n2 = np.empty((cap, L + 1), dtype=np.int64)
                        e2 = np.empty((cap, L), dtype=np.int64)
                        n2[:nf] = out_n[:nf]
                        e2[:nf] = out_e[:nf]
                        out_n = n2
                        out_e = e2
                    vlo = indptr[v]
                    out_n[nf, :plen] = path[:plen]
                    out_n[nf, plen] = v
                    out_n[nf, plen + 1] = target
                    out_e[nf, :plen - 1] = pe[:plen - 1]
                    out_e[nf, plen - 1] = be[i]
                    out_e[nf, plen] = vlo + np.searchsorted(nbr[vlo:indptr[v + 1]], target)
                    nf += 1
                    if nf >= kleft:
                        return nf, out_n, out_e, exp, scanned, exhausted
                    continue
                path[plen] = v
                pe[plen - 1] = be[i]
                plen += 1
                u = v
                r = L - pos - 1
                pushed = True
                break
            if not pushed:
                return nf, out_n, out_e, exp, scanned, exhausted

    return numba.njit(cache=True, nogil=True)(enum)


def _enum_numba(rng):
    """The compiled enumeration and the bit generator's (next_uint64, state) addresses, or None."""
    bg = rng.bit_generator
    tp = type(bg)
    if tp not in _RAW64_BITGENS or not _numba_enabled():
        return None
    fn = _NB.get(tp)
    if fn is None:
        import ctypes

        fn = _NB[tp] = ctypes.cast(bg.ctypes.next_uint64, ctypes.c_void_p).value
    return _NB["enum"], fn, bg.ctypes.state_address


def _warm_numba(kern, dtype) -> None:
    """Compile (or load from numba's cache) the kernel for bits of ``dtype`` on a 2-node graph, timed."""
    key = ("warm", np.dtype(dtype).str)
    if key in _NB:
        return
    t0 = time.perf_counter()
    ip, nb = np.array([0, 1, 2], dtype=np.int64), np.array([1, 0], dtype=np.intp)
    kern(ip, nb, np.array([0, 1], dtype=dtype), np.array([1, 2], dtype=dtype), 0, 1, 1, False, 1, 1, 0, 0)
    JIT_STATS["compile_s"] += time.perf_counter() - t0
    JIT_STATS["kernels"].append(np.dtype(dtype).name)
    _NB[key] = True


def _tree_path(index: GraphIndex, triples: np.ndarray, pedge: np.ndarray, pnode: np.ndarray,
               source: int, end: int, complete: bool, method: str) -> KGPath:
    nodes, edges = [end], []
    v = end
    while v != source:
        edges.append(int(pedge[v]))
        v = int(pnode[v])
        nodes.append(v)
    nodes.reverse()
    edges.reverse()
    return KGPath(hops=[_edge_hop(index, triples, e) for e in edges], nodes=nodes, complete=complete, method=method)


def _partial_path(index: GraphIndex, triples: np.ndarray, source: int, target: int, params: PathSearchParams,
                  stats: dict | None, tree=None) -> list[KGPath]:
    if params.max_hops == 0:
        return []
    ds, pedge, pnode = tree if tree is not None else bfs_tree(index, source, max_depth=params.max_hops, stats=stats)
    dt = bfs_distances(index, target, stats=stats)
    ball = np.flatnonzero(ds > 0)
    ball = ball[dt[ball] >= 0]
    if ball.size == 0:  # target in another component (or isolated source): no direction to go
        return []
    best = int(ball[np.lexsort((ball, ds[ball], dt[ball]))[0]])
    _bump(stats, "partials")
    return [_tree_path(index, triples, pedge, pnode, source, best, complete=False, method="partial")]


# --------------------------------------------------------------------------- #
# Relation-following search (paths whose hops use the relations a question asks about)
# --------------------------------------------------------------------------- #
def _check_weights(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim not in (1, 2):
        raise ValueError(f"relation_weights must be a 1-D array over relation ids (or 2-D: hop x relation), "
                         f"got shape {w.shape}")
    return w


def _padded_weights(prep, rel: np.ndarray, w: np.ndarray) -> np.ndarray | None:
    """``w`` zero-padded to cover every relation id of ``rel`` (so a row reads ``w[rel[lo:hi]]``
    directly); None when ``rel`` is empty. The largest id is computed once per ``_Prepared``."""
    top = getattr(prep, "_max_rel", None)
    if top is None or top[0] is not rel:
        top = prep._max_rel = (rel, int(rel.max()) + 1 if rel.size else 0)
    if top[1] == 0:
        return None
    if w.size >= top[1]:
        return w
    out = np.zeros(top[1], dtype=w.dtype)
    out[: w.size] = w
    return out


def _allowed(w: np.ndarray, rr: np.ndarray) -> np.ndarray:
    """``w[rr] > 0`` with relation ids beyond ``len(w)`` not allowed."""
    if w.size == 0:
        return np.zeros(rr.size, dtype=bool)
    return (rr < w.size) & (w[np.minimum(rr, w.size - 1)] > 0)


def _sequence_paths(index: GraphIndex, triples: np.ndarray, source: int, target: int, params: PathSearchParams,
                    rng: np.random.Generator, W: np.ndarray, stats: dict | None) -> list[KGPath]:
    """The chain search from the cheaper end: its backward layers grow from the endpoint with the
    smaller row (on a power-law graph a hub's neighbourhood is what costs); paths read source -> target."""
    prep = _prepared(index)[0]
    ipl = prep.multi.ipl
    if len(W) > 1 and (ipl[target + 1] - ipl[target]) > (ipl[source + 1] - ipl[source]):
        found = _sequence_paths_to(index, triples, target, source, params, rng, W[::-1], stats, prefer_forward=False)
        return [KGPath(hops=p.hops[::-1], nodes=p.nodes[::-1], complete=p.complete, method=p.method) for p in found]
    return _sequence_paths_to(index, triples, source, target, params, rng, W, stats)


def _sequence_paths_to(index: GraphIndex, triples: np.ndarray, source: int, target: int, params: PathSearchParams,
                       rng: np.random.Generator, W: np.ndarray, stats: dict | None,
                       prefer_forward: bool = True) -> list[KGPath]:
    """Simple paths of exactly ``n = len(W)`` hops whose hop ``i`` uses a relation with
    ``W[i, r] > 0`` (a relation chain, e.g. the one a question spells out), in either direction.

    Layered and sparse: ``layer[i]`` = nodes with an allowed walk of hops ``i .. n-1`` to the
    target (a backward pass from the target over the allowed edges of each position, stopped
    after ``max_expansions`` rows), then a depth-first enumeration from the source through the
    layers, forward-walked entries (head -> tail as stored) before backward ones, random order
    within each group. Up to ``k`` paths, those with more forward hops first; ``"relation"``.
    """
    n, k = len(W), params.k
    if n == 0 or n > params.max_hops:
        return []
    prep = _prepared(index)[0]
    csr = prep.multi
    ipl, nbr = csr.ipl, csr.nbr
    rel = prep.entry_relations(triples)
    fwd = prep.entry_forward(triples)
    budget = params.max_expansions
    rows_read = 0
    scanned = 0
    Wp = [_padded_weights(prep, rel, W[i]) for i in range(n)]

    def row(u: int, i: int):
        nonlocal scanned
        lo, hi = ipl[u], ipl[u + 1]
        scanned += hi - lo
        w = Wp[i]
        idx = np.flatnonzero(w[rel[lo:hi]] > 0) if w is not None else np.flatnonzero(_allowed(W[i], rel[lo:hi]))
        return nbr[lo:hi][idx], idx + lo

    # backward: layer[i] = nodes from which hops i..n-1 reach the target; one vectorised read of
    # every row of a layer (the graph is undirected: u's allowed entries at position i reach back)
    ipl_a = np.asarray(ipl)
    layer: list[set] = [set() for _ in range(n + 1)]
    layer[n] = {target}
    cur_a = np.asarray([target], dtype=np.int64)
    for i in range(n - 1, -1, -1):
        cur_a = cur_a[: max(0, budget - rows_read)]
        rows_read += int(cur_a.size)
        lo, hi = ipl_a[cur_a], ipl_a[cur_a + 1]
        lens = hi - lo
        total = int(lens.sum())
        scanned += total
        if total:
            ent = np.repeat(lo - np.cumsum(lens) + lens, lens) + np.arange(total)
            w = Wp[i]
            ok = (w[rel[ent]] > 0) if w is not None else _allowed(W[i], rel[ent])
            cur_a = np.unique(np.asarray(nbr)[ent[ok]])
        else:
            cur_a = np.empty(0, dtype=np.int64)
        layer[i] = set(cur_a.tolist())
        if not cur_a.size:
            return []
    if source not in layer[0]:
        return []
    found: list[tuple[list[int], list[int]]] = []
    path, pe, on = [source], [], {source}
    expansions = 0

    def frame(u: int, i: int) -> list:
        vs, es = row(u, i)
        nxt_layer = layer[i + 1]
        keep = [j for j, v in enumerate(vs.tolist()) if v in nxt_layer and v not in on]
        if params.distinct_nodes and i == n - 1:
            keep = [j for j in keep if vs[j] == target]
        if not keep:
            return [[], [], 0]
        keep = np.asarray(keep, dtype=np.int64)
        keep = keep[rng.permutation(keep.size)] if keep.size > 1 else keep
        keep = keep[np.argsort(~fwd[es[keep]] if prefer_forward else fwd[es[keep]], kind="stable")]  # forward first
        return [vs[keep].tolist(), es[keep].tolist(), 0]

    stack = [frame(source, 0)]
    seen: set = set()
    while stack and len(found) < k and expansions < budget:  # forward entries come first in each frame
        fr = stack[-1]
        if fr[2] >= len(fr[0]):
            stack.pop()
            if len(path) > 1:
                on.discard(path.pop())
                pe.pop()
            continue
        j = fr[2]
        fr[2] = j + 1
        v, e = fr[0][j], fr[1][j]
        if len(path) == n:  # v is the target (the last layer is {target})
            key = tuple(path) + (v,) if params.distinct_nodes else (tuple(path) + (v,), tuple(pe) + (e,))
            if key not in seen:
                seen.add(key)
                found.append((path + [v], pe + [e]))
            continue
        if v == target:
            continue
        expansions += 1
        path.append(v)
        pe.append(e)
        on.add(v)
        stack.append(frame(v, len(path) - 1))
    _bump(stats, "relation_expansions", expansions)
    _bump(stats, "edges_scanned", scanned)
    # more hops read forward first (walked from the other end, a forward hop is a backward entry)
    found.sort(key=lambda f: -int(fwd[f[1]].sum()) if prefer_forward else int(fwd[f[1]].sum()))
    return _as_paths(csr, triples, found[:k])


def _as_paths(csr: _CSR, triples: np.ndarray, found) -> list[KGPath]:
    if not found:
        return []
    flat = [e for _, pe in found for e in pe]
    trows = np.asarray(triples)[csr.tid[flat]].tolist()
    paths, off = [], 0
    for nodes, _ in found:
        m = len(nodes) - 1
        paths.append(KGPath(hops=list(map(tuple, trows[off:off + m])), nodes=nodes, complete=True, method="relation"))
        off += m
    return paths


def _relation_paths(index: GraphIndex, triples: np.ndarray, source: int, target: int, params: PathSearchParams,
                    rng: np.random.Generator, weights: np.ndarray, stats: dict | None) -> list[KGPath]:
    """Simple paths source -> target of at most ``max_hops`` hops whose every hop uses a relation
    with ``weights[r] > 0`` (relations beyond ``len(weights)`` count as 0).

    A constrained meet in the middle, sparse throughout (dicts, no |V|-sized array): a BFS from
    the target over the allowed edges to depth ``max_hops - 1`` (stopped after
    ``max_expansions`` scanned rows), then, for each length ``L = 1 .. max_hops``, a depth-first
    enumeration of the allowed simple paths of exactly ``L`` hops keeping only children within
    the remaining distance of the target (random child order from ``rng``), up to ``k`` paths
    per length. With ``distinct_nodes`` parallel allowed edges collapse to the one with the
    highest weight (the first in the index among equals). Returns the paths ranked by the
    number of distinct allowed relations they use (most first), then shorter, then found
    earlier; at most ``k``. Paths report ``"relation"``.
    """
    H, k = params.max_hops, params.k
    if H == 0:
        return []
    prep = _prepared(index)[0]
    csr = prep.multi
    ipl, nbr = csr.ipl, csr.nbr
    rel = prep.entry_relations(triples)
    w = weights
    if w.size == 0 or not (w > 0).any():
        return []
    nrel = w.size
    wpad = _padded_weights(prep, rel, w)
    budget = params.max_expansions
    rows: dict[int, tuple[list[int], list[int]]] = {}
    scanned = 0

    def row(u: int) -> tuple[list[int], list[int]]:
        nonlocal scanned
        r = rows.get(u)
        if r is None:
            lo, hi = ipl[u], ipl[u + 1]
            scanned += hi - lo
            rr = rel[lo:hi]
            ww = wpad[rr] if wpad is not None else np.where(rr < nrel, w[np.minimum(rr, nrel - 1)], 0.0)
            idx = np.flatnonzero(ww > 0)
            vs = nbr[lo:hi][idx]
            # rows are sorted by neighbour: parallel allowed edges are adjacent
            if params.distinct_nodes and idx.size > 1 and (vs[1:] == vs[:-1]).any():
                # best weight per neighbour, first among equals
                order = np.lexsort((idx, -ww[idx], vs))
                vs_o = vs[order]
                keep = np.ones(vs_o.size, dtype=bool)
                keep[1:] = vs_o[1:] != vs_o[:-1]
                idx = np.sort(idx[order][keep])
                vs = nbr[lo:hi][idx]
            r = rows[u] = (vs.tolist(), (idx + lo).tolist())
        return r

    # ---- allowed-edge distances to the target, up to H - 1 (sparse) ----
    dist = {target: 0}
    frontier = [target]
    rows_read = 0
    for d in range(1, H):
        nxt = []
        for u in frontier:
            if rows_read >= budget:
                break
            rows_read += 1
            for v in row(u)[0]:
                if v not in dist:
                    dist[v] = d
                    nxt.append(v)
        frontier = nxt
        if not frontier or rows_read >= budget:
            break
    far = H + 1
    # ---- enumerate, length by length ----
    found: list[tuple[list[int], list[int]]] = []
    expansions = 0
    for L in range(1, H + 1):
        if expansions >= budget:
            break
        n_len = 0
        path, pe, on = [source], [], {source}
        stack = []

        def frame(u: int, left: int) -> list:
            vs, es = row(u)
            if left == 1:
                pick = [i for i, v in enumerate(vs) if v == target]
            else:
                pick = [i for i, v in enumerate(vs) if v != target and v not in on and dist.get(v, far) <= left - 1]
            if len(pick) > 1:
                pick = [pick[i] for i in rng.permutation(len(pick)).tolist()]
            return [[vs[i] for i in pick], [es[i] for i in pick], 0]

        stack.append(frame(source, L))
        while stack and n_len < k and expansions < budget:
            fr = stack[-1]
            if fr[2] >= len(fr[0]):
                stack.pop()
                if len(path) > 1:
                    on.discard(path.pop())
                    pe.pop()
                continue
            i = fr[2]
            fr[2] = i + 1
            v, e = fr[0][i], fr[1][i]
            if v == target:
                found.append((path + [v], pe + [e]))
                n_len += 1
                continue
            if v in on:
                continue
            expansions += 1
            path.append(v)
            pe.append(e)
            on.add(v)
            stack.append(frame(v, L - len(path) + 1))
    _bump(stats, "relation_expansions", expansions)
    _bump(stats, "edges_scanned", scanned)
    if not found:
        return []
    flat = [e for _, pe in found for e in pe]
    trows = np.asarray(triples)[csr.tid[flat]].tolist()
    paths, off = [], 0
    for nodes, _ in found:
        n = len(nodes) - 1
        paths.append(KGPath(hops=list(map(tuple, trows[off:off + n])), nodes=nodes, complete=True, method="relation"))
        off += n
    order = sorted(range(len(paths)), key=lambda i: (-len({h[1] for h in paths[i].hops}), paths[i].length, i))
    return [paths[i] for i in order[:k]]


def find_paths(index: GraphIndex, triples: np.ndarray, source: int, target: int, params: PathSearchParams,
               rng: np.random.Generator, *, heuristic: LandmarkHeuristic | None = None,
               stats: dict | None = None, cache: PathCache | bool | None = None,
               relation_weights: np.ndarray | None = None) -> list[KGPath]:
    """Up to ``params.k`` distinct simple paths source -> target, shortest first (see module doc).

    ``heuristic`` may be a precomputed ``landmark_heuristic(index, target, ...)`` (e.g. cached
    per target; A* modes only); ``stats`` (a dict) accumulates expansions and scanned CSR
    entries. ``cache`` (``"bidirectional"`` only): a ``PathCache``, ``None`` for the index's
    shared one, ``False`` for none -- results do not depend on it.

    ``relation_weights`` (optional, one weight per relation id; ``> 0`` = relevant, e.g. the
    relations a question mentions): first the paths whose every hop uses a relevant relation
    (``_relation_paths``: most distinct relevant relations first, then shorter; method
    ``"relation"``), then, if fewer than ``k``, the ordinary shortest paths of ``params.heuristic``
    (not repeating a path), up to ``k`` in all. A 2-D ``(n, num_relations)`` array is a relation
    chain: first the paths of exactly ``n`` hops whose hop ``i`` uses a relation with
    ``W[i, r] > 0`` (``_sequence_paths``, forward-walked hops preferred), then the 1-D search
    with ``W.max(axis=0)``, then the shortest paths. The relation searches are sparse (bounded
    by the rows they read, at most ``max_expansions``); they never touch |V|-sized arrays.
    """
    triples = _check_triples(index, triples)
    source = _check_node(index, source, "source")
    target = _check_node(index, target, "target")
    if source == target:
        return [KGPath(hops=[], nodes=[source], complete=True, method="trivial")]
    indptr = index.indptr
    if indptr[source + 1] == indptr[source] or indptr[target + 1] == indptr[target]:
        return []  # isolated endpoint: no path and no direction for a partial path
    if relation_weights is not None:
        w = _check_weights(relation_weights)
        rel_paths: list[KGPath] = []
        chain_found = False
        if w.ndim == 2:
            rel_paths = _sequence_paths(index, triples, source, target, params, rng, w, stats)
            chain_found = bool(rel_paths)
            w = w.max(axis=0) if w.size else np.zeros(0)
        # The question's own chain was found: the shortest paths fill up the rest. The set search
        # (any hop of any mentioned relation) is the costly one (a sparse search from the target),
        # worth it only when the chain itself is not in the KG.
        if len(rel_paths) < params.k and not chain_found:
            seen = {p.key(params.distinct_nodes) for p in rel_paths}
            rel_paths += [p for p in _relation_paths(index, triples, source, target, params, rng, w, stats)
                          if p.key(params.distinct_nodes) not in seen]
            rel_paths = rel_paths[: params.k]
        _bump(stats, "relation_pairs")
        if rel_paths:
            _bump(stats, "relation_hits")
        if len(rel_paths) >= params.k:
            return rel_paths
        rest = find_paths(index, triples, source, target, params, rng, heuristic=heuristic, stats=stats, cache=cache)
        if not rel_paths:
            return rest
        seen = {p.key(params.distinct_nodes) for p in rel_paths}
        return (rel_paths + [p for p in rest if p.complete and p.key(params.distinct_nodes) not in seen])[: params.k]
    if params.heuristic == "bidirectional" and params.max_hops <= MAX_BIDIRECTIONAL_HOPS:
        if heuristic is not None and heuristic.target != target:
            raise ValueError(f"heuristic was built for target {heuristic.target}, not {target}")
        paths, exhausted = _bidirectional(index, triples, source, target, params, rng, stats, cache)
    else:
        if heuristic is None:
            heuristic = _target_heuristic(index, target, params, rng, stats)
        elif heuristic.target != target or len(heuristic.h) != index.num_nodes:
            raise ValueError(f"heuristic was built for target {heuristic.target}, not {target}")
        paths, exhausted = _best_first(index, triples, source, target, heuristic.h, params, rng, "astar", stats,
                                       heuristic.exact_depth)
    if len(paths) >= params.k or (paths and not exhausted):
        return paths
    if not exhausted:  # frontier ran dry with no goal: proven no path within max_hops
        return _partial_path(index, triples, source, target, params, stats) if params.partial_paths else []
    if not params.bfs_fallback:
        return paths
    # ---- BFS fallback: a shortest path for sure, more via exact-distance best-first ----
    _bump(stats, "fallbacks")
    tree = bfs_tree(index, source, max_depth=params.max_hops, stats=stats)
    ds, pedge, pnode = tree
    if ds[target] < 0:
        return _partial_path(index, triples, source, target, params, stats, tree) if params.partial_paths else []
    shortest = _tree_path(index, triples, pedge, pnode, source, target, complete=True, method="bfs")
    more: list[KGPath] = []
    if params.k > 1:
        exact = heuristic if heuristic is not None and heuristic.exact_depth is not None else landmark_heuristic(
            index, target, replace(params, heuristic="target"), rng, stats=stats)
        more, _ = _best_first(index, triples, source, target, exact.h, params, rng, "bfs", stats, exact.exact_depth)
    merged, seen = [], set()
    for p in sorted(paths + [shortest] + more, key=lambda p: p.length):  # stable: search paths first among equals
        key = p.key(params.distinct_nodes)
        if key not in seen:
            seen.add(key)
            merged.append(p)
    return merged[: params.k]


def find_paths_many(index: GraphIndex, triples: np.ndarray, pairs, params: PathSearchParams,
                    rng: np.random.Generator, *, stats: dict | None = None,
                    cache: PathCache | bool | None = None,
                    relation_weights: np.ndarray | None = None) -> list[list[KGPath]]:
    """``find_paths`` for many ``(source, target)`` pairs, in order: one list of paths per pair.

    The per-endpoint work is shared across the pairs: walk sets (``"bidirectional"``, through
    ``cache``; endpoints that recur -- a shared answer entity -- are grown once) or the
    landmark heuristic per target (A* modes; built once per distinct target of this call, in
    order of first appearance, so the rng draws stay deterministic). ``rng`` is consumed pair
    after pair: the same pairs in the same order give the same paths.
    """
    triples = _check_triples(index, triples)
    pairs = [(_check_node(index, s, "source"), _check_node(index, t, "target")) for s, t in pairs]
    bidir = params.heuristic == "bidirectional" and params.max_hops <= MAX_BIDIRECTIONAL_HOPS
    if bidir:
        cache = _resolve_cache(index, cache)[1]
    heur_cache: dict[int, LandmarkHeuristic] = {}
    indptr = index.indptr
    out = []
    for s, t in pairs:
        heur = None
        if not bidir and s != t and indptr[t + 1] > indptr[t] and indptr[s + 1] > indptr[s]:
            heur = heur_cache.get(t)
            if heur is None:
                heur = heur_cache[t] = _target_heuristic(index, t, params, rng, stats)
        out.append(find_paths(index, triples, s, t, params, rng, heuristic=heur, stats=stats,
                              cache=cache if bidir else None, relation_weights=relation_weights))
    return out


def sample_paths(index: GraphIndex, triples: np.ndarray, sources: list[int], targets: list[int],
                 params: PathSearchParams, rng: np.random.Generator, *, include_trivial: bool = False,
                 stats: dict | None = None, cache: PathCache | bool | None = None,
                 relation_weights: np.ndarray | None = None) -> list[KGPath]:
    """Paths for all (source, target) pairs: pairs de-duplicated, at most ``params.k`` per pair.

    A* modes: the landmark heuristic is built once per target and reused across sources.
    ``"bidirectional"``: the walk sets of every endpoint are cached (``cache``, by default the
    index's shared one, so they are reused across calls too). Pairs with ``source == target``
    give a hop-less "trivial" path only with ``include_trivial``. ``relation_weights``: as in
    ``find_paths`` (per pair: relation-following paths first).
    """
    triples = _check_triples(index, triples)
    srcs = list(dict.fromkeys(_check_node(index, s, "source") for s in sources))
    tgts = list(dict.fromkeys(_check_node(index, t, "target") for t in targets))
    pairs = [(s, t) for s in srcs for t in tgts if s != t or include_trivial]
    out: list[KGPath] = []
    seen: set = set()
    for found in find_paths_many(index, triples, pairs, params, rng, stats=stats, cache=cache,
                                 relation_weights=relation_weights):
        for p in found[: params.k]:
            key = p.key(params.distinct_nodes)
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def path_to_named(path: KGPath, kg: KnowledgeGraph) -> list[list[str]]:
    """``[[head_id, relation_id, tail_id], ...]`` with the KG's string ids."""
    return [[kg.entities[h], kg.relations[r], kg.entities[t]] for h, r, t in path.hops]


# --------------------------------------------------------------------------- #
# networkx interop (lazy import)
# --------------------------------------------------------------------------- #
def graph_index_from_networkx(graph, relation_attr: str = "relation", undirected: bool = True):
    """``(GraphIndex, KnowledgeGraph)`` from a networkx (Multi)(Di)Graph whose edges carry ``relation_attr``."""
    from kale_ray.core.kg import kg_from_networkx

    kg = kg_from_networkx(graph, relation_attr=relation_attr)
    return GraphIndex.from_kg(kg, undirected=undirected), kg


def to_simple_undirected_networkx(index: GraphIndex):
    """The index as a simple undirected ``nx.Graph`` over node ids (for hop-distance cross-checks)."""
    import networkx as nx

    g = nx.Graph()
    g.add_nodes_from(range(index.num_nodes))
    src = np.repeat(np.arange(index.num_nodes), np.diff(index.indptr))
    keep = src != index.nbr
    g.add_edges_from(zip(src[keep].tolist(), index.nbr[keep].tolist()))
    return g
