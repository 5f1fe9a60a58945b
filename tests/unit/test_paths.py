"""KI path synthesis (kale_ray.core.paths): multi-path A* with landmark heuristic, BFS fallback, partial paths."""
from __future__ import annotations

from dataclasses import replace
from itertools import islice

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kale_ray.core.kg import GraphIndex, KnowledgeGraph
from kale_ray.core.paths import (
    KGPath,
    PathCache,
    PathSearchParams,
    bfs_distances,
    bfs_tree,
    find_paths,
    find_paths_many,
    path_cache,
    graph_index_from_networkx,
    landmark_heuristic,
    path_to_named,
    sample_paths,
    to_simple_undirected_networkx,
)

MODES = ("landmark", "target", "bidirectional")
SEARCH_METHOD = {"landmark": "astar", "target": "astar", "bidirectional": "bidir"}


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def random_graph(seed: int, n_lo: int = 50, n_hi: int = 300, num_rel: int = 4):
    r = np.random.default_rng(seed)
    n = int(r.integers(n_lo, n_hi + 1))
    m = int(n * r.uniform(0.7, 2.0))
    tr = np.stack([r.integers(0, n, m), r.integers(0, num_rel, m), r.integers(0, n, m)], axis=1)
    tr = np.unique(tr, axis=0).astype(np.int64)
    index = GraphIndex.build(tr, n)
    return tr, index, to_simple_undirected_networkx(index)


def assert_valid(path: KGPath, triples: np.ndarray, source: int, max_hops: int) -> None:
    tset = {tuple(map(int, t)) for t in triples}
    assert len(path.nodes) == len(path.hops) + 1
    assert path.nodes[0] == source
    assert len(path.hops) <= max_hops
    assert len(set(path.nodes)) == len(path.nodes), "paths are simple"
    for (h, r, t), a, b in zip(path.hops, path.nodes, path.nodes[1:]):
        assert (h, r, t) in tset, "every hop is a real, forward-stored triple"
        assert {h, t} == {a, b}, "hop i joins nodes i and i+1 (the walk chains)"
    for i in range(len(path.hops) - 1):  # consecutive hops share the walk's middle node
        assert path.nodes[i + 1] in (path.hops[i][0], path.hops[i][2])
        assert path.nodes[i + 1] in (path.hops[i + 1][0], path.hops[i + 1][2])


def nx_k_shortest_lengths(g, s, t, k, max_hops):
    out = []
    for p in islice(nx.shortest_simple_paths(g, s, t), k):
        if len(p) - 1 > max_hops:
            break
        out.append(len(p) - 1)
    return out


