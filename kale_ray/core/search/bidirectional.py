"""The bidirectional path search (``heuristic="bidirectional"``; the fastest, not an A*).

Meet in the middle without a heuristic. Walk sets grow level by level around the source and the
target (always the side whose next level scans fewer CSR entries), bit ``r`` of a node meaning
"has a walk of exactly ``r`` hops to the target"; the bits the enumeration needs beyond the
target side's depth are completed on the source side's levels. Then, for ``L = d(s,t) ..
max_hops``, a depth-first enumeration of the simple paths of exactly ``L`` hops keeps only
children with the right bit (the shortest length never dead-ends), children in a random order
from ``rng``. Lengths grow only as far as needed for k paths. Same results contract as the A*
modes (k shortest simple paths, shortest first, the same path lengths); the walk sets depend on
the graph only, so they are cached per endpoint across pairs and calls (``PathCache``; one per
``GraphIndex`` by default; ``kale_ray.core.search.walks``) without changing any result. Paths
report ``"bidir"``. ``max_expansions`` counts enumerated non-goal states. Up to
``MAX_BIDIRECTIONAL_HOPS`` (63) hops, beyond which the ``"target"`` A* runs instead. The index
must be undirected (as ``GraphIndex.build`` makes it by default), as for all modes. With numba
installed the enumeration runs compiled (same paths, draws and stats;
``kale_ray.core.search.numba_kernel``; ``KALE_RAY_NUMBA=0`` forces the Python loop). The default
mode of ``PathConfig``.
"""
from __future__ import annotations

import numpy as np

from kale_ray.core.kg import GraphIndex
from kale_ray.core.search.arrays import _Prepared, _resolve_cache
from kale_ray.core.search.common import KGPath, PathSearchParams, _bump
from kale_ray.core.search.numba_kernel import _enum_numba, _warm_numba
from kale_ray.core.search.walks import _BITV, PathCache, _bits_dtype, _bitv, _scratch, _work_bits


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
