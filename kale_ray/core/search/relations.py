"""Relation-following path search: paths whose hops use the relations a question asks about.

``relation_weights`` (all modes, optional): a per-relation relevance vector (e.g. the relations a
question mentions), or a hop x relation matrix (a relation chain). Paths whose hops all use
relevant relations are searched first (``_sequence_paths`` for a chain, ``_relation_paths`` for
a set; sparse dict/set searches bounded by ``max_expansions`` rows) and ranked first (method
``"relation"``); the ordinary search fills up to ``k`` (``kale_ray.core.search.api.find_paths``).
Both read the multi CSR of ``kale_ray.core.search.arrays`` and never touch |V|-sized arrays.
"""
from __future__ import annotations

import numpy as np

from kale_ray.core.kg import GraphIndex
from kale_ray.core.search.arrays import _CSR, _prepared
from kale_ray.core.search.common import KGPath, PathSearchParams, _bump


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