# --------------------------------------------------------------------------- #
# BFS and heuristic
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seed", range(4))
def test_bfs_distances_match_networkx(seed):
    _, index, g = random_graph(seed)
    for s in (0, index.num_nodes // 2, index.num_nodes - 1):
        ref = nx.single_source_shortest_path_length(g, s)
        d = bfs_distances(index, s)
        assert d.dtype == np.int32
        assert {i: int(x) for i, x in enumerate(d) if x >= 0} == ref
        d2 = bfs_distances(index, s, max_depth=2)
        assert {i: int(x) for i, x in enumerate(d2) if x >= 0} == {v: x for v, x in ref.items() if x <= 2}
        dist, pedge, pnode = bfs_tree(index, s, max_depth=3)
        for v in np.flatnonzero(dist > 0):  # parent pointers follow real edges one level up
            e = pedge[v]
            assert index.nbr[e] == v and dist[pnode[v]] == dist[v] - 1
            assert index.indptr[pnode[v]] <= e < index.indptr[pnode[v] + 1]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("mode,two_sided", [("landmark", True), ("landmark", False), ("target", True)])
def test_heuristic_is_admissible_and_consistent(seed, mode, two_sided):
    tr, index, g = random_graph(seed)
    rng = np.random.default_rng(seed)
    for max_hops in (2, 4):
        params = PathSearchParams(max_hops=max_hops, heuristic=mode, two_sided=two_sided, num_anchors=4)
        for t in rng.choice(index.num_nodes, size=4, replace=False).tolist():
            heur = landmark_heuristic(index, t, params, rng)
            true = bfs_distances(index, t)
            h = heur.h
            reach = true >= 0
            assert np.all(h[reach] <= true[reach]), "h never overestimates the hop distance"
            assert h[t] == 0
            src = np.repeat(np.arange(index.num_nodes), np.diff(index.indptr))
            assert np.all(np.abs(h[src] - h[index.nbr]) <= 1), "consistent along every edge"
            if mode == "landmark":
                anchors = heur.anchors.tolist()
                assert t not in anchors and len(anchors) <= params.num_anchors
                assert all(1 <= true[a] <= params.anchor_hops for a in anchors)
            else:
                exact = reach & (true <= heur.exact_depth)
                assert np.array_equal(h[exact], np.maximum(true[exact], (np.arange(len(h)) != t)[exact]))


# --------------------------------------------------------------------------- #
# find_paths vs networkx on random graphs
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", MODES)
def test_find_paths_matches_networkx(seed, mode):
    tr, index, g = random_graph(seed)
    rng = np.random.default_rng(100 + seed)
    params = PathSearchParams(max_hops=3, k=3, heuristic=mode)
    n_full = n_partial = 0
    for i in range(30):
        s, t = (int(x) for x in rng.integers(0, index.num_nodes, 2))
        if i % 2:  # half the targets from the source's 5-hop ball, so near and far pairs both occur
            ball = np.flatnonzero(bfs_distances(index, s, max_depth=5) > 0)
            t = int(rng.choice(ball)) if ball.size else t
        paths = find_paths(index, tr, s, t, params, np.random.default_rng(seed))
        try:
            d = nx.shortest_path_length(g, s, t)
        except nx.NetworkXNoPath:
            d = None
        for p in paths:
            assert_valid(p, tr, s, params.max_hops)
        if s == t:
            assert [p.method for p in paths] == ["trivial"] and paths[0].nodes == [s] and paths[0].hops == []
            continue
        if d is not None and d <= params.max_hops:
            n_full += 1
            assert paths and all(p.complete and p.nodes[-1] == t for p in paths)
            assert paths[0].length == d
            lens = [p.length for p in paths]
            assert lens == sorted(lens), "shortest first"
            assert lens == nx_k_shortest_lengths(g, s, t, params.k, params.max_hops), "the k shortest simple paths"
            assert len({tuple(p.nodes) for p in paths}) == len(paths), "distinct"
        else:
            assert not any(p.complete for p in paths)
            if d is not None:  # connected but too far: one partial path, a prefix of a shortest path
                n_partial += 1
                assert len(paths) == 1 and paths[0].method == "partial"
                p = paths[0]
                assert p.length == params.max_hops
                assert nx.shortest_path_length(g, p.nodes[-1], t) == d - params.max_hops
            else:
                assert paths == []
    assert n_full > 0 and n_partial > 0


@pytest.mark.parametrize("mode", MODES)
def test_partial_paths_when_target_too_far(mode):
    # a chain 0-1-2-...-9: the target is 9 hops away
    tr = np.array([[i, 0, i + 1] for i in range(9)], dtype=np.int64)
    index = GraphIndex.build(tr, 10)
    params = PathSearchParams(max_hops=3, k=2, heuristic=mode)
    paths = find_paths(index, tr, 0, 9, params, np.random.default_rng(0))
    assert len(paths) == 1 and not paths[0].complete and paths[0].method == "partial"
    assert paths[0].nodes == [0, 1, 2, 3]
    assert paths[0].hops == [(0, 0, 1), (1, 0, 2), (2, 0, 3)]
    assert find_paths(index, tr, 0, 9, PathSearchParams(max_hops=3, partial_paths=False, heuristic=mode),
                      np.random.default_rng(0)) == []


def test_no_partial_path_across_components():
    tr = np.array([[0, 0, 1], [1, 0, 2], [3, 0, 4]], dtype=np.int64)
    index = GraphIndex.build(tr, 6)
    for mode in MODES:
        p = PathSearchParams(max_hops=2, heuristic=mode)
        assert find_paths(index, tr, 0, 4, p, np.random.default_rng(0)) == []
        assert find_paths(index, tr, 0, 5, p, np.random.default_rng(0)) == []  # 5 is isolated


@pytest.mark.parametrize("mode", MODES)
def test_bfs_fallback_with_tiny_budget(mode):
    tr, index, g = random_graph(7, 150, 250)
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(40):
        s, t = (int(x) for x in rng.integers(0, index.num_nodes, 2))
        try:
            d = nx.shortest_path_length(g, s, t)
        except nx.NetworkXNoPath:
            continue
        if not 2 <= d <= 4:
            continue
        params = PathSearchParams(max_hops=4, k=3, max_expansions=1, heuristic=mode)
        paths = find_paths(index, tr, s, t, params, np.random.default_rng(0), stats=(stats := {}))
        assert stats.get("fallbacks") == 1
        assert paths and paths[0].method == "bfs" and paths[0].complete and paths[0].length == d
        for p in paths:
            assert_valid(p, tr, s, 4)
        lens = [p.length for p in paths]
        assert lens == sorted(lens) and len({tuple(p.nodes) for p in paths}) == len(paths)
        # without the fallback nothing is proven, so nothing comes back
        no_fb = PathSearchParams(max_hops=4, k=3, max_expansions=1, bfs_fallback=False, heuristic=mode)
        assert all(p.complete for p in find_paths(index, tr, s, t, no_fb, np.random.default_rng(0)))
        checked += 1
    assert checked >= 5


# --------------------------------------------------------------------------- #
# hand-made graphs
# --------------------------------------------------------------------------- #
def diamond():
    #     1
    #   /   \          0 -r0-> 1 -r1-> 3 ;  0 -r0-> 2 ; 3 -r2-> 2 (stored backwards for the walk 2->3)
    #  0     3         long way round: 0 -r3-> 4 -r3-> 5 -r3-> 3
    #   \   /
    #     2
    tr = np.array([[0, 0, 1], [1, 1, 3], [0, 0, 2], [3, 2, 2], [0, 3, 4], [4, 3, 5], [5, 3, 3]], dtype=np.int64)
    return tr, GraphIndex.build(tr, 6)


@pytest.mark.parametrize("mode", MODES)
def test_diamond_gives_exactly_the_expected_paths(mode):
    tr, index = diamond()
    params = PathSearchParams(max_hops=3, k=3, heuristic=mode)
    paths = find_paths(index, tr, 0, 3, params, np.random.default_rng(0))
    assert [p.method for p in paths] == [SEARCH_METHOD[mode]] * 3 and all(p.complete for p in paths)
    got = {tuple(p.nodes): p.hops for p in paths[:2]}
    assert got == {(0, 1, 3): [(0, 0, 1), (1, 1, 3)], (0, 2, 3): [(0, 0, 2), (3, 2, 2)]}
    assert paths[2].nodes == [0, 4, 5, 3] and paths[2].hops == [(0, 3, 4), (4, 3, 5), (5, 3, 3)]
    # k=2: the two shortest only; max_hops=2: the long way is out of reach
    assert {tuple(p.nodes) for p in find_paths(index, tr, 0, 3, PathSearchParams(max_hops=3, k=2, heuristic=mode),
                                               np.random.default_rng(1))} == {(0, 1, 3), (0, 2, 3)}
    assert len(find_paths(index, tr, 0, 3, PathSearchParams(max_hops=2, k=5, heuristic=mode),
                          np.random.default_rng(0))) == 2
    # walking the other way reports the same forward triples
    back = find_paths(index, tr, 3, 0, params, np.random.default_rng(0))
    assert {tuple(p.nodes) for p in back} == {(3, 1, 0), (3, 2, 0), (3, 5, 4, 0)}
    assert {tuple(p.hops) for p in back if p.length == 2} == {((1, 1, 3), (0, 0, 1)), ((3, 2, 2), (0, 0, 2))}


@pytest.mark.parametrize("mode", MODES)
def test_parallel_edges_and_distinct_nodes(mode):
    tr = np.array([[0, 0, 1], [0, 1, 1], [1, 0, 2], [2, 2, 2]], dtype=np.int64)  # two relations 0->1; a self-loop
    index = GraphIndex.build(tr, 3)
    by_nodes = find_paths(index, tr, 0, 2, PathSearchParams(max_hops=2, k=3, heuristic=mode), np.random.default_rng(0))
    assert len(by_nodes) == 1 and by_nodes[0].hops == [(0, 0, 1), (1, 0, 2)], "the first parallel edge in the index"
    by_edges = find_paths(index, tr, 0, 2, PathSearchParams(max_hops=2, k=3, distinct_nodes=False, heuristic=mode),
                          np.random.default_rng(0))
    assert sorted(p.hops for p in by_edges) == [[(0, 0, 1), (1, 0, 2)], [(0, 1, 1), (1, 0, 2)]]
    # parallel edges on the last hop too (the target side)
    last = find_paths(index, tr, 2, 0, PathSearchParams(max_hops=2, k=3, distinct_nodes=False, heuristic=mode),
                      np.random.default_rng(0))
    assert sorted(p.hops for p in last) == [[(1, 0, 2), (0, 0, 1)], [(1, 0, 2), (0, 1, 1)]]
    one_hop = find_paths(index, tr, 0, 1, PathSearchParams(max_hops=1, k=3, distinct_nodes=False, heuristic=mode),
                         np.random.default_rng(0))
    assert sorted(p.hops for p in one_hop) == [[(0, 0, 1)], [(0, 1, 1)]]


def test_trivial_and_bad_ids():
    tr, index = diamond()
    p = PathSearchParams()
    assert find_paths(index, tr, 2, 2, p, np.random.default_rng(0)) == [KGPath([], [2], True, "trivial")]
    with pytest.raises(ValueError, match="target id 6"):
        find_paths(index, tr, 0, 6, p, np.random.default_rng(0))
    with pytest.raises(ValueError, match="source id -1"):
        find_paths(index, tr, -1, 3, p, np.random.default_rng(0))
    with pytest.raises(ValueError, match="source id '0'"):
        find_paths(index, tr, "0", 3, p, np.random.default_rng(0))
    with pytest.raises(ValueError, match="target id 99"):
        sample_paths(index, tr, [0], [3, 99], p, np.random.default_rng(0))
    with pytest.raises(ValueError, match="source id 7"):
        bfs_distances(index, 7)
    for bad in (dict(k=0), dict(max_hops=-1), dict(heuristic="dijkstra"), dict(max_expansions=1.5)):
        with pytest.raises(ValueError):
            PathSearchParams(**bad)


def test_path_to_named_and_networkx_interop():
    kg = KnowledgeGraph.from_named_triples([("aspirin", "treats", "headache"), ("headache", "symptom_of", "flu"),
                                            ("flu", "caused_by", "virus")])
    index = GraphIndex.from_kg(kg)
    a, v = kg.entity_index["aspirin"], kg.entity_index["virus"]
    paths = find_paths(index, kg.triples, v, a, PathSearchParams(max_hops=3), np.random.default_rng(0))
    assert path_to_named(paths[0], kg) == [["flu", "caused_by", "virus"], ["headache", "symptom_of", "flu"],
                                           ["aspirin", "treats", "headache"]]
    assert all(kg.has_named_triple(*h) for h in path_to_named(paths[0], kg))
    g = nx.MultiDiGraph()
    g.add_edge("a", "b", relation="r")
    g.add_edge("c", "b", relation="s")
    idx2, kg2 = graph_index_from_networkx(g)
    p = find_paths(idx2, kg2.triples, kg2.entity_index["a"], kg2.entity_index["c"], PathSearchParams(),
                   np.random.default_rng(0))
    assert path_to_named(p[0], kg2) == [["a", "r", "b"], ["c", "s", "b"]]


# --------------------------------------------------------------------------- #
# sample_paths, determinism
# --------------------------------------------------------------------------- #
def test_sample_paths_dedups_pairs_and_caches_per_target():
    tr, index, g = random_graph(11, 100, 150)
    params = PathSearchParams(max_hops=3, k=2)
    srcs, tgts = [1, 2, 1, 3], [5, 8, 5]
    stats: dict = {}
    out = sample_paths(index, tr, srcs, tgts, params, np.random.default_rng(0), stats=stats)
    keys = [tuple(p.nodes) for p in out]
    assert len(keys) == len(set(keys))
    for s in (1, 2, 3):
        for t in (5, 8):
            mine = [p for p in out if p.nodes[0] == s and (p.nodes[-1] == t or not p.complete)]
            assert len([p for p in mine if p.complete and p.nodes[-1] == t]) <= params.k
    for p in out:
        assert_valid(p, tr, p.nodes[0], 3)
    assert stats["heuristics"] == 2, "one landmark heuristic per distinct target, reused across sources"
    assert sample_paths(index, tr, [4], [4], params, np.random.default_rng(0)) == []
    assert [p.method for p in sample_paths(index, tr, [4], [4], params, np.random.default_rng(0),
                                           include_trivial=True)] == ["trivial"]


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_for_a_seed(mode):
    tr, index, _ = random_graph(3, 200, 300)
    params = PathSearchParams(max_hops=4, k=3, heuristic=mode)
    a = sample_paths(index, tr, [0, 10, 20], [30, 40], params, np.random.default_rng(42))
    b = sample_paths(index, tr, [0, 10, 20], [30, 40], params, np.random.default_rng(42))
    assert [x.to_dict() for x in a] == [y.to_dict() for y in b]


# --------------------------------------------------------------------------- #
# property test
# --------------------------------------------------------------------------- #
@st.composite
def small_graph_and_pair(draw):
    n = draw(st.integers(2, 25))
    m = draw(st.integers(1, 50))
    rows = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 2), st.integers(0, n - 1)),
                         min_size=1, max_size=m, unique=True))
    s = draw(st.integers(0, n - 1))
    t = draw(st.integers(0, n - 1))
    return n, np.array(sorted(rows), dtype=np.int64), s, t


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_graph_and_pair(), st.sampled_from(MODES), st.integers(1, 4), st.integers(1, 4), st.booleans())
def test_property_every_hop_is_a_triple_and_length_is_nx_distance(data, mode, max_hops, k, two_sided):
    n, tr, s, t = data
    index = GraphIndex.build(tr, n)
    g = to_simple_undirected_networkx(index)
    params = PathSearchParams(max_hops=max_hops, k=k, heuristic=mode, two_sided=two_sided)
    paths = find_paths(index, tr, s, t, params, np.random.default_rng(0))
    for p in paths:
        assert_valid(p, tr, s, max_hops)
    try:
        d = nx.shortest_path_length(g, s, t)
    except nx.NetworkXNoPath:
        d = None
    complete = [p for p in paths if p.complete]
    if d is not None and d <= max_hops:
        assert complete and complete[0].length == d
        expected = [0] if s == t else nx_k_shortest_lengths(g, s, t, k, max_hops)
        assert [p.length for p in complete] == expected
    else:
        assert not complete


