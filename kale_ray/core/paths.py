"""KI path synthesis (KALE): multi-path A* between question and answer entities on a KG.

Pure core: numpy and the standard library only (networkx only lazily, inside the interop
helpers at the bottom). Everything runs on the CSR ``GraphIndex`` of ``kale_ray.core.kg``.

Search
------
For a (source, target) pair we look for up to ``k`` distinct simple paths of at most
``max_hops`` hops, shortest first, with a multi-path A*:

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
* If A* expands ``max_expansions`` states before it has ``k`` paths and ``bfs_fallback`` is
  on, a BFS tree from the source (depth ``max_hops``) gives a shortest path for sure, and a
  second best-first search with the exact-distance ``"target"`` heuristic (same budget) adds
  further paths. Paths found this way report ``"bfs"``; they are merged with the A* ones,
  de-duplicated and sorted by length. With ``bfs_fallback`` off, the paths A* found so far
  (possibly none) are returned.
* A pair has *no* complete path only when that is proven (A* ran out of frontier, the
  heuristic of the source already exceeds ``max_hops``, or the fallback BFS does not reach
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
    "find_paths",
    "sample_paths",
    "path_to_named",
    "graph_index_from_networkx",
    "to_simple_undirected_networkx",
]


HEURISTICS = ("landmark", "target")

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
    heuristic: str = "landmark"  # "landmark" (paper: sampled anchors) | "target" (the target as its only landmark)

    def __post_init__(self) -> None:
        if self.heuristic not in HEURISTICS:
            raise ValueError(f"PathSearchParams.heuristic must be one of {HEURISTICS}, got {self.heuristic!r}")
        for name, lo in (("max_hops", 0), ("k", 1), ("num_anchors", 0), ("anchor_hops", 1), ("max_expansions", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
                raise ValueError(f"PathSearchParams.{name} must be an integer >= {lo}, got {v!r}")


@dataclass
class KGPath:
    hops: list[tuple[int, int, int]]  # real triples (head, relation, tail), each read FORWARD as stored
    nodes: list[int]  # the walk's node sequence source..end (len = len(hops) + 1)
    complete: bool  # reaches the target
    method: str  # "astar" | "bfs" | "partial" | "trivial"

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
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{role} id {x!r} is not an integer entity id")
    n = int(index.num_nodes)
    xi = int(x)
    if xi < 0 or xi >= n:
        raise ValueError(f"{role} id {xi} is out of range: the graph has {n} entities (ids 0..{n - 1})")
    return xi


def _check_triples(index: GraphIndex, triples: np.ndarray) -> np.ndarray:
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
    if params.heuristic == "target":
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


def find_paths(index: GraphIndex, triples: np.ndarray, source: int, target: int, params: PathSearchParams,
               rng: np.random.Generator, *, heuristic: LandmarkHeuristic | None = None,
               stats: dict | None = None) -> list[KGPath]:
    """Up to ``params.k`` distinct simple paths source -> target, shortest first (see module doc).

    ``heuristic`` may be a precomputed ``landmark_heuristic(index, target, ...)`` (e.g. cached
    per target); ``stats`` (a dict) accumulates expansions and scanned CSR entries.
    """
    triples = _check_triples(index, triples)
    source = _check_node(index, source, "source")
    target = _check_node(index, target, "target")
    if source == target:
        return [KGPath(hops=[], nodes=[source], complete=True, method="trivial")]
    indptr = index.indptr
    if indptr[source + 1] == indptr[source] or indptr[target + 1] == indptr[target]:
        return []  # isolated endpoint: no path and no direction for a partial path
    if heuristic is None:
        heuristic = landmark_heuristic(index, target, params, rng, stats=stats)
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
        exact = heuristic if heuristic.exact_depth is not None else landmark_heuristic(
            index, target, replace(params, heuristic="target"), rng, stats=stats)
        more, _ = _best_first(index, triples, source, target, exact.h, params, rng, "bfs", stats, exact.exact_depth)
    merged, seen = [], set()
    for p in sorted(paths + [shortest] + more, key=lambda p: p.length):  # stable: A* paths first among equals
        key = p.key(params.distinct_nodes)
        if key not in seen:
            seen.add(key)
            merged.append(p)
    return merged[: params.k]


def sample_paths(index: GraphIndex, triples: np.ndarray, sources: list[int], targets: list[int],
                 params: PathSearchParams, rng: np.random.Generator, *, include_trivial: bool = False,
                 stats: dict | None = None) -> list[KGPath]:
    """Paths for all (source, target) pairs: pairs de-duplicated, at most ``params.k`` per pair.

    The landmark heuristic is built once per target and reused across sources. Pairs with
    ``source == target`` give a hop-less "trivial" path only with ``include_trivial``.
    """
    triples = _check_triples(index, triples)
    srcs = list(dict.fromkeys(_check_node(index, s, "source") for s in sources))
    tgts = list(dict.fromkeys(_check_node(index, t, "target") for t in targets))
    cache: dict[int, LandmarkHeuristic] = {}
    out: list[KGPath] = []
    seen: set = set()
    for s in srcs:
        for t in tgts:
            if s == t and not include_trivial:
                continue
            heur = None
            if s != t and index.indptr[t + 1] > index.indptr[t] and index.indptr[s + 1] > index.indptr[s]:
                heur = cache.get(t)
                if heur is None:
                    heur = cache[t] = landmark_heuristic(index, t, params, rng, stats=stats)
            for p in find_paths(index, triples, s, t, params, rng, heuristic=heur, stats=stats)[: params.k]:
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
