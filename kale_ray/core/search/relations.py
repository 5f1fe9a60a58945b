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
from kale_ray.core.search.numba_kernel import _chain_numba


# --------------------------------------------------------------------------- #
# Relation-following search (paths whose hops use the relations a question asks about)
# --------------------------------------------------------------------------- #
def _check_weights(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim not in (1, 2):
        raise ValueError(f"relation_weights must be a 1-D array over relation ids (or 2-D: hop x relation), "
                         f"got shape {w.shape}")
    return w


def _rel_width(prep, rel: np.ndarray) -> int:
    """1 + the largest relation id of ``rel`` (0 when empty), computed once per ``_Prepared``."""
    top = getattr(prep, "_max_rel", None)
    if top is None or top[0] is not rel:
        top = prep._max_rel = (rel, int(rel.max()) + 1 if rel.size else 0)
    return top[1]


def _padded_weights(prep, rel: np.ndarray, w: np.ndarray) -> np.ndarray | None:
    """``w`` zero-padded to cover every relation id of ``rel`` (so a row reads ``w[rel[lo:hi]]``
    directly); None when ``rel`` is empty. The largest id is computed once per ``_Prepared``."""
    width = _rel_width(prep, rel)
    if width == 0:
        return None
    if w.size >= width:
        return w
    out = np.zeros(width, dtype=w.dtype)
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


def _chain_mask(prep, rel: np.ndarray, W: np.ndarray) -> np.ndarray | None:
    """``A[i, r] = W[i, r] > 0`` as uint8, zero-padded to every relation id of ``rel`` (ids beyond
    ``W``'s columns are not allowed); None when ``rel`` is empty."""
    width = _rel_width(prep, rel)
    if width == 0:
        return None
    A = np.zeros((len(W), width), dtype=np.uint8)
    m = min(width, W.shape[1])
    A[:, :m] = W[:, :m] > 0
    return A


def _sequence_paths_to(index: GraphIndex, triples: np.ndarray, source: int, target: int, params: PathSearchParams,
                       rng: np.random.Generator, W: np.ndarray, stats: dict | None,
                       prefer_forward: bool = True) -> list[KGPath]:
    """Simple paths of exactly ``n = len(W)`` hops whose hop ``i`` uses a relation with
    ``W[i, r] > 0`` (a relation chain, e.g. the one a question spells out), in either direction.

    Layered and sparse: ``layer[i]`` = nodes with an allowed walk of hops ``i .. n-1`` to the
    target, for ``i >= 1`` (a backward pass from the target over the allowed edges of each position,
    reading at most ``max_expansions`` rows, lowest ids first), then a depth-first enumeration from
    the source through the layers. Each frame lists its children in row order, forward-walked entries (head ->
    tail as stored) before backward ones, and picks among the remaining ones of the current group
    with one 64-bit draw (lazy Fisher-Yates, as the bidirectional search). Up to ``k`` paths, those
    with more forward hops first; ``"relation"``. With numba, ``numba_kernel`` runs the same
    algorithm compiled (same paths, draws and counters).
    """
    n, k = len(W), params.k
    if n == 0 or n > params.max_hops:
        return []
    prep = _prepared(index)[0]
    csr = prep.multi
    rel = prep.entry_relations(triples)
    fwd = prep.entry_forward(triples)
    A = _chain_mask(prep, rel, W)
    if A is None:
        return []
    budget = params.max_expansions
    nb = _chain_numba(rng)
    if nb is not None:
        kern, fnp, stp = nb
        nf, out_n, out_e, expansions, scanned = kern(csr.indptr, csr.nbr, rel, fwd, A, source, target,
                                                      bool(params.distinct_nodes), k, budget, prefer_forward, fnp, stp)
        found = list(zip(out_n[:nf].tolist(), out_e[:nf].tolist()))
    else:
        found, expansions, scanned = _chain_python(csr, rel, fwd, A, source, target, params.distinct_nodes, k,
                                                   budget, prefer_forward, rng.bit_generator.random_raw)
    _bump(stats, "relation_expansions", expansions)
    _bump(stats, "edges_scanned", scanned)
    return _as_paths(csr, triples, found)


def _chain_layers(csr: _CSR, rel: np.ndarray, A: np.ndarray, target: int, budget: int) -> tuple[list, int]:
    """``layer[i]`` (sorted arrays, ``layer[n] = [target]``) and the entries scanned; ``[]`` when a layer is empty."""
    ipl_a, nbr = np.asarray(csr.indptr), np.asarray(csr.nbr)
    n = len(A)
    layer: list = [None] * (n + 1)
    cur = layer[n] = np.asarray([target], dtype=np.int64)
    rows_read = scanned = 0
    for i in range(n - 1, 0, -1):  # layer 0 would only say whether the source is in it: the enumeration finds that out
        cur = cur[: max(0, budget - rows_read)]
        rows_read += int(cur.size)
        lo, hi = ipl_a[cur], ipl_a[cur + 1]
        lens = hi - lo
        total = int(lens.sum())
        scanned += total
        if total:
            ent = np.repeat(lo - np.cumsum(lens) + lens, lens) + np.arange(total)
            cur = np.unique(nbr[ent[A[i][rel[ent]] != 0]]).astype(np.int64)
        else:
            cur = np.empty(0, dtype=np.int64)
        if not cur.size:
            return [], scanned
        layer[i] = cur
    return layer, scanned


def _chain_python(csr: _CSR, rel, fwd, A, source: int, target: int, distinct: bool, k: int, budget: int,
                  prefer_forward: bool, raw) -> tuple[list, int, int]:
    """The chain enumeration in Python (the reference for the numba kernel): (found, expansions, scanned)."""
    n = len(A)
    layer, scanned = _chain_layers(csr, rel, A, target, budget)
    if not layer:
        return [], 0, scanned
    ipl, nbr = csr.ipl, csr.nbr
    sets = [None] + [set(a.tolist()) for a in layer[1:]]
    path, pe, on = [source], [], {source}

    def frame(u: int, i: int) -> list:
        nonlocal scanned
        lo, hi = ipl[u], ipl[u + 1]
        scanned += hi - lo
        idx = np.flatnonzero(A[i][rel[lo:hi]])
        vs, es = nbr[lo:hi][idx].tolist(), (idx + lo).tolist()
        nxt, last = sets[i + 1], i == n - 1
        first, second = [], []
        for v, e in zip(vs, es):
            if v in nxt and v not in on and (last or v != target):
                (first if bool(fwd[e]) == prefer_forward else second).append((v, e))
        c = first + second
        return [c, len(first), 0]

    found: list = []
    seen: set = set()
    expansions = 0
    stack = [frame(source, 0)]
    while stack and len(found) < k and expansions < budget:
        fr = stack[-1]
        c, g, i = fr
        m = len(c)
        if i >= m:
            stack.pop()
            if len(path) > 1:
                on.discard(path.pop())
                pe.pop()
            continue
        end = g if i < g else m
        if end - i > 1:  # one draw picks among the rest of the group (forward entries first)
            j = i + ((raw() * (end - i)) >> 64)
            c[i], c[j] = c[j], c[i]
        fr[2] = i + 1
        v, e = c[i]
        if len(path) == n:  # v is the target (the last layer is {target})
            key = tuple(path) + (v,) if distinct else (tuple(path) + (v,), tuple(pe) + (e,))
            if key not in seen:
                seen.add(key)
                found.append((path + [v], pe + [e]))
            continue
        expansions += 1
        path.append(v)
        pe.append(e)
        on.add(v)
        stack.append(frame(v, len(path) - 1))
    # more hops read forward first (walked from the other end, a forward hop is a backward entry)
    found.sort(key=lambda f: -int(fwd[f[1]].sum()) if prefer_forward else int(fwd[f[1]].sum()))
    return found[:k], expansions, scanned


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