# --------------------------------------------------------------------------- #
# purity
# --------------------------------------------------------------------------- #


# --------------------------------------------------------------------------- #
# bidirectional search: cache, batches, agreement with the exact A*
# --------------------------------------------------------------------------- #
def _pairs(index, rng, n):
    out = []
    for _ in range(n):
        s = int(rng.integers(0, index.num_nodes))
        ball = np.flatnonzero(bfs_distances(index, s, max_depth=5) > 0)
        out.append((s, int(rng.choice(ball)) if ball.size else int(rng.integers(0, index.num_nodes))))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_bidirectional_results_do_not_depend_on_the_cache(seed):
    tr, index, g = random_graph(20 + seed, 200, 400)
    pairs = _pairs(index, np.random.default_rng(seed), 25)
    params = PathSearchParams(max_hops=4, k=4, heuristic="bidirectional")

    def run(cache):
        rng = np.random.default_rng(seed)
        return [[p.to_dict() for p in find_paths(index, tr, s, t, params, rng, cache=cache)] for s, t in pairs]

    cold = run(False)
    assert run(PathCache()) == cold
    warm = PathCache()
    for s, t in pairs[::-1]:  # warm every side, in another order, with other depths
        find_paths(index, tr, t, s, replace(params, max_hops=5), np.random.default_rng(1), cache=warm)
    assert run(warm) == cold
    assert warm.hits > 0
    tiny = PathCache(max_bytes=1)  # evicts all but the pair in use
    assert run(tiny) == cold and len(tiny) <= 2


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_hops,k", [(3, 6), (5, 4)])
def test_bidirectional_agrees_with_exact_astar_and_networkx(seed, max_hops, k):
    tr, index, g = random_graph(40 + seed, 150, 300)
    for s, t in _pairs(index, np.random.default_rng(seed), 20):
        bi = find_paths(index, tr, s, t, PathSearchParams(max_hops=max_hops, k=k, heuristic="bidirectional"),
                        np.random.default_rng(0), cache=False)
        ex = find_paths(index, tr, s, t, PathSearchParams(max_hops=max_hops, k=k, heuristic="target"),
                        np.random.default_rng(0))
        assert [p.length for p in bi] == [p.length for p in ex]
        assert [p.complete for p in bi] == [p.complete for p in ex]
        if bi and bi[0].complete and s != t:
            assert [p.length for p in bi] == nx_k_shortest_lengths(g, s, t, k, max_hops)
            assert all(p.method == "bidir" for p in bi)
        for p in bi:
            assert_valid(p, tr, s, max_hops)


