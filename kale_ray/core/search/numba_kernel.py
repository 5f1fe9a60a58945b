"""Optional numba kernel for the bidirectional enumeration (the Python loop in
``kale_ray.core.search.bidirectional`` is the fallback).

numba is imported lazily, on the first bidirectional search (``_numba_enabled``); without it, or
with ``KALE_RAY_NUMBA=0``, nothing here is compiled and the core stays numpy-only.
"""
from __future__ import annotations

import os
import time

import numpy as np

# --------------------------------------------------------------------------- #
# Optional numba kernels for the bidirectional enumeration (numpy/Python fallback: bidirectional.py)
# --------------------------------------------------------------------------- #
# The depth-first enumeration is the same algorithm as the Python loop in ``_bidirectional``,
# compiled with numba when it is installed: the same children (row order, bit filter), the same
# lazy Fisher-Yates picks -- each one 64-bit draw from the Generator's own bit generator, called
# through its C function pointer, so the Generator's stream advances exactly as with
# ``bit_generator.random_raw`` -- the same budget and counters, hence the same paths and stats.
# Used only where ``random_raw`` *is* ``next_uint64`` (the 64-bit bit generators below) and
# ``KALE_RAY_NUMBA`` is not "0". ``JIT_STATS`` records the one-off cost (numba import plus
# compile or on-disk cache load, per process): benchmarks report it alongside the search.
_RAW64_BITGENS = tuple(getattr(np.random, name) for name in ("PCG64", "PCG64DXSM", "SFC64", "Philox")
                       if hasattr(np.random, name))
JIT_STATS: dict = {"available": None, "import_s": 0.0, "compile_s": 0.0, "kernels": []}
_NB: dict = {}  # "enum": the dispatcher; (bitgen type) -> next_uint64 address


def _numba_enabled() -> bool:
    ok = JIT_STATS["available"]
    if ok is None:
        ok = False
        if os.environ.get("KALE_RAY_NUMBA", "1").strip().lower() not in ("0", "false", "no", "off"):
            t0 = time.perf_counter()
            try:
                _NB["enum"] = _build_numba_enum()
                ok = True
            except Exception:  # numba missing or broken: the numpy/Python path
                ok = False
            JIT_STATS["import_s"] = time.perf_counter() - t0
        JIT_STATS["available"] = ok
    return ok


def _pick_swap_src(bn, be, i, end, fnptr, state):
    """Lazy Fisher-Yates step: swap entry ``i`` with one of ``i .. end-1`` picked by one 64-bit draw
    (the high 64 bits of ``raw * (end - i)``, as the Python loops' ``(raw() * n) >> 64``)."""
    x = _nb_next_u64(fnptr, state)  # noqa: F821 (set by _build_numba_enum)
    w = np.uint64(end - i)
    hi_ = (x >> np.uint64(32)) * w
    lo_ = (x & np.uint64(0xFFFFFFFF)) * w
    j = i + np.int64((hi_ + (lo_ >> np.uint64(32))) >> np.uint64(32))
    t = bn[i]
    bn[i] = bn[j]
    bn[j] = t
    t = be[i]
    be[i] = be[j]
    be[j] = t


