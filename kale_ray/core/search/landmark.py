"""The A* modes of the path search: landmark / target heuristics and the multi-path A*.

For a (source, target) pair the A* looks for up to ``k`` distinct simple paths of at most
``max_hops`` hops, shortest first:

* ``f(e) = g(e) + h(e)``; ``g`` = hops so far.
* ``heuristic="landmark"`` (the paper's): ``h`` is the landmark (ALT) lower bound
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

Paths report ``"astar"`` (``"bfs"`` from the fallback's second best-first search, see
``kale_ray.core.search.api``).
"""
from __future__ import annotations

import heapq
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from kale_ray.core.kg import GraphIndex
from kale_ray.core.search.common import (
    KGPath,
    PathSearchParams,
    _bump,
    _check_node,
    _edge_hop,
    _frontier_edges,
    bfs_distances,
)


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
