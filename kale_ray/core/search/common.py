"""Path search, the shared pieces: parameters, results, validation, counters and BFS.

``PathSearchParams`` (every mode's knobs, validated on construction), ``KGPath`` (a result:
real triples plus the walk's node sequence), node / triple checks, the ``stats`` counters
(``_bump``), the level-synchronous BFS vectorised over the CSR ``GraphIndex`` of
``kale_ray.core.kg`` (``bfs_distances``, ``bfs_tree``) and the BFS-tree paths that the BFS
fallback and the partial paths return (``_tree_path``, ``_partial_path``; see
``kale_ray.core.search.api``). The strategies live beside this module: ``landmark`` (A*),
``bidirectional``, ``relations``.

* With ``distinct_nodes=True`` (default) two paths are distinct when their node sequences
  differ (parallel edges between the same two nodes collapse to the first one in the index);
  with ``False`` paths that differ only in the triple used for a hop are distinct too
  (``KGPath.key``).

Pure core: numpy and the standard library only.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from kale_ray.core.kg import GraphIndex

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
    # relation chain given (2-D ``relation_weights``) and found: fill up to ``k`` with the ordinary
    # shortest paths (True) or return the chain's own paths only (False; the shortest-path search is
    # then the fallback for questions whose chain is not in the KG)
    fill_after_chain: bool = True

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


def _edge_hop(index: GraphIndex, triples: np.ndarray, e: int) -> tuple[int, int, int]:
    row = triples[int(index.tid[e])]
    return (int(row[0]), int(row[1]), int(row[2]))


# --------------------------------------------------------------------------- #
# BFS-tree paths (the BFS fallback and partial paths)
# --------------------------------------------------------------------------- #
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
