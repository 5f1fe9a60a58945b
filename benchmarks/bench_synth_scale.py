"""Synthesis at KG scale (issue 11, "Benchmark"): load, bare search, the Ray Data pipeline, memory, scaling.

    .venv/bin/python benchmarks/bench_synth_scale.py --sizes 1e5 --questions 1e4      # small, ~minutes
    .venv/bin/python benchmarks/bench_synth_scale.py                                  # 1e5,1e6,5e6 x 1e4,1e5,1e6
    .venv/bin/python benchmarks/bench_synth_scale.py --quick                          # = the small run above

Data (numpy, seeded; cached under ``--data-dir``, default /tmp/kale_scale, so reruns skip it):
a synthetic power-law KG per size N: ``kg.tsv`` (``e<i><TAB>r_<j><TAB>e<k>``, ~``--triples-per-entity``
x N unique triples over ``--relations`` relations: every entity is the head of one triple, the other
endpoints are drawn from a Zipf-like law ``p(i) ~ (i+1)^-alpha`` over a random permutation of the ids,
relations from ``p(j) ~ (j+1)^-1``), ``names.tsv`` (``e<i><TAB>entity <i>``), and one QA JSONL per
question count: 2-hop questions from random walks (start uniform, each hop a uniformly drawn out-edge,
start / middle / answer distinct), with ``question_entities``, ``answer_entities``, 4 ``choices``,
``num_hops`` and ``hops`` (the fields ``kale_ray.core.qa.read_qa_jsonl`` accepts). Files are written with
pyarrow's CSV writer.

Subprocesses get ``PYTHONPATH=<this checkout>`` so the CLI runs the kale_ray next to this script (run a
copy of the script from a snapshot of another revision to measure that revision).

Per size, each measurement in its own subprocess (so nothing is warm in-process and its peak RSS is
its own), with the 1-minute load average before and after:
* **load**: KG load + index seconds, cold and cached. With ``kale_ray.core.kgstore.load_columnar_kg``
  (when importable): cold = an empty cache dir, cached = the same dir again; bytes = ``ColumnarKG.nbytes()``.
  Otherwise today's ``load_kg`` + ``GraphIndex.from_kg`` (no on-disk cache: the "cached" run only has a
  warm OS file cache, as the cold one mostly has too), bytes = the CSR arrays + the triples array (what a
  shared columnar store would hold; the Python lists/dicts of ids and names are not counted).
* **bare search**: ``SynthContext`` + ``steps.link_and_search`` on the first ``--search-sample`` rows of
  the QA file, one process, one thread: questions/s per core (wall, and per CPU-second). One untimed
  warm-up row (numba JIT etc.); context build time reported apart.
* **pipeline**: ``kale-ray synthesize kg.source=... kg.names=... qa.source=... generation.backend=template
  out_dir=<fresh>`` as a subprocess, once per question count. Path-stage questions/s =
  rows / ``summary.json`` ``seconds.link_and_paths``; per core = / ``os.cpu_count()`` (the CLI's local Ray
  may use every core). Peak RSS sampled with psutil every 0.2 s: the driver (the CLI process) and every
  descendant whose cmdline starts with ``ray::`` (Ray's own ``ray::DashboardAgent`` / ``RuntimeEnvAgent``
  reported apart, not as workers): max per worker, the sum of the workers' maxima, and the largest
  instantaneous sum. A run whose driver + workers pass ``--rss-limit-gb`` is killed and recorded so.
* **scaling** 1 -> 2 workers on the path stage: with a ``num_cpus`` setting in ``SynthConfig`` the CLI with
  it; otherwise (today) ``ray.init(num_cpus=w)`` + ``run_synthesis(load_config(SynthConfig, None, overrides))``
  in a subprocess (this script's ``--child pipeline``), on ``--scaling-questions`` questions.

Prints a table: each target of the issue, the measured value, its baseline measured in the same run and
the ratio; writes ``benchmarks/results/synth_scale.json`` (``--out``): machine, load average, every figure.
Sizes above ``--search-max-entities`` (default 1e6) get the load measurement only (the 5e6 target is a
load target; today's search / pipeline there would need well over ``--rss-limit-gb``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from common import Load, machine, now, versions, write_result  # noqa: E402

MiB = 1 << 20
RESULT_TAG = "BENCH_RESULT "
GEN_VERSION = 2  # bump when the generator changes: cached data is regenerated
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def num(text: str) -> int:
    return int(float(text))


def nums(text: str) -> list[int]:
    return [num(x) for x in text.split(",") if x.strip()]


def label(n: int) -> str:
    """1e5, 5e6, ... for round sizes; the number otherwise."""
    s = f"{n:.0e}"
    if n >= 10 and float(s) == n:
        m, e = s.split("e+")
        return f"{m}e{int(e)}"
    return str(n)


def la1() -> float:
    return round(os.getloadavg()[0], 2)


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def _zipf_sampler(n: int, alpha: float, rng: np.random.Generator):
    cdf = np.cumsum((np.arange(1, n + 1, dtype=np.float64)) ** -alpha)
    cdf /= cdf[-1]
    return lambda size: np.minimum(np.searchsorted(cdf, rng.random(size)), n - 1)


def generate_kg(n: int, tpe: float, n_rel: int, alpha: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h, r, t) int64 arrays of unique triples, no self-loops; every entity heads at least one triple."""
    rng = np.random.default_rng([seed, n])
    perm = rng.permutation(n).astype(np.int64)  # hubs get random ids
    ent = _zipf_sampler(n, alpha, rng)
    rel = _zipf_sampler(n_rel, 1.0, rng)
    m = int(round(tpe * n))
    extra = m - n
    h = np.concatenate([np.arange(n, dtype=np.int64), perm[ent(extra)]])
    t = perm[ent(m)]
    r = rel(m).astype(np.int64)
    # self-loops: redraw the tail a few times, drop what is left
    for _ in range(4):
        bad = np.flatnonzero(h == t)
        if not bad.size:
            break
        t[bad] = perm[ent(bad.size)]
    keep = h != t
    h, r, t = h[keep], r[keep], t[keep]
    key = (h * n_rel + r) * n + t
    _, first = np.unique(key, return_index=True)
    first.sort()
    return h[first], r[first], t[first]