def test_bidirectional_is_exhaustive_below_k():
    # a 6-cycle 0..5: exactly two simple paths 0 -> 3 (length 3 each way)
    tr = np.array([[i, 0, (i + 1) % 6] for i in range(6)], dtype=np.int64)
    index = GraphIndex.build(tr, 6)
    paths = find_paths(index, tr, 0, 3, PathSearchParams(max_hops=4, k=5, heuristic="bidirectional"),
                       np.random.default_rng(0))
    assert sorted(tuple(p.nodes) for p in paths) == [(0, 1, 2, 3), (0, 5, 4, 3)]
    # bipartite: no path of length 4 between nodes at odd distance; nothing invented
    paths = find_paths(index, tr, 0, 1, PathSearchParams(max_hops=5, k=5, heuristic="bidirectional"),
                       np.random.default_rng(0))
    assert sorted(tuple(p.nodes) for p in paths) == [(0, 1), (0, 5, 4, 3, 2, 1)]


def test_find_paths_many_equals_one_by_one():
    tr, index, _ = random_graph(5, 150, 250)
    pairs = _pairs(index, np.random.default_rng(5), 15)
    pairs += pairs[:5] + [(pairs[0][0], pairs[0][0])]  # repeated pairs, a trivial one
    for mode in MODES:
        params = PathSearchParams(max_hops=4, k=3, heuristic=mode)
        many = find_paths_many(index, tr, pairs, params, np.random.default_rng(3))
        assert len(many) == len(pairs)
        if mode == "bidirectional":  # no per-target rng draws: one by one with one rng is the same
            rng = np.random.default_rng(3)
            assert [[p.to_dict() for p in ps] for ps in many] == \
                [[p.to_dict() for p in find_paths(index, tr, s, t, params, rng)] for s, t in pairs]
        for (s, t), ps in zip(pairs, many):
            for p in ps:
                assert_valid(p, tr, s, 4)
    with pytest.raises(ValueError, match="target id"):
        find_paths_many(index, tr, [(0, index.num_nodes)], PathSearchParams(), np.random.default_rng(0))