def _build_numba_enum():
    import numba
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def next_u64(typingctx, fnptr, state):
        """``bitgen->next_uint64(bitgen->state)`` from the two addresses."""
        sig = types.uint64(types.uintp, types.uintp)

        def codegen(context, builder, sig, args):
            i8p = ir.IntType(8).as_pointer()
            fnty = ir.FunctionType(ir.IntType(64), (i8p,))
            fp = builder.inttoptr(args[0], fnty.as_pointer())
            return builder.call(fp, (builder.inttoptr(args[1], i8p),))
        return sig, codegen

    # a module global, not a closure cell: numba's on-disk cache keys on closure contents (an
    # intrinsic there would miss the cache in every new process)
    globals()["_nb_next_u64"] = next_u64
    globals()["_nb_pick_swap"] = numba.njit(cache=True, nogil=True)(_pick_swap_src)

    def enum(indptr, nbr, M, bitv, source, target, L, distinct, kleft, budget_left, fnptr, state):
        """Simple paths source -> target of exactly L hops (see ``_bidirectional``): returns
        (found, nodes (cap, L + 1), entries (cap, L), expansions, scanned, exhausted)."""
        cap = min(kleft, 16)
        out_n = np.empty((cap, L + 1), dtype=np.int64)
        out_e = np.empty((cap, L), dtype=np.int64)
        nf = 0
        path = np.empty(L + 1, dtype=np.int64)
        pe = np.empty(L + 1, dtype=np.int64)
        fstart = np.empty(L + 1, dtype=np.int64)
        fend = np.empty(L + 1, dtype=np.int64)
        fcur = np.empty(L + 1, dtype=np.int64)
        bn = np.empty(256, dtype=np.int64)  # the frames' children, stacked
        be = np.empty(256, dtype=np.int64)
        exp = 0
        scanned = 0
        exhausted = False
        path[0] = source
        plen = 1
        u = source
        r = L - 1
        depth = 0
        used = 0
        while True:
            # ---- push the frame of u's children with bit r (r == 0: the target's entries) ----
            lo = indptr[u]
            hi = indptr[u + 1]
            if used + (hi - lo) > bn.size:
                size = max(2 * bn.size, used + (hi - lo))
                bn2 = np.empty(size, dtype=np.int64)
                be2 = np.empty(size, dtype=np.int64)
                bn2[:used] = bn[:used]
                be2[:used] = be[:used]
                bn = bn2
                be = be2
            fstart[depth] = used
            fcur[depth] = used
            if r == 0:
                for e in range(lo, hi):
                    if nbr[e] == target:
                        bn[used] = target
                        be[used] = e
                        used += 1
            else:
                b = bitv[r]
                for e in range(lo, hi):
                    w = nbr[e]
                    if M[w] & b:
                        bn[used] = w
                        be[used] = e
                        used += 1
            fend[depth] = used
            depth += 1
            scanned += hi - lo
            # ---- run until the next push ----
            pushed = False
            while depth > 0:
                f = depth - 1
                i = fcur[f]
                m = fend[f]
                if i >= m:
                    depth -= 1
                    used = fstart[f]
                    if plen > 1:
                        plen -= 1
                    continue
                if m - i > 1:
                    _nb_pick_swap(bn, be, i, m, fnptr, state)  # noqa: F821 (set above)
                fcur[f] = i + 1
                v = bn[i]
                onpath = False
                for q in range(plen):
                    if path[q] == v:
                        onpath = True
                        break
                if onpath:
                    continue
                pos = plen
                if v == target:
                    if pos == L:
                        if nf == cap:
                            cap *= 2
                            n2 = np.empty((cap, L + 1), dtype=np.int64)
                            e2 = np.empty((cap, L), dtype=np.int64)
                            n2[:nf] = out_n[:nf]
                            e2[:nf] = out_e[:nf]
                            out_n = n2
                            out_e = e2
                        out_n[nf, :plen] = path[:plen]
                        out_n[nf, plen] = v
                        out_e[nf, :plen - 1] = pe[:plen - 1]
                        out_e[nf, plen - 1] = be[i]
                        nf += 1
                        if nf >= kleft:
                            return nf, out_n, out_e, exp, scanned, exhausted
                    continue
                if exp >= budget_left:
                    return nf, out_n, out_e, exp, scanned, True
                exp += 1
                if distinct and pos == L - 1:  # v is a neighbour of the target: a path
                    if nf == cap:
                        cap *= 2
                        n2 = np.empty((cap, L + 1), dtype=np.int64)
                        e2 = np.empty((cap, L), dtype=np.int64)
                        n2[:nf] = out_n[:nf]
                        e2[:nf] = out_e[:nf]
                        out_n = n2
                        out_e = e2
                    vlo = indptr[v]
                    out_n[nf, :plen] = path[:plen]
                    out_n[nf, plen] = v
                    out_n[nf, plen + 1] = target
                    out_e[nf, :plen - 1] = pe[:plen - 1]
                    out_e[nf, plen - 1] = be[i]
                    out_e[nf, plen] = vlo + np.searchsorted(nbr[vlo:indptr[v + 1]], target)
                    nf += 1
                    if nf >= kleft:
                        return nf, out_n, out_e, exp, scanned, exhausted
                    continue
                path[plen] = v
                pe[plen - 1] = be[i]
                plen += 1
                u = v
                r = L - pos - 1
                pushed = True
                break
            if not pushed:
                return nf, out_n, out_e, exp, scanned, exhausted

    return numba.njit(cache=True, nogil=True)(enum)