def _write_tsv(path: Path, cols: list) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    table = pa.table({f"c{i}": c for i, c in enumerate(cols)})
    tmp = path.with_name(path.name + ".tmp")
    pacsv.write_csv(table, tmp, pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none"))
    tmp.replace(path)


def _prefixed(prefix: str, ids: np.ndarray):
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(ids), pa.string()), "")


def generate_questions(h: np.ndarray, r: np.ndarray, t: np.ndarray, n: int, n_q: int, seed: int) -> dict[str, np.ndarray]:
    """2-hop random walks start -r1-> mid -r2-> answer (forward edges), the three distinct."""
    rng = np.random.default_rng([seed, n, 2])
    order = np.argsort(h, kind="stable")
    hs, rs, ts = h[order], r[order], t[order]
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(hs, minlength=n), out=ptr[1:])
    deg = np.diff(ptr)
    got: list[np.ndarray] = []
    have = 0
    while have < n_q:
        m = int((n_q - have) * 1.3) + 16
        s = rng.integers(0, n, m)
        s = s[deg[s] > 0]
        e1 = ptr[s] + (rng.random(s.size) * deg[s]).astype(np.int64)
        mid = ts[e1]
        ok = deg[mid] > 0
        s, e1, mid = s[ok], e1[ok], mid[ok]
        e2 = ptr[mid] + (rng.random(mid.size) * deg[mid]).astype(np.int64)
        ans = ts[e2]
        ok = (ans != s) & (mid != s) & (ans != mid)
        block = np.stack([s[ok], rs[e1[ok]], mid[ok], rs[e2[ok]], ans[ok]], axis=1)
        got.append(block)
        have += len(block)
    q = np.concatenate(got)[:n_q]
    # 3 distractors != answer (and distinct from each other)
    d = rng.integers(0, n, (n_q, 3))
    for _ in range(10):
        bad = (d == q[:, 4:5]) | (d[:, [1, 2, 0]] == d)
        if not bad.any():
            break
        d[bad] = rng.integers(0, n, int(bad.sum()))
    pos = rng.integers(0, 4, n_q)  # where the answer goes among the choices
    return {"start": q[:, 0], "r1": q[:, 1], "mid": q[:, 2], "r2": q[:, 3], "answer": q[:, 4], "distractors": d, "pos": pos}