def test_bidirectional_sample_paths_and_shared_cache():
    tr, index, _ = random_graph(11, 100, 150)
    params = PathSearchParams(max_hops=3, k=2, heuristic="bidirectional")
    shared = path_cache(index)
    shared.clear()
    a = sample_paths(index, tr, [1, 2, 1, 3], [5, 8, 5], params, np.random.default_rng(0))
    assert len(shared) > 0 and shared.misses > 0
    b = sample_paths(index, tr, [1, 2, 1, 3], [5, 8, 5], params, np.random.default_rng(0))
    c = sample_paths(index, tr, [1, 2, 1, 3], [5, 8, 5], params, np.random.default_rng(0), cache=False)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b] == [p.to_dict() for p in c]
    assert shared.hits > 0
    with pytest.raises(TypeError):
        find_paths(index, tr, 1, 5, params, np.random.default_rng(0), cache={})


def test_bidirectional_long_searches_fall_back_to_the_exact_astar():
    tr = np.array([[i, 0, i + 1] for i in range(80)], dtype=np.int64)  # a chain of 81 nodes
    index = GraphIndex.build(tr, 81)
    paths = find_paths(index, tr, 0, 80, PathSearchParams(max_hops=80, k=2, heuristic="bidirectional"),
                       np.random.default_rng(0))
    assert [p.length for p in paths] == [80] and paths[0].method == "astar"
    paths = find_paths(index, tr, 0, 60, PathSearchParams(max_hops=63, k=2, heuristic="bidirectional"),
                       np.random.default_rng(0))
    assert [p.length for p in paths] == [60] and paths[0].method == "bidir"


@pytest.mark.parametrize("seed", range(3))
def test_bidirectional_numba_and_python_enumerations_agree(seed):
    """The optional numba enumeration gives the same paths, stats and rng stream as the Python loop."""
    import kale_ray.core.paths as paths_mod

    if not paths_mod._numba_enabled():
        pytest.skip("numba not available")
    tr, index, _ = random_graph(60 + seed, 150, 400)
    pairs = _pairs(index, np.random.default_rng(seed), 30)

    def run(params, bitgen):
        rng = np.random.Generator(bitgen(seed))
        out = []
        for s, t in pairs:
            st: dict = {}
            out.append(([p.to_dict() for p in find_paths(index, tr, s, t, params, rng, stats=st, cache=False)], st))
        return out, rng.bit_generator.random_raw()

    _compiled_equals_python(run, (PathSearchParams(max_hops=4, k=5, heuristic="bidirectional"),
                                  PathSearchParams(max_hops=9, k=40, heuristic="bidirectional", distinct_nodes=False),
                                  PathSearchParams(max_hops=6, k=8, heuristic="bidirectional", max_expansions=7)))


