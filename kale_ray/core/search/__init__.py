"""KI path synthesis (KALE): multi-path search between question and answer entities on a KG.

Pure core: numpy and the standard library only (numba optional, imported lazily; networkx only
lazily, inside the interop helpers of ``api``). Everything runs on the CSR ``GraphIndex`` of
``kale_ray.core.kg``.

For a (source, target) pair we look for up to ``k`` distinct simple paths of at most
``max_hops`` hops, shortest first. One module per strategy or concern:

* ``api`` -- the entry points: ``find_paths`` (dispatch on ``PathSearchParams.heuristic``, BFS
  fallback, partial paths), ``find_paths_many``, ``sample_paths``, ``path_to_named``, networkx
  interop.
* ``common`` -- ``PathSearchParams``, ``KGPath``, validation, ``stats`` counters, BFS
  (``bfs_distances``, ``bfs_tree``) and BFS-tree paths.
* ``landmark`` -- the A* modes: ``heuristic="landmark"`` (the paper's ALT lower bound, sampled
  anchors or a ``LandmarkTable`` built once per graph) and ``heuristic="target"`` (the target as
  its only landmark), and the multi-path A* (``_best_first``). Paths report ``"astar"``.
* ``bidirectional`` -- ``heuristic="bidirectional"`` (the default of ``PathConfig``, the fastest;
  not an A*): meet in the middle over walk sets, then a depth-first enumeration of the simple
  paths of each length. Paths report ``"bidir"``. Its walk sets and their cache
  (``PathCache``) are in ``walks``, the optional compiled enumeration in ``numba_kernel``.
* ``arrays`` -- the per-index search CSRs shared by the bidirectional and relation searches
  (``search_arrays`` / ``attach_search_arrays``: built once, shared zero-copy by workers).
* ``relations`` -- ``relation_weights``: paths through the relations a question mentions (a set)
  or spells out (a hop x relation chain) first; method ``"relation"``.

All modes share one results contract: k shortest simple paths, shortest first. Every hop is a
real KG triple: a CSR edge maps back through ``tid`` to ``triples[tid]``, reported in its stored
forward orientation even when the walk used it backwards (``KGPath.nodes`` carries the walk
direction).
"""
from __future__ import annotations

from kale_ray.core.search.api import (
    find_paths,
    find_paths_many,
    graph_index_from_networkx,
    path_to_named,
    sample_paths,
    to_simple_undirected_networkx,
)
from kale_ray.core.search.arrays import (
    REQUIRED_SEARCH_ARRAYS,
    SEARCH_ARRAY_NAMES,
    attach_search_arrays,
    path_cache,
    search_arrays,
)
from kale_ray.core.search.common import HEURISTICS, KGPath, PathSearchParams, bfs_distances, bfs_tree
from kale_ray.core.search.landmark import (
    NUM_LANDMARKS,
    LandmarkHeuristic,
    LandmarkTable,
    attach_landmark_table,
    build_landmark_table,
    landmark_heuristic,
    landmark_table,
    table_heuristic,
)
from kale_ray.core.search.numba_kernel import JIT_STATS
from kale_ray.core.search.walks import MAX_BIDIRECTIONAL_HOPS, PathCache

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
    # the landmark table and the constants (kgstore and the tests use them)
    "HEURISTICS",
    "MAX_BIDIRECTIONAL_HOPS",
    "REQUIRED_SEARCH_ARRAYS",
    "NUM_LANDMARKS",
    "LandmarkTable",
    "build_landmark_table",
    "landmark_table",
    "attach_landmark_table",
    "table_heuristic",
]