def write_questions(path: Path, q: dict[str, np.ndarray], n_q: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    s, r1, mid, r2, a, d, pos = (q[k][:n_q].tolist() for k in ("start", "r1", "mid", "r2", "answer", "distractors", "pos"))
    with tmp.open("w", buffering=1 << 22) as f:
        for i in range(n_q):
            ch = [f'"entity {x}"' for x in d[i]]
            ch.insert(pos[i], f'"entity {a[i]}"')
            f.write(f'{{"id": "q{i + 1:06d}", "question": "Which concept X satisfies: entity {s[i]} r {r1[i]} A, '
                    f'and A r {r2[i]} X?", "answer": "entity {a[i]}", "question_entities": ["e{s[i]}"], '
                    f'"answer_entities": ["e{a[i]}"], "choices": [{", ".join(ch)}], "num_hops": 2, '
                    f'"hops": [["e{s[i]}", "r_{r1[i]}", "e{mid[i]}"], ["e{mid[i]}", "r_{r2[i]}", "e{a[i]}"]]}}\n')
    tmp.replace(path)


def ensure_data(args, n: int, q_counts: list[int]) -> dict[str, Any]:
    """Generate (or reuse) kg.tsv, names.tsv and qa_<Q>.jsonl for size n."""
    d = Path(args.data_dir) / f"n{label(n)}_tpe{args.triples_per_entity:g}_r{args.relations}_a{args.alpha:g}_s{args.seed}"
    d.mkdir(parents=True, exist_ok=True)
    meta_p = d / "meta.json"
    want = {"gen_version": GEN_VERSION, "entities": n, "triples_per_entity": args.triples_per_entity,
            "relations": args.relations, "alpha": args.alpha, "seed": args.seed}
    meta = json.loads(meta_p.read_text()) if meta_p.exists() else {}
    if {k: meta.get(k) for k in want} != want or not (d / "kg.tsv").exists() or not (d / "names.tsv").exists():
        meta = dict(want, questions={})
    info: dict[str, Any] = {"dir": str(d), "generated": [], "reused": []}
    need_q = [c for c in q_counts if str(c) not in meta.get("questions", {}) or not (d / f"qa_{label(c)}.jsonl").exists()]
    if "triples" in meta and not need_q:
        info["reused"] = ["kg.tsv", "names.tsv"] + [f"qa_{label(c)}.jsonl" for c in q_counts]
        info.update(triples=meta["triples"], seconds=meta.get("seconds", {}))
        return info
    t0 = time.perf_counter()
    h, r, t = generate_kg(n, args.triples_per_entity, args.relations, args.alpha, args.seed)
    gen_s = time.perf_counter() - t0
    if "triples" not in meta:
        t1 = time.perf_counter()
        _write_tsv(d / "kg.tsv", [_prefixed("e", h), _prefixed("r_", r), _prefixed("e", t)])
        ids = np.arange(n)
        _write_tsv(d / "names.tsv", [_prefixed("e", ids), _prefixed("entity ", ids)])
        meta["seconds"] = {"generate_kg": gen_s, "write_kg": time.perf_counter() - t1}
        meta["triples"] = int(len(h))
        deg = np.bincount(np.concatenate([h, t]), minlength=n)
        meta["degree"] = {"max": int(deg.max()), "mean": float(deg.mean()), "p99": float(np.percentile(deg, 99)),
                          "median": float(np.median(deg))}
        info["generated"] += ["kg.tsv", "names.tsv"]
        meta["questions"] = {}
    if need_q:
        t1 = time.perf_counter()
        q = generate_questions(h, r, t, n, max(need_q), args.seed)
        for c in need_q:
            write_questions(d / f"qa_{label(c)}.jsonl", q, c)
            meta["questions"][str(c)] = True
            info["generated"].append(f"qa_{label(c)}.jsonl")
        meta["seconds"][f"questions_{'_'.join(label(c) for c in need_q)}"] = time.perf_counter() - t1
    meta_p.write_text(json.dumps(meta, indent=1))
    info.update(triples=meta["triples"], seconds=meta["seconds"], degree=meta.get("degree"),
                generate_s=time.perf_counter() - t0)
    return info


def data_paths(info: dict, q: int | None = None) -> dict[str, str]:
    d = Path(info["dir"])
    out = {"kg": str(d / "kg.tsv"), "names": str(d / "names.tsv")}
    if q is not None:
        out["qa"] = str(d / f"qa_{label(q)}.jsonl")
    return out


# --------------------------------------------------------------------------- #
# Process memory sampling
# --------------------------------------------------------------------------- #
class Sampler(threading.Thread):
    """Every ``interval`` s: RSS of ``pid`` (the driver) and of its ``ray::`` descendants."""

    def __init__(self, pid: int, interval: float = 0.2, limit_bytes: int = 0, on_limit=None) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(pid)
        self.interval, self.limit, self.on_limit = interval, limit_bytes, on_limit
        self.stop_ev = threading.Event()
        self.driver_peak = 0
        self.workers: dict[int, dict[str, Any]] = {}
        self.agents: dict[int, dict[str, Any]] = {}
        self.others_peak = 0  # gcs_server, raylet, ... (not workers)
        self.sum_workers_peak = 0
        self.total_peak = 0
        self.samples = 0
        self.killed_for_rss = False
        self.procs: dict[int, Any] = {}
        self.driver_peak_uss = 0
        self.uss_every = 5  # USS (smaps) every 5th sample: ~1 s, it costs more than RSS

    def run(self) -> None:
        while not self.stop_ev.is_set():
            self.sample()
            self.stop_ev.wait(self.interval)

    def sample(self) -> None:
        ps = self.psutil
        try:
            drv = self.root.memory_info().rss
            kids = self.root.children(recursive=True)
        except (ps.NoSuchProcess, ps.AccessDenied):
            return
        self.driver_peak = max(self.driver_peak, drv)
        want_uss = self.samples % self.uss_every == 0
        if want_uss:
            try:
                self.driver_peak_uss = max(self.driver_peak_uss, self.root.memory_full_info().uss)
            except (ps.NoSuchProcess, ps.AccessDenied):
                pass
        wsum, other = 0, 0
        for p in kids:
            try:
                rss = p.memory_info().rss
                name = (p.cmdline() or [""])[0]
            except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
                continue
            self.procs[p.pid] = p
            if name.startswith("ray::"):
                tab = self.agents if name.startswith(AGENTS) else self.workers
                rec = tab.setdefault(p.pid, {"peak_rss": 0, "peak_uss": 0, "names": []})
                rec["peak_rss"] = max(rec["peak_rss"], rss)
                if want_uss or rss > rec.get("uss_at_rss", 0) * 1.05:  # and whenever RSS grew
                    try:
                        rec["peak_uss"] = max(rec["peak_uss"], p.memory_full_info().uss)
                        rec["uss_at_rss"] = rss
                    except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
                        pass
                nm = name.split()[0]
                if nm not in rec["names"]:
                    rec["names"].append(nm)
                if tab is self.workers:
                    wsum += rss
            else:
                other += rss
        self.sum_workers_peak = max(self.sum_workers_peak, wsum)
        self.others_peak = max(self.others_peak, other)
        self.total_peak = max(self.total_peak, drv + wsum)
        self.samples += 1
        if self.limit and drv + wsum > self.limit and not self.killed_for_rss:
            self.killed_for_rss = True
            if self.on_limit:
                self.on_limit()

    def stop(self) -> dict[str, Any]:
        self.stop_ev.set()
        self.join(timeout=5)
        busy = {pid: w for pid, w in self.workers.items() if any(n != "ray::IDLE" for n in w["names"])}
        peaks = [w["peak_rss"] for w in self.workers.values()]
        usss = [w["peak_uss"] for w in self.workers.values()]
        return {
            "driver_peak_rss_mib": self.driver_peak / MiB,
            "driver_peak_uss_mib": self.driver_peak_uss / MiB,
            "worker_peak_uss_mib_max": (max(usss) / MiB) if usss else None,
            "worker_peak_uss_mib_sum_of_maxima": sum(usss) / MiB,
            "worker_peak_rss_mib_max": (max(peaks) / MiB) if peaks else None,
            "worker_peak_rss_mib_sum_of_maxima": sum(peaks) / MiB,
            "workers_rss_mib_max_instantaneous_sum": self.sum_workers_peak / MiB,
            "driver_plus_workers_peak_rss_mib": self.total_peak / MiB,
            "ray_system_processes_peak_rss_mib": self.others_peak / MiB,
            "workers": {str(pid): {"peak_rss_mib": w["peak_rss"] / MiB, "peak_uss_mib": w["peak_uss"] / MiB,
                                   "names": w["names"]}
                        for pid, w in sorted(self.workers.items())},
            "workers_that_ran_tasks": len(busy),
            "peak_rss_mib_by_task": _by_task(self.workers),
            "agents": {str(pid): {"peak_rss_mib": w["peak_rss"] / MiB, "names": w["names"]}
                       for pid, w in sorted(self.agents.items())},
            "samples": self.samples, "killed_rss_limit": self.killed_for_rss,
            "note": "RSS (psutil memory_info().rss) sampled every 0.2 s; object-store pages a worker maps "
                    "count in its RSS (shared between workers, so the sum over-counts them); USS "
                    "(memory_full_info().uss: pages private to the process) about every 1 s and whenever RSS grew",
        }


def _by_task(workers: dict[int, dict]) -> dict[str, float]:
    """Largest peak RSS among the workers that ran each named task or actor (a worker may run several)."""
    out: dict[str, float] = {}
    for w in workers.values():
        for n in w["names"]:
            if n != "ray::IDLE":
                out[n] = max(out.get(n, 0.0), w["peak_rss"] / MiB)
    return dict(sorted(out.items()))


def cache_env(work: Path) -> dict:
    """Subprocess env: PYTHONPATH=<this checkout>, KALE_RAY_CACHE=<work>/cache (the KG artifact under kg/)."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    env["KALE_RAY_CACHE"] = str(work / "cache")
    return env


def run_monitored(cmd: list[str], log: Path, timeout: float, rss_limit_gb: float, env: dict | None = None) -> dict[str, Any]:
    """Run ``cmd`` in its own session, sample memory, enforce a timeout and an RSS limit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if env is None:  # subprocesses (the CLI too) import the kale_ray next to this script
        env = os.environ.copy()
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    la0 = la1()
    t0 = time.perf_counter()
    with log.open("w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env, cwd=str(ROOT))
        sampler = Sampler(proc.pid, limit_bytes=int(rss_limit_gb * (1 << 30)), on_limit=lambda: _kill(proc, sampler))
        sampler.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc, sampler)
            proc.wait()
        mem = sampler.stop()
    wall = time.perf_counter() - t0
    _kill_leftovers(sampler)
    text = log.read_text(errors="replace")
    result = None
    for line in text.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
    return {"cmd": " ".join(cmd), "rc": proc.returncode, "wall_s": wall, "timed_out": timed_out,
            "timeout_s": timeout, "killed_rss_limit": mem["killed_rss_limit"], "rss_limit_gb": rss_limit_gb,
            "memory": mem, "loadavg_before": la0, "loadavg_after": la1(), "log": str(log), "result": result,
            "log_tail": text[-1500:] if proc.returncode else ""}


def _kill(proc, sampler) -> None:
    """SIGKILL the process group this script started, then any descendant the sampler saw (by pid)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _kill_leftovers(sampler)


def _kill_leftovers(sampler) -> None:
    for pid, p in list(sampler.procs.items()):
        try:
            if p.is_running():  # psutil checks the pid was not reused
                p.kill()
        except Exception:  # noqa: BLE001 - gone already
            pass


# --------------------------------------------------------------------------- #
# Children (run as subprocesses of this script)
# --------------------------------------------------------------------------- #
def _emit(obj: dict) -> None:
    print(RESULT_TAG + json.dumps(obj, default=str), flush=True)


def columnar_loader():
    try:
        from kale_ray.core.kgstore import load_columnar_kg  # noqa: F401
        return load_columnar_kg
    except ImportError:
        return None


def child_load(a) -> None:
    import psutil

    lc = columnar_loader()
    t0 = time.perf_counter()
    if lc is not None and not a.force_load_kg:
        ckg = lc(source=a.kg, names=a.names, on_error="error", cache_dir=a.cache_dir, undirected=True)
        total = time.perf_counter() - t0
        out = {"loader": "kale_ray.core.kgstore.load_columnar_kg", "load_and_index_s": total,
               "shared_array_bytes": int(ckg.nbytes())}
        for attr in ("num_entities", "num_relations", "num_triples"):
            v = getattr(ckg, attr, None)
            if v is not None and not callable(v):
                out[attr] = int(v)
    else:
        from kale_ray.core.kg import GraphIndex, load_kg

        kg = load_kg(a.kg, a.names, "error")
        t1 = time.perf_counter()
        index = GraphIndex.from_kg(kg, undirected=True)
        t2 = time.perf_counter()
        arrays = {k: int(getattr(index, k).nbytes) for k in ("indptr", "nbr", "rel", "tid", "inv")}
        arrays["triples"] = int(kg.triples.nbytes)
        out = {"loader": "kale_ray.core.kg.load_kg + GraphIndex.from_kg", "load_s": t1 - t0, "index_s": t2 - t1,
               "load_and_index_s": t2 - t0, "shared_array_bytes": sum(arrays.values()), "array_bytes": arrays,
               "num_entities": kg.num_entities, "num_relations": kg.num_relations, "num_triples": int(len(kg.triples))}
    out["rss_after_mib"] = psutil.Process().memory_info().rss / MiB
    _emit(out)


def _synth_cfg(overrides: list[str]):
    from kale_ray.config import SynthConfig, load_config

    return load_config(SynthConfig, None, overrides)


def child_search(a) -> None:
    """Bare search: SynthContext + link_and_search on the first rows, one process, one thread."""
    import inspect

    from kale_ray.core.qa import read_qa_jsonl
    from kale_ray.synth import steps

    cfg = _synth_cfg(a.overrides)
    t0 = time.perf_counter()
    params = list(inspect.signature(steps.SynthContext).parameters)
    lc = columnar_loader()
    if lc is not None and not a.force_load_kg:  # what a pipeline worker builds over the shared columnar KG
        from kale_ray.core import kgstore

        kg = lc(source=a.kg, names=a.names, on_error="error", cache_dir=a.cache_dir, undirected=cfg.kg.undirected_search)
        t1 = time.perf_counter()
        if "index" in params:
            ctx = steps.SynthContext(kg, kg.index(cfg.kg.undirected_search), cfg.paths,
                                     linker=kgstore.ColumnarLinker(kg))
            how = "load_columnar_kg + SynthContext(kg, kg.index(), cfg.paths, linker=ColumnarLinker(kg))"
        else:
            ctx = steps.SynthContext(kg, cfg.paths)
            how = "load_columnar_kg + SynthContext(kg, cfg.paths)"
    else:
        from kale_ray.core.kg import GraphIndex, load_kg

        kg = load_kg(a.kg, a.names, "error")
        index = GraphIndex.from_kg(kg, undirected=cfg.kg.undirected_search)
        t1 = time.perf_counter()
        ctx = steps.SynthContext(kg, index, cfg.paths)
        how = "load_kg + GraphIndex.from_kg + SynthContext(kg, index, cfg.paths)"
    t2 = time.perf_counter()
    rows = []
    for ex in read_qa_jsonl(a.qa):
        rows.append(steps.qa_row(ex))
        if len(rows) > a.sample:
            break
    tw = time.perf_counter()
    steps.link_and_search(rows[0], ctx)  # warm-up: numba JIT / lazy per-graph structures
    warm = time.perf_counter() - tw
    timed = rows[1:]
    reasons: dict[str, int] = {}
    complete = 0
    c0, w0 = time.process_time(), time.perf_counter()
    deadline = w0 + a.max_seconds
    done = 0
    for row in timed:
        out = steps.link_and_search(row, ctx)
        reasons[out["reject_reason"] or "ok"] = reasons.get(out["reject_reason"] or "ok", 0) + 1
        complete += bool(out.get("path_complete"))
        done += 1
        if time.perf_counter() > deadline:
            break
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    _emit({"how": how, "paths_config": dataclasses.asdict(cfg.paths), "load_s": t1 - t0, "context_s": t2 - t1,
           "warmup_s": warm, "questions": done, "stopped_at_max_seconds": done < len(timed),
           "wall_s": wall, "cpu_s": cpu, "qps_per_core": done / wall if wall else None,
           "qps_per_cpu_s": done / cpu if cpu else None, "outcomes": reasons, "path_complete": complete})


def child_pipeline(a) -> None:
    """run_synthesis in-process with a local Ray of ``--num-cpus`` logical CPUs."""
    import ray

    from kale_ray.synth.pipeline import run_synthesis

    try:
        from kale_ray.runtime.ray import QUIET_ENV
    except ImportError:
        QUIET_ENV = None
    cfg = _synth_cfg(a.overrides)
    kw = {"runtime_env": QUIET_ENV} if QUIET_ENV else {}
    ray.init(num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False, **kw)
    try:
        summary = run_synthesis(cfg)
    finally:
        ray.shutdown()
    _emit({"summary": summary.to_dict() if hasattr(summary, "to_dict") else summary})


# --------------------------------------------------------------------------- #
# Measurements (parent)
# --------------------------------------------------------------------------- #
def _child_cmd(kind: str, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", kind, *extra]


def kale_ray_cli() -> str:
    p = Path(sys.executable).parent / "kale-ray"
    return str(p) if p.exists() else (shutil.which("kale-ray") or "kale-ray")


def cpu_override_key() -> str | None:
    """A SynthConfig setting for the number of Ray CPUs / search workers, when the config has one."""
    from kale_ray.config import SynthConfig

    for f in dataclasses.fields(SynthConfig):
        if f.name in ("num_cpus", "ray_num_cpus", "search_workers"):
            return f.name
        t = f.type if isinstance(f.type, type) else None
        if t is None and isinstance(f.default_factory, type):  # type: ignore[arg-type]
            t = f.default_factory
        if t is not None and dataclasses.is_dataclass(t):
            for g in dataclasses.fields(t):
                if g.name in ("num_cpus", "search_workers", "num_search_workers") and f.name in ("ray", "paths", "search"):
                    return f"{f.name}.{g.name}"
    return None


def measure_load(args, n: int, info: dict, work: Path) -> dict[str, Any]:
    p = data_paths(info)
    cache = work / "cache" / "kg"  # = $KALE_RAY_CACHE/kg of the pipeline runs (cache_env), kept for them
    shutil.rmtree(cache, ignore_errors=True)
    out: dict[str, Any] = {}
    for which in ("cold", "cached"):
        cmd = _child_cmd("load", "--kg", p["kg"], "--names", p["names"], "--cache-dir", str(cache))
        r = run_monitored(cmd, work / f"load_{which}.log", args.timeout, args.rss_limit_gb)
        out[which] = r
        res = r["result"] or {}
        print(f"  load [{which}]: {_fmt(res.get('load_and_index_s'), '.2f')} s ({res.get('loader', 'failed: ' + _why(r))}), "
              f"shared arrays {_fmt((res.get('shared_array_bytes') or 0) / MiB, '.0f')} MiB, peak RSS "
              f"{r['memory']['driver_peak_rss_mib']:.0f} MiB, load {r['loadavg_before']}->{r['loadavg_after']}", flush=True)
    res = out["cold"]["result"] or {}
    out["loader"] = res.get("loader")
    out["cached_means"] = ("an on-disk columnar cache (same cache_dir, second process)"
                           if res.get("loader", "").startswith("kale_ray.core.kgstore")
                           else "no on-disk cache exists: the same load again (warm OS file cache only)")
    return out


def measure_search(args, n: int, info: dict, q: int, work: Path) -> dict[str, Any]:
    p = data_paths(info, q)
    cmd = _child_cmd("search", "--kg", p["kg"], "--names", p["names"], "--qa", p["qa"], "--cache-dir",
                     str(work / "cache" / "kg"), "--sample", str(args.search_sample),
                     "--max-seconds", str(args.search_max_seconds), "--", *args.overrides)
    r = run_monitored(cmd, work / "search.log", args.timeout, args.rss_limit_gb)
    res = r["result"] or {}
    print(f"  bare search: {res.get('questions', 0)} questions, {_fmt(res.get('qps_per_core'), '.1f')} q/s per core "
          f"({_fmt(res.get('qps_per_cpu_s'), '.1f')} per CPU-s; context {_fmt(res.get('context_s'), '.1f')} s, "
          f"warm-up {_fmt(res.get('warmup_s'), '.2f')} s; outcomes {res.get('outcomes')}) "
          f"{'' if r['result'] else 'FAILED: ' + _why(r)}, peak RSS {r['memory']['driver_peak_rss_mib']:.0f} MiB, "
          f"load {r['loadavg_before']}->{r['loadavg_after']}", flush=True)
    return r


def _pipeline_overrides(args, p: dict, out_dir: Path, rows: int) -> list[str]:
    ov = [f"kg.source={p['kg']}", f"kg.names={p['names']}", f"qa.source={p['qa']}", "generation.backend=template",
          f"out_dir={out_dir}"]
    if rows:
        ov.append(f"max_rows={rows}")
    return ov + list(args.overrides)


def _pipeline_record(r: dict, out_dir: Path, cores: int) -> dict[str, Any]:
    summ = None
    sp = out_dir / "summary.json"
    if sp.exists():
        try:
            summ = json.loads(sp.read_text())
        except json.JSONDecodeError:
            summ = None
    rec = {k: v for k, v in r.items() if k != "result"}
    rec["summary"] = summ
    if summ and summ.get("seconds", {}).get("link_and_paths"):
        secs = summ["seconds"]
        rows = summ.get("rows_in") or 0
        rec["rows"] = rows
        rec["path_stage_s"] = secs["link_and_paths"]
        rec["path_stage_qps"] = rows / secs["link_and_paths"]
        rec["cores"] = cores
        rec["path_stage_qps_per_core"] = rec["path_stage_qps"] / cores
        rec["total_s"] = secs.get("total")
        rec["end_to_end_qps"] = rows / secs["total"] if secs.get("total") else None
        rec["stage_seconds"] = secs
        rec["wall_qps"] = rows / r["wall_s"] if r.get("wall_s") else None  # the CLI process, Ray start included
        rec["path_stage_share_of_wall"] = secs["link_and_paths"] / r["wall_s"] if r.get("wall_s") else None
        if secs.get("search_tasks_cpu"):  # inside the Ray Data tasks: the search's own CPU cost per question
            rec["search_tasks_qps_per_cpu_s"] = rows / secs["search_tasks_cpu"]
            rec["search_tasks_wall_s"] = secs.get("search_tasks_wall")
    return rec


def measure_pipeline(args, n: int, info: dict, q: int, work: Path) -> dict[str, Any]:
    p = data_paths(info, q)
    out_dir = work / f"synth_q{label(q)}"
    shutil.rmtree(out_dir, ignore_errors=True)
    rows = args.pipeline_rows if args.pipeline_rows and args.pipeline_rows < q else 0
    cmd = [kale_ray_cli(), "synthesize", *_pipeline_overrides(args, p, out_dir, rows)]
    r = run_monitored(cmd, work / f"pipeline_q{label(q)}.log", args.timeout, args.rss_limit_gb, env=cache_env(work))
    rec = _pipeline_record(r, out_dir, os.cpu_count() or 1)
    rec["questions_in_file"] = q
    m = r["memory"]
    print(f"  pipeline ({q} questions{f', max_rows={rows}' if rows else ''}): "
          + (f"path stage {rec['rows']} rows in {rec['path_stage_s']:.1f} s = {rec['path_stage_qps']:.1f} q/s = "
             f"{rec['path_stage_qps_per_core']:.1f} q/s per core; total {_fmt(rec['total_s'], '.1f')} s"
             if "path_stage_s" in rec else "FAILED: " + _why(r))
          + f"; driver peak {m['driver_peak_rss_mib']:.0f} MiB, worker peak max {_fmt(m['worker_peak_rss_mib_max'], '.0f')} MiB "
            f"RSS / {_fmt(m['worker_peak_uss_mib_max'], '.0f')} MiB USS "
            f"(sum of maxima {m['worker_peak_rss_mib_sum_of_maxima']:.0f}), wall {r['wall_s']:.1f} s, "
            f"load {r['loadavg_before']}->{r['loadavg_after']}", flush=True)
    if not args.keep_outputs:
        shutil.rmtree(out_dir, ignore_errors=True)
    return rec


def measure_scaling(args, n: int, info: dict, q: int, work: Path) -> dict[str, Any]:
    p = data_paths(info, q)
    key = cpu_override_key()
    res: dict[str, Any] = {"questions": q, "workers": {}, "rounds": args.scaling_rounds,
                           "how": (f"kale-ray synthesize {key}=w" if key else
                                   "ray.init(num_cpus=w) + run_synthesis(load_config(SynthConfig, None, overrides)) "
                                   "in a subprocess (SynthConfig has no CPU/worker-count setting)")}
    rows = args.pipeline_rows if args.pipeline_rows and args.pipeline_rows < q else 0
    for rnd in range(args.scaling_rounds):
        order = args.workers if rnd % 2 == 0 else list(reversed(args.workers))
        for w in order:
            out_dir = work / f"scale_w{w}_r{rnd}"
            shutil.rmtree(out_dir, ignore_errors=True)
            ov = _pipeline_overrides(args, p, out_dir, rows)
            cmd = ([kale_ray_cli(), "synthesize", *ov, f"{key}={w}"] if key
                   else _child_cmd("pipeline", "--num-cpus", str(w), "--", *ov))
            r = run_monitored(cmd, work / f"scale_w{w}_r{rnd}.log", args.timeout, args.rss_limit_gb, env=cache_env(work))
            rec = _pipeline_record(r, out_dir, w)
            rec["round"] = rnd
            res["workers"].setdefault(str(w), []).append(rec)
            print(f"  scaling, {w} worker(s), round {rnd + 1}: "
                  + (f"path stage {rec['rows']} rows in {rec['path_stage_s']:.1f} s = {rec['path_stage_qps']:.1f} q/s"
                     if "path_stage_s" in rec else "FAILED: " + _why(r))
                  + f"; load {r['loadavg_before']}->{r['loadavg_after']}", flush=True)
            if not args.keep_outputs:
                shutil.rmtree(out_dir, ignore_errors=True)
    best = {}
    for w, recs in res["workers"].items():
        ok = [x for x in recs if "path_stage_s" in x]
        if ok:
            best[w] = min(ok, key=lambda x: x["path_stage_s"])
    res["best_path_stage_qps"] = {w: b["path_stage_qps"] for w, b in best.items()}
    w0, w1 = str(args.workers[0]), str(args.workers[-1])
    if w0 in best and w1 in best:
        res["speedup"] = best[w1]["path_stage_qps"] / best[w0]["path_stage_qps"]
        print(f"  scaling {w0} -> {w1} workers: {res['speedup']:.2f}x on the path stage (best of {args.scaling_rounds})", flush=True)
    return res


def _why(r: dict) -> str:
    if r.get("timed_out"):
        return f"timed out after {r['timeout_s']:.0f} s"
    if r.get("killed_rss_limit"):
        return f"killed: driver + workers RSS over {r['rss_limit_gb']} GiB"
    tail = (r.get("log_tail") or "").strip().splitlines()
    return f"rc={r.get('rc')}: {tail[-1][:200] if tail else 'no output'} (log {r.get('log')})"


def _fmt(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


# --------------------------------------------------------------------------- #
# Targets
# --------------------------------------------------------------------------- #
def targets(sizes: dict[str, dict]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(size, target, measured, baseline, ratio, met, note="", unit=""):
        rows.append({"entities": size, "target": target, "measured": measured, "baseline": baseline,
                     "ratio": ratio, "met": met, "unit": unit, "note": note})

    for key, s in sizes.items():
        n = s["entities"]
        at = "" if n == 1_000_000 else f" (target is for 1e6 entities; measured at {label(n)})"
        load = s.get("load") or {}
        cold = (load.get("cold") or {}).get("result") or {}
        cached = (load.get("cached") or {}).get("result") or {}
        shared = cold.get("shared_array_bytes")
        if cold and cached:
            ratio = cached["load_and_index_s"] / cold["load_and_index_s"]
            at5 = "" if n == 5_000_000 else f" (target is for 5e6 entities; measured at {label(n)})"
            add(n, "cached KG load + index <= 10 s", cached["load_and_index_s"], cold["load_and_index_s"], ratio,
                cached["load_and_index_s"] <= 10 if n == 5_000_000 else None,
                f"baseline: cold load; cached = {load.get('cached_means')}{at5}", "s")
        bare_r = (s.get("bare_search") or {}).get("result") or {}
        # the bare search's faster rate, per core of wall or per CPU-s: where page faults or other load
        # stretch its wall time, the CPU rate is the honest (harder) baseline
        rates = [x for x in (bare_r.get("qps_per_core"), bare_r.get("qps_per_cpu_s")) if x]
        bare = max(rates) if rates else None
        pipes = s.get("pipeline") or {}
        ok_pipes = {qk: pr for qk, pr in pipes.items() if "path_stage_qps_per_core" in pr}
        if ok_pipes:
            qk = max(ok_pipes, key=int)  # the longest run: start-up amortised the most
            pr = ok_pipes[qk]
            v = pr["path_stage_qps_per_core"]
            add(n, "pipeline path stage >= 1,500 questions/s per core", v, bare, v / bare if bare else None,
                v >= 1500 if n == 1_000_000 else None, f"{pr['rows']} rows; baseline: bare search, the faster of per core and per CPU-s{at}", "q/s/core")
            if bare:
                add(n, "pipeline >= 0.8x bare search per core", v / bare, 0.8, (v / bare) / 0.8,
                    v / bare >= 0.8 if n == 1_000_000 else None,
                    f"bare search {bare:.1f} q/s (the faster of per core of wall and per CPU-s){at}", "x")
            bare_cpu = ((s.get("bare_search") or {}).get("result") or {}).get("qps_per_cpu_s")
            tq = pr.get("search_tasks_qps_per_cpu_s")
            if bare_cpu and tq:
                add(n, "  (pipeline tasks per CPU-s >= 0.8x bare search per CPU-s)", tq / bare_cpu, 0.8,
                    (tq / bare_cpu) / 0.8, tq / bare_cpu >= 0.8 if n == 1_000_000 else None,
                    f"{tq:.1f} vs {bare_cpu:.1f} q/CPU-s: the tasks' own cost, independent of other load{at}", "x")
        elif pipes:
            add(n, "pipeline path stage >= 1,500 questions/s per core", None, bare, None, False if n == 1_000_000 else None,
                "pipeline did not finish: " + "; ".join(_why(pr) for pr in pipes.values()))
        for qk, pr in sorted(ok_pipes.items(), key=lambda kv: int(kv[0])):
            m = pr["memory"]
            if shared and m.get("worker_peak_rss_mib_max") is not None:
                limit = 1.5 * shared / MiB + 300
                w = m["worker_peak_rss_mib_max"]
                add(n, "peak worker RSS <= 1.5x shared-array bytes + 300 MiB", w, limit, w / limit,
                    w <= limit if n == 1_000_000 else None,
                    f"{qk} questions; baseline: the limit ({shared / MiB:.0f} MiB shared arrays, loader "
                    f"{cold.get('loader')}); sum over workers of their peaks {m['worker_peak_rss_mib_sum_of_maxima']:.0f} MiB{at}",
                    "MiB")
                u = m.get("worker_peak_uss_mib_max")
                if u is not None:
                    add(n, "peak worker USS (private) <= 1.5x shared-array bytes + 300 MiB", u, limit, u / limit,
                        u <= limit if n == 1_000_000 else None,
                        f"{qk} questions; USS leaves out the shared KG pages RSS counts{at}", "MiB")
            d = m["driver_peak_rss_mib"]
            add(n, "driver peak RSS <= 500 MiB", d, 500, d / 500, d <= 500 if n == 1_000_000 else None,
                f"{qk} questions{at}", "MiB")
        done = {int(qk): pr["memory"]["driver_peak_rss_mib"] for qk, pr in pipes.items() if "path_stage_s" in pr}
        if len(done) >= 2:
            lo, hi = min(done), max(done)
            ratio = done[hi] / done[lo]
            full = lo <= 10_000 and hi >= 1_000_000
            add(n, "driver peak RSS flat within 20% from 1e4 to 1e6 questions", ratio, done[lo], ratio,
                (abs(ratio - 1) <= 0.2) if (n == 1_000_000 and full) else None,
                f"driver peak at {label(hi)} / at {label(lo)} questions ({done[lo]:.0f} -> {done[hi]:.0f} MiB)"
                + ("" if full else "; the 1e4..1e6 range not covered") + at, "x")
        sc = s.get("scaling") or {}
        if sc.get("speedup") is not None:
            qps = sc["best_path_stage_qps"]
            ws = sorted(qps, key=int)
            add(n, f"{ws[0]} -> {ws[-1]} workers >= 1.7x on the path stage", sc["speedup"], qps[ws[0]], sc["speedup"] / 1.7,
                sc["speedup"] >= 1.7 if n == 1_000_000 else None,
                f"baseline: {ws[0]} worker {qps[ws[0]]:.1f} q/s -> {qps[ws[-1]]:.1f} q/s, {sc['questions']} questions{at}", "x")
        elif sc:
            add(n, "1 -> 2 workers >= 1.7x on the path stage", None, None, None, False if n == 1_000_000 else None,
                "a scaling run did not finish")
    return rows


def print_table(rows: list[dict]) -> None:
    hdr = f"{'entities':>9} | {'target':58s} | {'measured':>11} | {'baseline':>11} | {'ratio':>7} | met"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        met = "—" if r["met"] is None else ("MET" if r["met"] else "NOT MET")
        print(f"{label(r['entities']):>9} | {r['target']:58s} | {_fmt(r['measured'], '11.2f')} | "
              f"{_fmt(r['baseline'], '11.2f')} | {_fmt(r['ratio'], '7.3f')} | {met}")
        if r["note"]:
            print(f"{'':>9} |   {r['note']}")
    print("(met is judged only at the size each target names; other sizes are reported, '—')")


# --------------------------------------------------------------------------- #
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1e5,1e6,5e6", help="entities per KG, comma-separated")
    ap.add_argument("--questions", default="1e4,1e5,1e6", help="question counts, each a pipeline run per size")
    ap.add_argument("--quick", action="store_true", help="--sizes 1e5 --questions 1e4, small samples")
    ap.add_argument("--data-dir", default="/tmp/kale_scale")
    ap.add_argument("--work-dir", default=None, help="pipeline outputs and logs (default <data-dir>/runs)")
    ap.add_argument("--triples-per-entity", type=float, default=5.0)
    ap.add_argument("--relations", type=int, default=40)
    ap.add_argument("--alpha", type=float, default=0.8, help="Zipf exponent of the entity degree law")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sections", default="load,search,pipeline,scaling")
    ap.add_argument("--search-max-entities", type=num, default=1_000_000,
                    help="sizes above this get the load measurement only")
    ap.add_argument("--search-sample", type=num, default=2000, help="rows for the bare search")
    ap.add_argument("--search-max-seconds", type=float, default=300, help="stop the bare search after this long")
    ap.add_argument("--pipeline-rows", type=num, default=0, help="cap each pipeline run at this many rows (max_rows; 0: all)")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--scaling-questions", type=num, default=0, help="question file for the scaling runs (default: the smallest)")
    ap.add_argument("--scaling-rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600, help="per subprocess (s)")
    ap.add_argument("--rss-limit-gb", type=float, default=8.0, help="kill a run whose driver + workers RSS pass this")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "synth_scale.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kg", help=argparse.SUPPRESS)
    ap.add_argument("--names", help=argparse.SUPPRESS)
    ap.add_argument("--qa", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--sample", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--max-seconds", type=float, default=1e9, help=argparse.SUPPRESS)
    ap.add_argument("--num-cpus", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--force-load-kg", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra SynthConfig overrides (key.sub=value), e.g. paths.heuristic=bidirectional")
    args = ap.parse_args(argv)
    if args.child:
        {"load": child_load, "search": child_search, "pipeline": child_pipeline}[args.child](args)
        return 0
    if args.quick:
        args.sizes, args.questions = "1e5", "1e4"
        args.search_sample = min(args.search_sample, 500)
    sizes, q_counts = nums(args.sizes), sorted(nums(args.questions))
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    sections = set(args.sections.split(","))
    scaling_q = args.scaling_questions or q_counts[0]
    work_root = Path(args.work_dir or Path(args.data_dir) / "runs")

    load = Load()
    t_start = time.perf_counter()
    from kale_ray.config import to_dict

    cfg = _synth_cfg(args.overrides)
    result: dict[str, Any] = {
        "benchmark": "synth_scale", "date": now(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(), "versions": versions("numpy", "pyarrow", "ray", "psutil"),
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "kg", "names", "qa", "cache_dir", "sample",
                                                                     "max_seconds", "num_cpus", "force_load_kg")},
        "synth_config_paths": to_dict(cfg)["paths"], "synth_config_kg": to_dict(cfg)["kg"],
        "columnar_loader_available": columnar_loader() is not None,
        "cpu_override_key": cpu_override_key(), "sizes": {},
    }
    print(f"synth scale bench: sizes {sizes}, questions {q_counts}, paths.heuristic={cfg.paths.heuristic}, "
          f"loader {'load_columnar_kg' if result['columnar_loader_available'] else 'load_kg + GraphIndex.from_kg'}, "
          f"{os.cpu_count()} cores, load {la1()}", flush=True)
    for n in sizes:
        t_size = time.perf_counter()
        heavy = n <= args.search_max_entities
        qs = q_counts if heavy else []
        if heavy and "scaling" in sections and scaling_q not in qs:
            qs = sorted(set(qs) | {scaling_q})
        print(f"\n== {label(n)} entities ==", flush=True)
        load.mark(f"{label(n)}:data")
        info = ensure_data(args, n, qs if ("search" in sections or "pipeline" in sections or "scaling" in sections) else [])
        print(f"  data: {info['triples']} triples, {info['dir']} (generated {info['generated'] or 'nothing'}; "
              f"{_fmt(info.get('generate_s'), '.1f')} s)", flush=True)
        work = work_root / Path(info["dir"]).name
        rec: dict[str, Any] = {"entities": n, "triples": info["triples"], "data": info}
        if "load" in sections:
            load.mark(f"{label(n)}:load")
            rec["load"] = measure_load(args, n, info, work)
        if heavy and "search" in sections:
            load.mark(f"{label(n)}:search")
            rec["bare_search"] = measure_search(args, n, info, q_counts[0], work)
        if heavy and "pipeline" in sections:
            rec["pipeline"] = {}
            for q in q_counts:
                load.mark(f"{label(n)}:pipeline:{label(q)}")
                rec["pipeline"][str(q)] = measure_pipeline(args, n, info, q, work)
        if heavy and "scaling" in sections and len(args.workers) >= 2:
            load.mark(f"{label(n)}:scaling")
            rec["scaling"] = measure_scaling(args, n, info, scaling_q, work)
        if not heavy:
            rec["skipped"] = (f"search / pipeline / scaling not run above --search-max-entities "
                              f"{label(args.search_max_entities)}")
        rec["seconds"] = time.perf_counter() - t_size
        print(f"  ({label(n)} entities took {rec['seconds']:.0f} s)", flush=True)
        result["sizes"][str(n)] = rec
        result["targets"] = targets(result["sizes"])
        result["load"] = load.as_dict()
        load.samples.pop()  # as_dict() marked "end"; keep going
        result["seconds"] = time.perf_counter() - t_start
        write_result("synth_scale", result, out=args.out)  # after every size: a long run keeps what it has
    result["targets"] = targets(result["sizes"])
    print_table(result["targets"])
    result["load"] = load.as_dict()
    result["seconds"] = time.perf_counter() - t_start
    path = write_result("synth_scale", result, out=args.out)
    print(f"\nwrote {path} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