def _compiled_equals_python(run, param_sets) -> list:
    """``run(params, bitgen)`` with the numba kernels and with the Python loops: equal for every
    params and bit generator; returns the compiled results."""
    import kale_ray.core.paths as paths_mod

    results = []
    for params in param_sets:
        for bitgen in (np.random.PCG64, np.random.Philox):
            compiled = run(params, bitgen)
            paths_mod.JIT_STATS["available"] = False
            try:
                python = run(params, bitgen)
            finally:
                paths_mod.JIT_STATS["available"] = True
            assert compiled == python
            results.append(compiled)
    return results


# --------------------------------------------------------------------------- #
# Bounded memory per question (no |V|-sized allocation once warm)
# --------------------------------------------------------------------------- #
def _million_node_graph_and_pairs(count: int, max_hops: int, n: int = 1_000_000, m: int = 3_000_000):
    """A random 10^6-node graph and ``count`` pairs whose targets are 1..max_hops hops out (a path exists)."""
    r = np.random.default_rng(0)
    tr = np.stack([r.integers(0, n, m), r.integers(0, 8, m), r.integers(0, n, m)], axis=1).astype(np.int64)
    index = GraphIndex.build(tr, n)
    ip, nb = index.indptr, index.nbr
    pairs = []
    while len(pairs) < count:
        s = u = int(r.integers(n))
        for _ in range(int(r.integers(1, max_hops + 1))):
            if ip[u + 1] == ip[u]:
                break
            u = int(nb[r.integers(ip[u], ip[u + 1])])
        if u != s:
            pairs.append((s, u))
    return tr, index, pairs


def test_bidirectional_peak_allocation_per_question_is_far_below_num_nodes():
    """On a 10^6-node graph, after a warm-up, a question allocates far less than |V| bytes."""
    import tracemalloc

    n = 1_000_000
    tr, index, pairs = _million_node_graph_and_pairs(60, 3)
    params = PathSearchParams(max_hops=3, k=3, heuristic="bidirectional")
    rng = np.random.default_rng(1)
    weights = np.zeros(8)
    weights[:3] = 1.0
    for s, t in pairs[:5]:  # warm-up: per-index arrays, per-thread work arrays, numba
        find_paths(index, tr, s, t, params, rng)
        find_paths(index, tr, s, t, params, rng, relation_weights=weights)
    tracemalloc.start()
    try:
        peaks = []
        for i, (s, t) in enumerate(pairs[5:]):
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            ps = find_paths(index, tr, s, t, params, rng, relation_weights=weights if i % 2 else None)
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
            assert ps and ps[0].complete
    finally:
        tracemalloc.stop()
    assert max(peaks) < n // 8, f"peak allocation per question {max(peaks)} bytes vs |V| = {n}"
    assert float(np.median(peaks)) < n // 50


def test_bidirectional_work_array_is_clean_after_searches():
    """The per-thread work array is reset to zeros after every search (also after a failure)."""
    import kale_ray.core.paths as paths_mod

    tr, index, _ = random_graph(5, 200, 300)
    params = PathSearchParams(max_hops=4, k=4, heuristic="bidirectional")
    rng = np.random.default_rng(0)
    for s, t in _pairs(index, rng, 20):
        find_paths(index, tr, s, t, params, rng)
    M = paths_mod._work_bits(index.num_nodes, paths_mod._bits_dtype(4))
    assert not M.any()


# --------------------------------------------------------------------------- #
# Relation-following search
# --------------------------------------------------------------------------- #
def _shortcut_graph():
    # 0 --r0--> 3 is the shortest path but uses the wrong relation; the question's chain is
    # 0 --r1--> 1 --r2--> 3; 0 --r0--> 2 --r2--> 3 mixes both.
    tr = np.array([[0, 0, 3], [0, 1, 1], [1, 2, 3], [0, 0, 2], [2, 2, 3], [4, 1, 0]], dtype=np.int64)
    return tr, GraphIndex.build(tr, 5)


@pytest.mark.parametrize("mode", MODES)
def test_relation_weights_steer_the_search_past_a_shortcut(mode):
    tr, index = _shortcut_graph()
    params = PathSearchParams(max_hops=3, k=3, heuristic=mode)
    plain = find_paths(index, tr, 0, 3, params, np.random.default_rng(0))
    assert plain[0].hops == [(0, 0, 3)]
    w = np.zeros(3)
    w[[1, 2]] = 1.0
    ps = find_paths(index, tr, 0, 3, params, np.random.default_rng(0), relation_weights=w)
    assert ps[0].hops == [(0, 1, 1), (1, 2, 3)] and ps[0].method == "relation"
    assert [p.method for p in ps[1:]] == [SEARCH_METHOD[mode]] * (len(ps) - 1)  # then the shortest paths
    assert ps[1].hops == [(0, 0, 3)]
    for p in ps:
        assert_valid(p, tr, 0, 3)
    # a chain (hop x relation): hop 0 must use r0, hop 1 r2 -> 0-2-3
    W = np.zeros((2, 3))
    W[0, 0] = W[1, 2] = 1.0
    ps = find_paths(index, tr, 0, 3, params, np.random.default_rng(0), relation_weights=W)
    assert ps[0].hops == [(0, 0, 2), (2, 2, 3)] and ps[0].method == "relation"
    # no relevant relation at all: the ordinary search
    assert find_paths(index, tr, 0, 3, params, np.random.default_rng(0), relation_weights=np.zeros(3)) == plain


