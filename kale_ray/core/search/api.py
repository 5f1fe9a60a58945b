"""Path search entry points: ``find_paths`` (dispatch to a strategy, BFS fallback, partial
paths), ``find_paths_many``, ``sample_paths``, ``path_to_named`` and the networkx interop.

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

networkx is imported only lazily, inside the interop helpers at the bottom.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from kale_ray.core.kg import GraphIndex, KnowledgeGraph
from kale_ray.core.search.arrays import _resolve_cache
from kale_ray.core.search.bidirectional import _bidirectional
from kale_ray.core.search.common import (
    KGPath,
    PathSearchParams,
    _bump,
    _check_node,
    _check_triples,
    _partial_path,
    _tree_path,
    bfs_tree,
)
from kale_ray.core.search.landmark import LandmarkHeuristic, _best_first, _target_heuristic, landmark_heuristic
from kale_ray.core.search.relations import _check_weights, _relation_paths, _sequence_paths
from kale_ray.core.search.walks import MAX_BIDIRECTIONAL_HOPS, PathCache


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
    with ``W.max(axis=0)``, then the shortest paths (with ``params.fill_after_chain`` off, a chain
    that was found is returned alone: the shortest paths are only the fallback). The relation searches are sparse (bounded
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
        if len(rel_paths) >= params.k or (chain_found and not params.fill_after_chain):
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