def _enum_numba(rng):
    """The compiled enumeration and the bit generator's (next_uint64, state) addresses, or None."""
    bg = rng.bit_generator
    tp = type(bg)
    if tp not in _RAW64_BITGENS or not _numba_enabled():
        return None
    fn = _NB.get(tp)
    if fn is None:
        import ctypes

        fn = _NB[tp] = ctypes.cast(bg.ctypes.next_uint64, ctypes.c_void_p).value
    return _NB["enum"], fn, bg.ctypes.state_address


def _warm_numba(kern, dtype) -> None:
    """Compile (or load from numba's cache) the kernel for bits of ``dtype`` on a 2-node graph, timed."""
    key = ("warm", np.dtype(dtype).str)
    if key in _NB:
        return
    t0 = time.perf_counter()
    ip, nb = np.array([0, 1, 2], dtype=np.int64), np.array([1, 0], dtype=np.intp)
    kern(ip, nb, np.array([0, 1], dtype=dtype), np.array([1, 2], dtype=dtype), 0, 1, 1, False, 1, 1, 0, 0)
    JIT_STATS["compile_s"] += time.perf_counter() - t0
    JIT_STATS["kernels"].append(np.dtype(dtype).name)
    _NB[key] = True


# --------------------------------------------------------------------------- #
# The relation-chain search (``relations._chain_python`` is the reference: same layers, draws,
# budget and counters, hence the same paths)
# --------------------------------------------------------------------------- #
def _chain_numba(rng):
    """The compiled chain search and the bit generator's (next_uint64, state) addresses, or None."""
    bg = rng.bit_generator
    tp = type(bg)
    if tp not in _RAW64_BITGENS or not _numba_enabled():
        return None
    kern = _NB.get("chain")
    if kern is None:
        t0 = time.perf_counter()
        try:
            kern = _build_numba_chain()
        except Exception:  # compile failure: the Python reference
            kern = False
        _NB["chain"] = kern
        JIT_STATS["compile_s"] += time.perf_counter() - t0
        if kern:
            JIT_STATS["kernels"].append("chain")
    if not kern:
        return None
    c = bg.ctypes
    fn = _NB.get(tp)
    if fn is None:
        import ctypes

        fn = _NB[tp] = ctypes.cast(c.next_uint64, ctypes.c_void_p).value
    return kern, fn, c.state_address


def _chain_layers_src(indptr, nbr, rel, A, target, budget):
    """Backward layers 1..n (concatenated, sorted; ``off[i]:off[i+1]`` is layer i, layer n = target),
    the entries scanned, and whether every layer is non-empty."""
    n = A.shape[0]
    off = np.zeros(n + 2, dtype=np.int64)
    cur = np.empty(1, dtype=np.int64)
    cur[0] = target
    parts = [cur]  # parts[j] = layer n - j
    rows_read = 0
    scanned = 0
    for i in range(n - 1, 0, -1):  # layer 0 is left empty (the enumeration starts at the source)
        take = min(cur.size, max(0, budget - rows_read))
        rows_read += take
        total = 0
        for a in range(take):
            u = cur[a]
            total += indptr[u + 1] - indptr[u]
        scanned += total
        buf = np.empty(total, dtype=np.int64)
        m = 0
        for a in range(take):
            u = cur[a]
            for e in range(indptr[u], indptr[u + 1]):
                if A[i, rel[e]] != 0:
                    buf[m] = nbr[e]
                    m += 1
        if m == 0:
            return np.empty(0, dtype=np.int64), off, scanned, False
        cur = np.unique(buf[:m])
        parts.append(cur)
    size = 0
    for p in parts:
        size += p.size
    data = np.empty(size, dtype=np.int64)
    pos = 0
    for i in range(1, n + 1):  # layer i is parts[n - i]
        p = parts[n - i]
        off[i] = pos
        data[pos:pos + p.size] = p
        pos += p.size
    off[n + 1] = pos
    return data, off, scanned, True