def test_relation_paths_are_valid_on_random_graphs():
    for seed in range(4):
        tr, index, g = random_graph(200 + seed, 60, 150)
        rng = np.random.default_rng(seed)
        w = (rng.random(4) < 0.5).astype(float)
        params = PathSearchParams(max_hops=3, k=4, heuristic="bidirectional")
        for s, t in _pairs(index, rng, 15):
            ps = find_paths(index, tr, s, t, params, rng, relation_weights=w)
            assert len(ps) <= params.k
            assert len({p.key() for p in ps}) == len(ps)
            rel = [p for p in ps if p.method == "relation"]
            assert ps[: len(rel)] == rel  # relation-following paths first
            for p in ps:
                assert_valid(p, tr, s, params.max_hops)
            for p in rel:
                assert all(w[r] > 0 for _, r, _ in p.hops)
            if not rel:  # none exists: plain paths, with networkx's lengths
                plain = [p for p in ps if p.complete]
                if plain:
                    assert [p.length for p in plain] == nx_k_shortest_lengths(g, s, t, len(plain), 3)


@pytest.mark.parametrize("seed", range(3))
def test_relation_chain_numba_and_python_agree(seed):
    """The compiled relation-chain search gives the same paths, stats and rng stream as the Python reference."""
    import kale_ray.core.paths as paths_mod

    if not paths_mod._numba_enabled():
        pytest.skip("numba not available")
    tr, index, _ = random_graph(90 + seed, 150, 400, num_rel=3)
    tr = np.concatenate([tr, tr[:30, [2, 1, 0]], tr[30:50] + [0, 1, 0]])  # reversed and parallel edges
    tr = np.unique(tr, axis=0)
    index = GraphIndex.build(tr, index.num_nodes)
    wr = np.random.default_rng(100 + seed)
    pairs, chains = [], []
    ip, nb, rl = index.indptr, index.nbr, index.rel
    while len(pairs) < 30:  # a random walk of 1-3 hops: its relations (and a few others) as the chain
        s = u = int(wr.integers(index.num_nodes))
        W = (wr.random((int(wr.integers(1, 4)), 5)) < 0.25).astype(float)
        for i in range(len(W)):
            if ip[u + 1] == ip[u]:
                break
            e = int(wr.integers(ip[u], ip[u + 1]))
            W[i, rl[e]] = 1.0
            u = int(nb[e])
        else:
            if u != s:
                pairs.append((s, u))
                chains.append(W)

    def run(params, bitgen):
        rng = np.random.Generator(bitgen(seed))
        out = []
        for (s, t), W in zip(pairs, chains):
            st: dict = {}
            ps = find_paths(index, tr, s, t, params, rng, stats=st, cache=False, relation_weights=W)
            out.append(([p.to_dict() for p in ps], st))
        return out, rng.bit_generator.random_raw()

    results = _compiled_equals_python(run, (
        PathSearchParams(max_hops=3, k=4, heuristic="bidirectional", fill_after_chain=False),
        PathSearchParams(max_hops=3, k=12, heuristic="bidirectional", distinct_nodes=False),
        PathSearchParams(max_hops=3, k=3, heuristic="bidirectional", max_expansions=3)))
    hits = sum(any(p["method"] == "relation" for p in ps) for compiled in results for ps, _ in compiled[0])
    assert hits > 60  # the chains were found often enough for the comparison to mean something


def test_found_chain_is_returned_alone_without_fill():
    tr, index = _shortcut_graph()
    W = np.zeros((2, 3))
    W[0, 1] = W[1, 2] = 1.0  # the chain 0 -r1-> 1 -r2-> 3
    filled = find_paths(index, tr, 0, 3, PathSearchParams(max_hops=3, k=3, heuristic="bidirectional"),
                        np.random.default_rng(0), relation_weights=W)
    alone = find_paths(index, tr, 0, 3, PathSearchParams(max_hops=3, k=3, heuristic="bidirectional",
                                                         fill_after_chain=False),
                       np.random.default_rng(0), relation_weights=W)
    assert [p.method for p in alone] == ["relation"] and alone[0].hops == [(0, 1, 1), (1, 2, 3)]
    assert filled[0] == alone[0] and len(filled) == 3 and filled[1].method == "bidir"
    # no chain in the KG: the fallback searches run either way
    W2 = np.zeros((2, 3))
    W2[0, 2] = W2[1, 2] = 1.0
    assert find_paths(index, tr, 0, 3, PathSearchParams(max_hops=3, k=3, heuristic="bidirectional",
                                                        fill_after_chain=False),
                      np.random.default_rng(0), relation_weights=W2)


def test_attach_search_arrays_wraps_without_copy():
    """search_arrays once, attach_search_arrays in a 'worker': shared arrays, identical paths."""
    import numpy as np

    from kale_ray.core import paths as P
    from kale_ray.core.kg import GraphIndex

    rng = np.random.default_rng(0)
    n = 60
    tr = np.unique(np.stack([rng.integers(0, n, 400), rng.integers(0, 3, 400), rng.integers(0, n, 400)], 1), axis=0)
    tr = np.concatenate([tr, tr[:20, [2, 1, 0]]])  # parallel edges: simple != multi
    ref = GraphIndex.build(tr, n)
    arrays = P.search_arrays(ref, tr)
    assert "ps_simple_indptr" in arrays
    worker = GraphIndex(indptr=ref.indptr, nbr=ref.nbr, rel=ref.rel, tid=ref.tid, inv=ref.inv, num_nodes=n)
    P.attach_search_arrays(worker, arrays)
    prep = P._prepared(worker)[0]
    assert np.shares_memory(prep.multi.nbr, arrays["ps_multi_nbr"])
    assert np.shares_memory(prep.simple.indptr, arrays["ps_simple_indptr"])
    assert np.shares_memory(prep.entry_relations(tr), arrays["ps_entry_rel"])
    w = np.array([1.0, 0.0, 1.0])
    for dn in (True, False):
        params = P.PathSearchParams(max_hops=3, k=5, heuristic="bidirectional", distinct_nodes=dn)
        for s, t in [(0, 1), (2, 30), (5, 59)]:
            for rw in (None, w):
                a = P.find_paths(worker, tr, s, t, params, np.random.default_rng(3), relation_weights=rw)
                b = P.find_paths(ref, tr, s, t, params, np.random.default_rng(3), relation_weights=rw)
                assert [(p.nodes, p.hops, p.method) for p in a] == [(p.nodes, p.hops, p.method) for p in b]
    import pytest
    with pytest.raises(ValueError):
        P.attach_search_arrays(GraphIndex.build(tr[:5], 10), arrays)


# --------------------------------------------------------------------------- #
# Landmark table (ALT, precomputed once per graph)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seed", range(6))
def test_landmark_table_bound_is_admissible_and_exact_at_the_target(seed):
    """h[v] <= d(v, t) for every node (other components included), h[t] == 0, h >= 1 elsewhere."""
    from kale_ray.core.paths import attach_landmark_table, build_landmark_table, table_heuristic

    tr, index, g = random_graph(seed, 40, 200)  # sparse random graphs: often several components
    table = build_landmark_table(index, num=5)
    attach_landmark_table(index, table)
    assert table.dist.shape == (index.num_nodes, len(table.landmarks)) and len(table.landmarks) >= 1
    params = PathSearchParams(max_hops=3, heuristic="landmark")
    rng = np.random.default_rng(seed)
    for t in rng.choice(index.num_nodes, 8, replace=False).tolist():
        h = table_heuristic(index, t, params).h
        exact = bfs_distances(index, t)
        hv = h[np.arange(index.num_nodes)]
        reach = exact >= 0
        assert (hv[reach] <= exact[reach]).all()
        assert int(h[t]) == 0 and (hv[np.arange(index.num_nodes) != t] >= 1).all()
        # a node the target cannot reach is pruned at once (or at least never over-promised)
        assert all(int(h[v]) >= 1 for v in np.flatnonzero(~reach)[:5].tolist())


@pytest.mark.parametrize("seed", range(4))
def test_landmark_table_and_sampled_anchors_give_the_same_path_lengths(seed):
    tr, index, g = random_graph(seed + 20, 60, 250)
    rng = np.random.default_rng(seed)
    for s, t in _pairs(index, rng, 12):
        got = {}
        for mode in ("table", "sampled"):
            params = PathSearchParams(max_hops=3, k=3, heuristic="landmark", landmarks=mode, bfs_fallback=True)
            got[mode] = [p.length for p in find_paths(index, tr, s, t, params, np.random.default_rng(0)) if p.complete]
        assert got["table"] == got["sampled"], (s, t, got)


def test_landmark_table_search_allocates_far_below_num_nodes_per_question():
    """The paper's landmark A*, with its landmarks precomputed once per graph: no BFS and no
    |V|-sized array per question (10^6 nodes, after the one-off table)."""
    import tracemalloc

    from kale_ray.core.paths import landmark_table

    n = 1_000_000
    tr, index, pairs = _million_node_graph_and_pairs(25, 2)
    params = PathSearchParams(max_hops=2, k=2, heuristic="landmark", bfs_fallback=False, partial_paths=False)
    table = landmark_table(index)  # the one-off: N x 16 bytes
    assert table.dist.nbytes == n * len(table.landmarks)
    rng = np.random.default_rng(1)
    for s, t in pairs[:3]:
        find_paths(index, tr, s, t, params, rng)
    stats: dict = {}
    tracemalloc.start()
    try:
        peaks = []
        for s, t in pairs[3:]:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            ps = find_paths(index, tr, s, t, params, rng, stats=stats)
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
            assert ps and ps[0].complete
    finally:
        tracemalloc.stop()
    assert stats.get("bfs_edges", 0) == 0  # no BFS per question
    assert max(peaks) < n // 8, f"peak allocation per question {max(peaks)} bytes vs |V| = {n}"