def _chain_src(indptr, nbr, rel, fwd, A, source, target, distinct, k, budget, prefer_forward, fnptr, state):
    """(found, nodes (cap, n + 1), entries (cap, n), expansions, scanned), the found ones sorted."""
    n = A.shape[0]
    out_n = np.empty((max(k, 1), n + 1), dtype=np.int64)
    out_e = np.empty((max(k, 1), n), dtype=np.int64)
    data, off, scanned, ok = _nb_chain_layers(  # noqa: F821 (set by _build_numba_chain)
        indptr, nbr, rel, A, target, budget)
    if not ok:
        return 0, out_n, out_e, 0, scanned
    path = np.empty(n + 1, dtype=np.int64)
    pe = np.empty(n + 1, dtype=np.int64)
    fstart = np.empty(n + 1, dtype=np.int64)
    fmid = np.empty(n + 1, dtype=np.int64)
    fend = np.empty(n + 1, dtype=np.int64)
    fcur = np.empty(n + 1, dtype=np.int64)
    bn = np.empty(256, dtype=np.int64)
    be = np.empty(256, dtype=np.int64)
    tmp_n = np.empty(256, dtype=np.int64)
    tmp_e = np.empty(256, dtype=np.int64)
    nf = 0
    exp = 0
    path[0] = source
    plen = 1
    u = source
    depth = 0
    used = 0
    while True:
        # ---- push the frame of u's children at position i = plen - 1 ----
        i = plen - 1
        lo = indptr[u]
        hi = indptr[u + 1]
        scanned += hi - lo
        if used + (hi - lo) > bn.size:
            size = max(2 * bn.size, used + (hi - lo))
            bn2 = np.empty(size, dtype=np.int64)
            be2 = np.empty(size, dtype=np.int64)
            bn2[:used] = bn[:used]
            be2[:used] = be[:used]
            bn = bn2
            be = be2
        if hi - lo > tmp_n.size:
            tmp_n = np.empty(hi - lo, dtype=np.int64)
            tmp_e = np.empty(hi - lo, dtype=np.int64)
        nxt = data[off[i + 1]:off[i + 2]]
        last = i == n - 1
        fstart[depth] = used
        fcur[depth] = used
        nsec = 0
        for e in range(lo, hi):
            if A[i, rel[e]] == 0:
                continue
            v = nbr[e]
            if not last and v == target:
                continue
            q = np.searchsorted(nxt, v)
            if q >= nxt.size or nxt[q] != v:
                continue
            onpath = False
            for t in range(plen):
                if path[t] == v:
                    onpath = True
                    break
            if onpath:
                continue
            if fwd[e] == prefer_forward:
                bn[used] = v
                be[used] = e
                used += 1
            else:
                tmp_n[nsec] = v
                tmp_e[nsec] = e
                nsec += 1
        fmid[depth] = used
        for t in range(nsec):
            bn[used] = tmp_n[t]
            be[used] = tmp_e[t]
            used += 1
        fend[depth] = used
        depth += 1
        # ---- run until the next push ----
        pushed = False
        while depth > 0 and nf < k and exp < budget:
            f = depth - 1
            c = fcur[f]
            m = fend[f]
            if c >= m:
                depth -= 1
                used = fstart[f]
                if plen > 1:
                    plen -= 1
                continue
            end = fmid[f] if c < fmid[f] else m
            if end - c > 1:
                _nb_pick_swap(bn, be, c, end, fnptr, state)  # noqa: F821 (set by _build_numba_enum)
            fcur[f] = c + 1
            v = bn[c]
            e = be[c]
            if plen == n:  # v is the target
                dup = False
                if distinct:
                    for a in range(nf):
                        same = True
                        for t in range(plen):
                            if out_n[a, t] != path[t]:
                                same = False
                                break
                        if same:
                            dup = True
                            break
                if not dup:
                    out_n[nf, :plen] = path[:plen]
                    out_n[nf, plen] = v
                    out_e[nf, :plen - 1] = pe[:plen - 1]
                    out_e[nf, plen - 1] = e
                    nf += 1
                continue
            exp += 1
            path[plen] = v
            pe[plen - 1] = e
            plen += 1
            u = v
            pushed = True
            break
        if not pushed:
            break
    # more hops read forward first (stable), as the Python reference
    score = np.empty(nf, dtype=np.int64)
    for a in range(nf):
        s = 0
        for t in range(n):
            if fwd[out_e[a, t]]:
                s += 1
        score[a] = -s if prefer_forward else s
    order = np.argsort(score, kind="mergesort")
    return nf, out_n[order], out_e[order], exp, scanned



def _build_numba_chain():
    import numba

    if "_nb_next_u64" not in globals():
        _build_numba_enum()
    # module globals, not closure cells (numba's on-disk cache keys on closure contents)
    globals()["_nb_chain_layers"] = numba.njit(cache=True, nogil=True)(_chain_layers_src)
    return numba.njit(cache=True, nogil=True)(_chain_src)
