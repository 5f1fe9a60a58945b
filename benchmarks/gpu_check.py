"""GPU check: the project's GPU paths in one command on a lent CUDA machine (``benchmarks/gpu_check.sh``).

The lent machine has Python, torch (CUDA), transformers and peft, but no Ray, no vLLM, no
DeepSpeed and no package registry. ``benchmarks/fetch_gpu_wheels.sh`` (run beforehand on a
machine with a registry) puts DeepSpeed, its pure-Python dependencies and the tiny test Llama's
tokenizer into ``benchmarks/.gpu_wheels``; ``gpu_check.sh`` installs them into a scratch folder
and runs this driver. Checks (``--checks``, default all):

* ``losses``: KALE's KA loss (CE + KL, both directions, temperature), DPO (sigmoid, IPO, cDPO,
  sequence log-probs) and InfoNCE (KaLM, with false-negative masks, plus KaLM's pooling and
  masks) on ``--device`` with fp32 and bf16 inputs: golden values from the unit tests, losses
  and gradients against an fp64 CPU reference of the same (dtype-rounded) inputs, stability
  with ``-inf`` logits and empty masks. Plain asserts, no pytest.
* ``zero2`` / ``zero3``: one subprocess each: the project's own engine builder and train step
  (:func:`kale_ray.train.loop._build_engine` / ``_train_step``, loss ``kale``) with LoRA, bf16,
  ZeRO stage 2 / 3, torch AdamW as the client optimizer (no fused op is built), nccl, world
  size 1, on the tiny test Llama generated with random weights from its tokenizer; two
  optimizer steps on the same batch (the loss must fall).
* ``bench``: the KA loss benchmark's two paths (``benchmarks/bench_ka_loss.py``: answer
  positions only vs full-vocabulary logits) on the GPU: step and loss-part times (CUDA
  synchronised), peak CUDA memory, agreement of losses and gradients; fp32 and bf16 weights.

All results go to one JSON file (``--out``), rewritten after every check so a partial run
still leaves its results. ``--dry-run`` (any machine, no CUDA): parses the arguments, checks the
plan (files, wheel folder, what each check needs), runs the loss checks on the CPU, exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ("losses", "zero2", "zero3", "bench")
DEFAULT_WHEELS = ROOT / "benchmarks" / ".gpu_wheels"
# What DeepSpeed imports that torch / transformers / peft do not bring: (module, distribution).
WHEEL_DEPS = (("deepspeed", "deepspeed"), ("hjson", "hjson"), ("cpuinfo", "py-cpuinfo"), ("einops", "einops"),
              ("msgpack", "msgpack"), ("ninja", "ninja"), ("pynvml", "nvidia-ml-py"))
PYDANTIC = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection")
# Present with torch / transformers / peft; not fetched.
BASE_MODULES = ("torch", "transformers", "peft", "numpy", "packaging", "psutil", "tqdm", "yaml", "safetensors")
NEEDED_FILES = {
    "losses": ("kale_ray/core/losses.py", "kale_ray/methods/kalm/losses.py", "tests/unit/test_losses.py",
               "tests/unit/test_kalm.py"),
    "zero2": ("kale_ray/train/loop.py", "kale_ray/train/heads.py", "kale_ray/train/registry.py",
              "kale_ray/models.py"),
    "zero3": ("kale_ray/train/loop.py", "kale_ray/train/heads.py", "kale_ray/train/registry.py",
              "kale_ray/models.py"),
    "bench": ("benchmarks/bench_ka_loss.py", "kale_ray/models.py"),
}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- arguments


def default_out() -> str:
    out_dir = os.environ.get("OUT")
    return str(Path(out_dir) / "gpu_check.json") if out_dir else str(ROOT / "benchmarks" / "results" / "gpu_check.json")


def parse_checks(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if names == ["all"]:
        return list(CHECKS)
    bad = [c for c in names if c not in CHECKS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown check(s) {bad or text!r}; choose from {', '.join(CHECKS)} or all")
    return [c for c in CHECKS if c in names]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="result JSON (default $OUT/gpu_check.json, else benchmarks/results/)")
    ap.add_argument("--dry-run", action="store_true", help="plan + loss checks on the CPU; no CUDA needed")
    ap.add_argument("--checks", type=parse_checks, default=list(CHECKS), help=f"comma list of {','.join(CHECKS)} or all")
    ap.add_argument("--device", default=None, help="torch device of the checks (default cuda; cpu in a dry run)")
    ap.add_argument("--wheels", default=str(DEFAULT_WHEELS), help="folder filled by fetch_gpu_wheels.sh")
    ap.add_argument("--work", default=None, help="scratch folder (model, caches; default $TMPDIR/kale_gpu_check)")
    ap.add_argument("--check-timeout", type=float, default=240.0, help="seconds for each ZeRO subprocess")
    ap.add_argument("--bench-repeats", type=int, default=10)
    ap.add_argument("--strict", action="store_true", help="dry run: exit 1 when a planned check is blocked")
    # internal: one ZeRO step in this process (gpu_check runs it as a subprocess)
    ap.add_argument("--zero-stage", type=int, choices=(2, 3), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--unpack-into", default=None, help=argparse.SUPPRESS)  # no pip: unzip the wheels
    ap.add_argument("dists", nargs="*", help=argparse.SUPPRESS)
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.out = args.out or default_out()
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    args.work = args.work or str(Path(os.environ.get("TMPDIR", "/tmp")) / "kale_gpu_check")
    if args.bench_repeats < 1:
        build_parser().error("--bench-repeats must be >= 1")
    return args


# --------------------------------------------------------------------------- plan


def module_version(module: str) -> str | None:
    import importlib.util

    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    dist = {"yaml": "pyyaml", "cpuinfo": "py-cpuinfo", "pynvml": "nvidia-ml-py"}.get(module, module)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def missing_wheel_dists() -> list[str]:
    """Distributions from the wheel folder that this Python lacks (what gpu_check.sh installs)."""
    missing = [dist for module, dist in WHEEL_DEPS if module_version(module) is None]
    v = module_version("pydantic")
    if v is None or not v.split(".")[0].isdigit() or int(v.split(".")[0]) < 2:
        missing.extend(PYDANTIC)
    return missing


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def unpack_wheels(wheels: Path, site: Path, dists: list[str]) -> list[str]:
    """No pip on the box: unzip the best-matching wheel of each distribution into ``site``.

    The same choice pip makes for ``--no-deps --target`` with these simple wheels (no scripts,
    no data files): the first of this interpreter's tags (``packaging.tags.sys_tags()``) that a
    wheel of that name carries. Returns the wheel files unpacked.
    """
    import zipfile

    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    order = {tag: i for i, tag in enumerate(sys_tags())}
    site.mkdir(parents=True, exist_ok=True)
    done = []
    for dist in dists:
        best = None
        for whl in wheels.glob("*.whl"):
            name, _version, _build, tags = parse_wheel_filename(whl.name)
            if _norm(name) != _norm(dist):
                continue
            rank = min((order[t] for t in tags if t in order), default=None)
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, whl)
        if best is None:
            raise FileNotFoundError(f"no wheel of {dist} for this Python in {wheels}")
        with zipfile.ZipFile(best[1]) as z:
            z.extractall(site)
        done.append(best[1].name)
    return done


def tokenizer_dir(wheels: Path) -> Path | None:
    """The tiny Llama's tokenizer: carried in the wheel folder, else the local builtin model."""
    carried = wheels / "tokenizer"
    if (carried / "tokenizer.json").exists():
        return carried
    cache = Path(os.path.expanduser(os.environ.get("KALE_RAY_CACHE", "~/.cache/kale_ray")))
    local = cache / "models" / "tiny-llama-h128"
    return local if (local / "tokenizer.json").exists() else None


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
    wheels = Path(args.wheels)
    wheel_files = sorted(p.name for p in wheels.glob("*.whl")) if wheels.is_dir() else []
    wheel_bytes = sum(p.stat().st_size for p in wheels.rglob("*") if p.is_file()) if wheels.is_dir() else 0
    missing = missing_wheel_dists()
    ds_wheel = any(f.startswith("deepspeed-") for f in wheel_files)
    deepspeed_ok = module_version("deepspeed") is not None or ds_wheel
    tok = tokenizer_dir(wheels)
    base = {m: module_version(m) for m in BASE_MODULES}
    checks: dict[str, Any] = {}
    for name in CHECKS:
        files = {f: (ROOT / f).exists() for f in NEEDED_FILES[name]}
        blocked = [f"missing file {f}" for f, ok in files.items() if not ok]
        if base["torch"] is None:
            blocked.append("torch not importable")
        if name in ("zero2", "zero3"):
            if not deepspeed_ok:
                blocked.append(f"deepspeed neither importable nor in {wheels} (run benchmarks/fetch_gpu_wheels.sh)")
            for m in ("transformers", "peft"):
                if base[m] is None:
                    blocked.append(f"{m} not importable")
        if name in ("zero2", "zero3", "bench") and tok is None:
            blocked.append(f"no tiny-llama tokenizer in {wheels}/tokenizer (run benchmarks/fetch_gpu_wheels.sh)")
        checks[name] = {"selected": name in args.checks, "files": files,
                        "status": "ready" if not blocked else "blocked", "blocked_by": blocked}
    return {
        "checks": checks,
        "wheels": {"folder": str(wheels), "present": wheels.is_dir(), "files": wheel_files,
                   "total_bytes": wheel_bytes, "deepspeed_wheel": ds_wheel,
                   "tokenizer": str(tok) if tok else None},
        "to_install": missing,
        "modules": base | {"deepspeed": module_version("deepspeed")},
    }


def print_plan(plan: dict[str, Any], device: str, dry_run: bool) -> None:
    print(f"[gpu_check] {'dry run: ' if dry_run else ''}device {device}")
    w = plan["wheels"]
    print(f"[gpu_check] wheels: {w['folder']} ({'present' if w['present'] else 'MISSING'}, "
          f"{len(w['files'])} wheels, {w['total_bytes'] / 2**20:.1f} MiB, tokenizer {w['tokenizer']})")
    print(f"[gpu_check] to install from the wheel folder: {', '.join(plan['to_install']) or 'nothing'}")
    for name, c in plan["checks"].items():
        what = ("would run" if dry_run else "runs") if c["selected"] else "skipped"
        extra = "" if c["status"] == "ready" else " -- blocked: " + "; ".join(c["blocked_by"])
        if dry_run and name != "losses" and c["selected"]:
            what += " on the GPU only"
        print(f"[gpu_check]   {name:7s} {what}, {c['status']}{extra}")


# --------------------------------------------------------------------------- results file


class Results:
    def __init__(self, path: str, header: dict[str, Any]):
        self.path = Path(path)
        self.doc: dict[str, Any] = dict(header, results={})
        self.t0 = time.perf_counter()

    def put(self, name: str, value: dict[str, Any]) -> None:
        self.doc["results"][name] = value
        self.write()

    def write(self, final: bool = False) -> None:
        res = self.doc["results"]
        self.doc["ok"] = bool(res) and all(r.get("ok") for r in res.values())
        self.doc["wall_s"] = round(time.perf_counter() - self.t0, 2)
        self.doc["finished"] = final
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str) + "\n")
        tmp.replace(self.path)


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": sys.version.split()[0],
                            "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}", gpu_count=torch.cuda.device_count(),
                    bf16_supported=torch.cuda.is_bf16_supported())
        with contextlib.suppress(Exception):
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return info


# --------------------------------------------------------------------------- (a) loss checks


class LossChecks:
    """Records of ``name, dtype, value(s), reference, max_abs_diff, tol, ok``; never raises on a mismatch."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.records: list[dict[str, Any]] = []

    def gen(self, seed: int):
        return self.torch.Generator().manual_seed(seed)

    def randn(self, *shape, seed: int, scale: float = 3.0):
        return self.torch.randn(*shape, generator=self.gen(seed), dtype=self.torch.float64) * scale

    def record(self, name: str, dtype: str, ok: bool, **info: Any) -> None:
        self.records.append({"name": name, "dtype": dtype, "ok": bool(ok), **info})

    def close(self, name: str, dtype: str, got, ref, rtol: float, atol: float) -> None:
        """``|got - ref| <= atol + rtol * |ref|`` elementwise (both moved to fp64 CPU)."""
        torch = self.torch
        g = got.detach().to("cpu", torch.float64)
        r = ref.detach().to("cpu", torch.float64)
        if g.shape != r.shape:
            self.record(name, dtype, False, error=f"shape {tuple(g.shape)} vs {tuple(r.shape)}")
            return
        finite = bool(torch.isfinite(g).all())
        diff = (g - r).abs()
        ok = finite and bool((diff <= atol + rtol * r.abs()).all())
        self.record(name, dtype, ok, max_abs_diff=float(diff.max()) if diff.numel() else 0.0,
                    max_abs_ref=float(r.abs().max()) if r.numel() else 0.0, rtol=rtol, atol=atol, finite=finite)

    def flag(self, name: str, dtype: str, cond: bool, **info: Any) -> None:
        self.record(name, dtype, cond, **info)

    # -- helpers
    def on(self, x, dtype):
        """``x`` (fp64 CPU) rounded to ``dtype`` and put on the device, as a leaf."""
        return x.to(dtype).to(self.device).detach().requires_grad_(x.is_floating_point())

    def ref(self, x, dtype):
        """The same rounded values in fp64 on the CPU (the reference computation's input)."""
        return x.to(dtype).to(self.torch.float64).detach().requires_grad_(x.is_floating_point())

    def tols(self, dtype) -> dict[str, float]:
        # Losses are computed in fp32 whatever the input: fp32 rounding vs fp64. Gradients come
        # back in the input dtype: bf16 has 8 bits of mantissa (relative error ~ 2^-8).
        if dtype == self.torch.bfloat16:
            return {"loss_rtol": 2e-5, "loss_atol": 2e-5, "grad_rtol": 1.6e-2, "grad_atol_frac": 1e-2}
        return {"loss_rtol": 2e-5, "loss_atol": 2e-5, "grad_rtol": 1e-4, "grad_atol_frac": 1e-5}

    def grads_close(self, name, dname, got, ref, t) -> None:
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        self.close(name, dname, got, ref, t["grad_rtol"], t["grad_atol_frac"] * scale + 1e-12)

    # -- the checks
    def run(self) -> dict[str, Any]:
        torch = self.torch
        t0 = time.perf_counter()
        from kale_ray.core import losses as L
        from kale_ray.methods.kalm import losses as K

        self.heavy_imports = sorted(m for m in ("ray", "vllm", "deepspeed") if m in sys.modules)
        self.goldens(L)
        for dtype in (torch.float32, torch.bfloat16):
            dname = str(dtype).replace("torch.", "")
            self.ka(L, dtype, dname)
            self.dpo(L, dtype, dname)
            self.nce(L, K, dtype, dname)
            self.stability(L, dtype, dname)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        ok = all(r["ok"] for r in self.records) and not self.heavy_imports
        failed = [f"{r['name']} [{r['dtype']}]" for r in self.records if not r["ok"]]
        return {"ok": ok, "device": str(self.device), "n": len(self.records), "failed": failed,
                "heavy_imports": self.heavy_imports, "seconds": round(time.perf_counter() - t0, 3),
                "records": self.records}

    def goldens(self, L) -> None:
        """The unit tests' hand-worked values, computed on the device (fp32)."""
        torch, d = self.torch, self.device
        ln4 = math.log(4.0)
        s = torch.tensor([[ln4, 0.0]], device=d)
        t = torch.tensor([[0.0, 0.0]], device=d)
        cases = [
            ("golden token_kl forward", L.token_kl(s, t), [0.2231435513]),
            ("golden token_kl reverse", L.token_kl(s, t, direction="reverse"), [0.1927447570]),
            ("golden token_kl T=2", L.token_kl(torch.tensor([[2 * ln4, 0.0]], device=d), t, temperature=2.0),
             [0.8925742052]),
            ("golden token_cross_entropy", L.token_cross_entropy(
                torch.tensor([[1.0, 2.0, 3.0]] * 2, device=d), torch.tensor([2, -100], device=d)),
             [0.4076059644, 0.0]),
            ("golden ka_loss lam=0.5", L.ka_loss(s, t, torch.tensor([0], device=d), lam=0.5)[0], 0.3347153270),
        ]
        pc = torch.tensor([-5.0, 5.0, 10.0], device=d)
        rc = torch.tensor([-5.0, -5.0, -10.0], device=d)
        pr = torch.tensor([-7.0, -3.0, -1.0], device=d)
        z3, z1 = torch.zeros(3, device=d), torch.zeros(1, device=d)
        cases += [
            ("golden dpo sigmoid", L.dpo_loss(pc, pr, rc, pr.clone(), beta=0.1)[0],
             [0.6931471806, 0.3132616875, 0.1269280110]),
            ("golden dpo ipo", L.dpo_loss(torch.tensor([0.0, 1.0, 3.0], device=d), z3, z3, z3, beta=0.5,
                                          loss_type="ipo")[0], [1.0, 0.0, 4.0]),
            ("golden dpo label smoothing", L.dpo_loss(torch.tensor([10.0], device=d), z1, z1, z1, beta=0.1,
                                                      label_smoothing=0.1)[0], [0.4132616875]),
        ]
        q = torch.eye(3, device=d)
        k = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], device=d)
        cases += [
            ("golden info_nce rows", L.info_nce(q, k, tau=1.0, margin=0.0, symmetric=False), 0.6348862703),
            ("golden info_nce symmetric", L.info_nce(q, k, tau=1.0, margin=0.0), 0.6377454924),
            ("golden info_nce margin", L.info_nce(torch.eye(2, device=d), torch.eye(2, device=d), tau=0.5,
                                                  margin=0.5), 0.3132616875),
        ]
        for name, got, want in cases:
            self.close(name, "float32", got, torch.tensor(want, dtype=torch.float64), 1.3e-6, 1e-5)

    def ka(self, L, dtype, dname) -> None:
        torch = self.torch
        t = self.tols(dtype)
        n, v = 48, 4099  # an odd vocabulary: no nice power-of-two reduction
        s0, t0 = self.randn(n, v, seed=1), self.randn(n, v, seed=2)
        targets = torch.randint(0, v, (n,), generator=self.gen(3))
        targets[::7] = L.IGNORE_INDEX
        for direction, temp, lam in (("forward", 1.0, 1.0), ("reverse", 2.0, 0.5), ("forward", 0.7, 0.0)):
            tag = f"ka_loss {direction} T={temp} lam={lam}"
            sd, td = self.on(s0, dtype), self.on(t0, dtype)
            loss, parts = L.ka_loss(sd, td, targets.to(self.device), lam=lam, temperature=temp, direction=direction,
                                    stop_gradient_teacher=False)
            loss.backward()
            sr, tr = self.ref(s0, dtype), self.ref(t0, dtype)
            loss_r, parts_r = L.ka_loss(sr, tr, targets, lam=lam, temperature=temp, direction=direction,
                                        stop_gradient_teacher=False)
            loss_r.backward()
            self.close(tag + " loss", dname, loss, loss_r, t["loss_rtol"], t["loss_atol"])
            self.close(tag + " ce", dname, parts["ce"], parts_r["ce"], t["loss_rtol"], t["loss_atol"])
            self.close(tag + " kl", dname, parts["kl"], parts_r["kl"], t["loss_rtol"], t["loss_atol"])
            self.flag(tag + " fp32 result", dname, loss.dtype == torch.float32, got=str(loss.dtype))
            self.grads_close(tag + " grad student", dname, sd.grad, sr.grad, t)
            if lam > 0:
                self.grads_close(tag + " grad teacher", dname, td.grad, tr.grad, t)
        # sharding: two halves with the global count add up to the whole
        sd = self.on(s0, dtype)
        tgt = targets.to(self.device)
        whole, _ = L.ka_loss(sd, self.on(t0, dtype), tgt)
        count = int((targets != L.IGNORE_INDEX).sum())
        halves = sum(L.ka_loss(sd[a:b], self.on(t0, dtype)[a:b], tgt[a:b], global_count=count)[0]
                     for a, b in ((0, 19), (19, n)))
        self.close("ka_loss sharding invariance", dname, halves, whole.to("cpu", torch.float64), 1e-5, 1e-5)

    def dpo(self, L, dtype, dname) -> None:
        torch = self.torch
        t = self.tols(dtype)
        b, seq, v = 4, 23, 1031
        labels = torch.randint(0, v, (b, seq), generator=self.gen(11))
        labels[:, :9] = L.IGNORE_INDEX
        labels[1, 15:] = L.IGNORE_INDEX
        logps = {}
        for name, seed in (("pc", 12), ("pr", 13)):
            x = self.randn(b, seq, v, seed=seed, scale=2.0)
            xd, xr = self.on(x, dtype), self.ref(x, dtype)
            got = L.sequence_logprobs(xd, labels.to(self.device))
            want = L.sequence_logprobs(xr, labels)
            self.close(f"sequence_logprobs {name}", dname, got, want, 1e-5, 1e-4)
            avg = L.sequence_logprobs(xd, labels.to(self.device), average=True)
            self.close(f"sequence_logprobs {name} average", dname, avg,
                       L.sequence_logprobs(xr, labels, average=True), 1e-5, 1e-4)
            logps[name] = (xd, xr, got, want)
        rc, rr = self.randn(b, seed=14, scale=20.0) - 60, self.randn(b, seed=15, scale=20.0) - 60
        for loss_type, beta, eps in (("sigmoid", 0.1, 0.0), ("sigmoid", 0.3, 0.1), ("ipo", 0.5, 0.0)):
            tag = f"dpo {loss_type} beta={beta} eps={eps}"
            for x in ("pc", "pr"):
                for leaf in logps[x][:2]:
                    leaf.grad = None
            pcd, pcr = logps["pc"][2], logps["pc"][3]
            prd, prr = logps["pr"][2], logps["pr"][3]
            losses, cr, rj = L.dpo_loss(pcd, prd, rc.to(self.device, torch.float32), rr.to(self.device, torch.float32),
                                        beta=beta, loss_type=loss_type, label_smoothing=eps)
            losses.sum().backward(retain_graph=True)
            losses_r, cr_r, rj_r = L.dpo_loss(pcr, prr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
            losses_r.sum().backward(retain_graph=True)
            # the log-probs sum ~15 tokens: loosen the absolute part a little
            self.close(tag + " losses", dname, losses, losses_r, 1e-4, 1e-3)
            self.close(tag + " rewards", dname, torch.stack([cr, rj]), torch.stack([cr_r, rj_r]), 1e-4, 1e-3)
            self.grads_close(tag + " grad logits chosen", dname, logps["pc"][0].grad, logps["pc"][1].grad, t)

    def nce(self, L, K, dtype, dname) -> None:
        torch = self.torch
        t = self.tols(dtype)
        b, dim = 16, 96
        q0, k0 = self.randn(b, dim, seed=21, scale=1.0), self.randn(b, dim, seed=22, scale=1.0)
        tails = torch.randint(0, 6, (b,), generator=self.gen(23))
        known = torch.randint(-1, 6, (b, 3), generator=self.gen(24))
        mask_ref = K.false_negative_mask(tails, known)
        mask = K.false_negative_mask(tails.to(self.device), known.to(self.device))
        self.flag("kalm false_negative_mask device == cpu", dname, bool(torch.equal(mask.cpu(), mask_ref)))
        for symmetric, use_mask in ((True, True), (False, True), (True, False)):
            tag = f"info_nce symmetric={symmetric} mask={use_mask}"
            qd, kd = self.on(q0, dtype), self.on(k0, dtype)
            qr, kr = self.ref(q0, dtype), self.ref(k0, dtype)
            got = L.info_nce(qd, kd, tau=0.05, margin=0.02, false_negative_mask=mask if use_mask else None,
                             symmetric=symmetric)
            want = L.info_nce(qr, kr, tau=0.05, margin=0.02, false_negative_mask=mask_ref if use_mask else None,
                              symmetric=symmetric)
            got.backward()
            want.backward()
            # tau = 0.05 multiplies the fp32 rounding of the cosines by 20
            self.close(tag + " loss", dname, got, want, 1e-4, 1e-4)
            self.grads_close(tag + " grad query", dname, qd.grad, qr.grad, t)
            self.grads_close(tag + " grad keys", dname, kd.grad, kr.grad, t)
        # KaLM's pieces: exp_loss_sum (the sum form), last-token pooling, per-row means
        qd, kd = self.on(q0, dtype), self.on(k0, dtype)
        got = K.exp_loss_sum(qd, kd, mask, 0.05, 0.02, True)
        want = K.exp_loss_sum(self.ref(q0, dtype), self.ref(k0, dtype), mask_ref, 0.05, 0.02, True)
        self.close("kalm exp_loss_sum", dname, got, want, 1e-4, 1e-3)
        hidden = self.randn(3, 5, 4, seed=25, scale=1.0)
        am = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        pooled = K.last_token_pool(hidden.to(dtype).to(self.device), am.to(self.device))
        self.close("kalm last_token_pool", dname, pooled, K.last_token_pool(hidden.to(dtype).double(), am), 0, 0)
        vals = self.randn(10, seed=26, scale=1.0)
        rows = torch.tensor([0, 0, 1, 1, 1, 3, 3, 3, 3, 0])
        self.close("kalm per_row_mean", dname, K.per_row_mean(vals.to(dtype).to(self.device).float(),
                                                              rows.to(self.device), 5),
                   K.per_row_mean(vals.to(dtype).double(), rows, 5), 1e-6, 1e-6)

    def stability(self, L, dtype, dname) -> None:
        torch, d = self.torch, self.device
        ninf = float("-inf")
        s = torch.tensor([[0.0, 1.0, ninf], [1e4, -1e4, 0.0], [ninf, 0.0, 0.0]], dtype=dtype, device=d,
                         requires_grad=True)
        te = torch.tensor([[0.5, ninf, ninf], [-1e4, 1e4, 0.0], [ninf, 0.0, 0.0]], dtype=dtype, device=d,
                          requires_grad=True)
        kl = L.token_kl(s, te)
        kl.sum().backward()
        self.flag("token_kl -inf/large logits finite (forward)", dname,
                  bool(torch.isfinite(kl).all() and torch.isfinite(s.grad).all() and torch.isfinite(te.grad).all()),
                  kl=kl.detach().cpu().tolist())
        big = 2 * float(torch.tensor(1e4, dtype=dtype))  # KL of row 1 = 2a, a = 1e4 rounded to the dtype
        self.flag("token_kl large logits ~2e4", dname, abs(float(kl[1].detach()) - big) <= big * 1e-4,
                  got=float(kl[1].detach()), want=big)
        rev = L.token_kl(s.detach(), te.detach(), direction="reverse")
        self.flag("token_kl reverse: inf where due, never NaN", dname,
                  bool(math.isinf(float(rev[0])) and not torch.isnan(rev).any()))
        x = torch.zeros(4, 7, dtype=dtype, device=d, requires_grad=True)
        loss, parts = L.ka_loss(x, x.detach(), torch.full((4,), L.IGNORE_INDEX, device=d))
        loss.backward()
        self.flag("ka_loss all targets ignored -> 0 with zero grad", dname,
                  float(loss) == 0.0 and bool((x.grad == 0).all()) and not torch.isnan(x.grad).any())


def run_losses(device: str) -> dict[str, Any]:
    try:
        return LossChecks(device).run()
    except Exception as e:  # noqa: BLE001 - a crash is a failed check with its message
        import traceback

        return {"ok": False, "device": device, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


# --------------------------------------------------------------------------- (b) ZeRO steps


def make_model(work: Path, wheels: Path) -> str:
    """The tiny test Llama (``builtin:tiny-llama``'s shape, random weights) from the carried tokenizer."""
    from kale_ray.models import make_tiny_llama

    tok = tokenizer_dir(wheels)
    if tok is None:
        raise FileNotFoundError(f"no tiny-llama tokenizer in {wheels}/tokenizer; run benchmarks/fetch_gpu_wheels.sh")
    dest = work / "tiny-llama-h128"
    if not (dest / ".complete").exists():
        make_tiny_llama(dest, tok)
    return str(dest)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def zero_rows(n: int = 8) -> list[dict[str, str]]:
    drugs = ["aspirin", "metformin", "insulin", "warfarin", "ibuprofen", "heparin", "statin", "penicillin"]
    return [{"id": f"row{i}",
             "prompt": f"Question: which condition does {drugs[i % 8]} treat? Answer:",
             "teacher_prompt": f"Knowledge: {drugs[i % 8]} treats condition {i}. "
                               f"Question: which condition does {drugs[i % 8]} treat? Answer:",
             "completion": f" condition {i}, according to the graph."} for i in range(n)]


def zero_step(stage: int, device: str, model_path: str, steps: int = 2) -> dict[str, Any]:
    """In this process: build the project's DeepSpeed engine (LoRA, ZeRO ``stage``) and train ``steps`` steps."""
    import torch

    import deepspeed
    from kale_ray.config import KALETrainConfig
    from kale_ray.models import load_tokenizer
    from kale_ray.train import loop
    from kale_ray.train.registry import get_loss

    t0 = time.perf_counter()
    cuda = device.startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    if cuda:
        torch.cuda.set_device(0)
        torch.cuda.reset_peak_memory_stats()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    cfg = KALETrainConfig(loss="kale", use_gpu=cuda, zero_stage=stage, micro_batch_size=8, grad_accum=1, lr=1e-2,
                      warmup_steps=0, lr_schedule="constant", max_seq_len=96, max_steps=steps, seed=0)
    engine, _scheduler, dtype = loop._build_engine(cfg, model_path, steps, 1)
    spec = get_loss(cfg.loss)
    collator = spec.collator_factory(load_tokenizer(model_path), cfg)
    batch = collator(zero_rows(cfg.micro_batch_size))
    history = []
    for step in range(steps):
        s0 = time.perf_counter()
        totals = loop._train_step(engine, spec, cfg, [batch], 0, 1)
        if cuda:
            torch.cuda.synchronize()
        history.append(dict(totals, step=step, seconds=round(time.perf_counter() - s0, 4)))
    module = engine.module
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    lora_only = all("lora_" in n for n, p in module.named_parameters() if p.requires_grad)
    param_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in module.parameters()})
    losses = [h["loss"] for h in history]
    grad_norms = [h.get("grad_norm") for h in history]
    checks = {
        "backend": torch.distributed.get_backend() == backend,
        "zero_stage": engine.zero_optimization_stage() == stage,
        "dtype": (engine.bfloat16_enabled() and dtype == "bfloat16") if cuda else dtype == "float32",
        "on_device": engine.device.type == ("cuda" if cuda else "cpu"),
        "lora_only_trainable": lora_only and trainable > 0,
        "finite": all(math.isfinite(x) for x in losses) and all(g is None or math.isfinite(g) for g in grad_norms),
        "grad_norm_positive": all(g is not None and g > 0 for g in grad_norms),
        "loss_falls": len(losses) < 2 or losses[-1] < losses[0],
    }
    out = {
        "ok": all(checks.values()), "checks": checks, "stage": stage, "device": str(engine.device),
        "backend": torch.distributed.get_backend(), "world_size": torch.distributed.get_world_size(),
        "dtype": dtype, "param_dtypes": param_dtypes, "trainable_params": trainable,
        "optimizer": type(engine.optimizer).__name__,
        "client_optimizer": type(getattr(engine, "client_optimizer", None)).__name__,
        "deepspeed": deepspeed.__version__, "history": history,
        "batch": {k: list(v.shape) for k, v in batch.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if cuda:
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    with contextlib.suppress(Exception):
        engine.destroy()
    with contextlib.suppress(Exception):
        torch.distributed.destroy_process_group()
    return out


def run_zero_subprocess(stage: int, args: argparse.Namespace, model_path: str) -> dict[str, Any]:
    part = Path(args.work) / f"zero{stage}.json"
    part.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--zero-stage", str(stage), "--model-path", model_path,
           "--part-out", str(part), "--device", args.device, "--work", args.work, "--wheels", args.wheels]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.check_timeout)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    res: dict[str, Any] = json.loads(part.read_text()) if part.exists() else {"ok": False}
    res.update(returncode=rc, wall_s=round(time.perf_counter() - t0, 2))
    if rc != 0 or not res.get("ok"):
        res["stdout_tail"] = stdout[-4000:]
        res["stderr_tail"] = stderr[-6000:]
    return res


def zero_main(args: argparse.Namespace) -> int:
    try:
        res = zero_step(args.zero_stage, args.device, args.model_path)
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        res = {"ok": False, "stage": args.zero_stage, "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc()[-6000:]}
    Path(args.part_out).write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(json.dumps({k: res.get(k) for k in ("ok", "stage", "checks", "error")}, default=str))
    return 0 if res.get("ok") else 1


# --------------------------------------------------------------------------- (c) KA loss benchmark


BENCH_SHAPES = (dict(batch=8, teacher_prompt=200, student_prompt=80, answer=8),  # bench_ka_loss's defaults
                dict(batch=32, teacher_prompt=512, student_prompt=256, answer=16))


def run_bench(device: str, model_path: str, repeats: int, warmup: int = 2,
              shapes: tuple[dict[str, int], ...] = BENCH_SHAPES) -> dict[str, Any]:
    """bench_ka_loss's two paths on the device: CUDA-synchronised times, peak CUDA memory, agreement."""
    import statistics

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_ka_loss as B

    from kale_ray.models import load_causal_lm

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    runs, ok = [], True
    for dtype in ("float32", "bfloat16"):
        model = load_causal_lm(model_path, dtype=dtype).to(device)
        model.train()
        head, decoder = model.get_output_embeddings(), model.get_decoder()
        vocab = model.config.vocab_size
        for shape in shapes:
            batch = B.make_batch(vocab, shape["batch"], shape["teacher_prompt"], shape["student_prompt"],
                                 shape["answer"], seed=0)
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                h_s0 = decoder(input_ids=batch["s_ids"], attention_mask=batch["s_attn"]).last_hidden_state
                h_t0 = decoder(input_ids=batch["t_ids"], attention_mask=batch["t_attn"]).last_hidden_state
            losses, grads = {}, {}
            for variant in ("project", "naive"):
                model.zero_grad(set_to_none=True)
                h_s = h_s0.clone().requires_grad_()
                losses[variant] = B.loss_part(variant, h_s, h_t0, batch, head, 1.0, 1.0).item()
                grads[variant] = (h_s.grad.float().clone(), head.weight.grad.float().clone())
            agreement = {
                "loss_project": losses["project"], "loss_naive": losses["naive"],
                "loss_abs_diff": abs(losses["project"] - losses["naive"]),
                "grad_hidden_max_abs_diff": float((grads["project"][0] - grads["naive"][0]).abs().max()),
                "grad_head_max_abs_diff": float((grads["project"][1] - grads["naive"][1]).abs().max()),
            }
            tol = 1e-4 if dtype == "float32" else 3e-2
            agree_ok = math.isfinite(losses["project"]) and agreement["loss_abs_diff"] <= tol * max(1.0, abs(losses["naive"]))

            def run_step(variant):
                model.zero_grad(set_to_none=True)
                (B.step_project if variant == "project" else B.step_naive)(model, batch, 1.0, 1.0)
                sync()

            def run_loss(variant):
                model.zero_grad(set_to_none=True)
                B.loss_part(variant, h_s0.clone().requires_grad_(), h_t0, batch, head, 1.0, 1.0)
                sync()

            variants = ("project", "naive")
            step_t = B.timed_interleaved(run_step, variants, warmup, repeats)
            loss_t = B.timed_interleaved(run_loss, variants, warmup, repeats)
            res: dict[str, Any] = {}
            for variant in variants:
                peaks = {}
                for label, fn in (("loss_part", run_loss), ("step", run_step)):
                    model.zero_grad(set_to_none=True)
                    if cuda:
                        sync()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        fn(variant)
                        peaks[label] = torch.cuda.max_memory_allocated() - base
                    else:
                        peaks[label] = B.peak_bytes(lambda: fn(variant))
                res[variant] = {
                    "step_s_median": statistics.median(step_t[variant]), "step_s_min": min(step_t[variant]),
                    "loss_part_s_median": statistics.median(loss_t[variant]),
                    "loss_part_s_min": min(loss_t[variant]),
                    "loss_part_peak_mib": round(peaks["loss_part"] / 2**20, 2),
                    "step_peak_mib": round(peaks["step"] / 2**20, 2),
                }
            p, n = res["project"], res["naive"]
            ratios = {"step_time": p["step_s_median"] / n["step_s_median"],
                      "loss_part_time": p["loss_part_s_median"] / n["loss_part_s_median"],
                      "loss_part_peak_memory": p["loss_part_peak_mib"] / max(n["loss_part_peak_mib"], 1e-9),
                      "step_peak_memory": p["step_peak_mib"] / max(n["step_peak_mib"], 1e-9)}
            ok = ok and agree_ok
            runs.append({"dtype": dtype, **shape, "answer_tokens_N": int((batch["s_labels"][:, 1:] != -100).sum()),
                         "agreement": agreement, "agreement_ok": agree_ok, "results": res,
                         "ratios_project_over_naive": ratios})
            print(f"[gpu_check] bench {dtype} B={shape['batch']}: step {p['step_s_median'] * 1e3:.2f} vs "
                  f"{n['step_s_median'] * 1e3:.2f} ms, loss peak {p['loss_part_peak_mib']} vs "
                  f"{n['loss_part_peak_mib']} MiB", flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()
    return {"ok": ok, "device": device, "model": "builtin:tiny-llama shape, random weights", "repeats": repeats,
            "warmup": warmup, "measures": {"step_s": "forward (student grad, teacher no_grad) + loss + backward, "
                                           "torch.cuda.synchronize() inside the timed region",
                                           "peak_mib": "torch.cuda.max_memory_allocated() minus memory allocated "
                                                       "before the region"},
            "runs": runs}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.zero_stage is not None:
        return zero_main(args)
    if args.unpack_into:
        print("[gpu_check] unpacked " + ", ".join(unpack_wheels(Path(args.wheels), Path(args.unpack_into), args.dists)))
        return 0
    if args.dists:
        build_parser().error(f"unexpected arguments: {' '.join(args.dists)}")
    plan = make_plan(args)
    print_plan(plan, args.device, args.dry_run)
    import torch

    if not args.dry_run and args.device.startswith("cuda") and not torch.cuda.is_available():
        print("[gpu_check] CUDA is not available here: use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    header = {"check": "gpu_check", "date": now(), "dry_run": args.dry_run, "device": args.device,
              "checks": args.checks, "machine": machine_info(args.device), "plan": plan,
              "argv": sys.argv[1:] if argv is None else argv}
    results = Results(args.out, header)
    results.write()
    # losses: always (on the CPU in a dry run)
    if "losses" in args.checks:
        r = run_losses(args.device)
        results.put("losses", r)
        print(f"[gpu_check] losses on {args.device}: {'ok' if r['ok'] else 'FAILED'} "
              f"({r.get('n', 0)} checks, {r.get('seconds', '?')} s) {r.get('failed') or r.get('error') or ''}",
              flush=True)
    blocked = [c for c in args.checks if plan["checks"][c]["status"] != "ready"]
    if args.dry_run:
        results.write(final=True)
        ok = results.doc["results"].get("losses", {"ok": True})["ok"] and not (args.strict and blocked)
        print(f"[gpu_check] dry run {'ok' if ok else 'FAILED'}; wrote {args.out}")
        return 0 if ok else 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_path = None
    if any(c in args.checks for c in ("zero2", "zero3", "bench")):
        try:
            model_path = make_model(work, Path(args.wheels))
        except Exception as e:  # noqa: BLE001
            for c in ("zero2", "zero3", "bench"):
                if c in args.checks:
                    results.put(c, {"ok": False, "error": f"tiny llama: {type(e).__name__}: {e}"})
    for stage in (2, 3):
        if f"zero{stage}" in args.checks and model_path:
            r = run_zero_subprocess(stage, args, model_path)
            results.put(f"zero{stage}", r)
            print(f"[gpu_check] ZeRO-{stage}: {'ok' if r.get('ok') else 'FAILED'} {r.get('checks', '')} "
                  f"{r.get('error', '')} ({r['wall_s']} s)", flush=True)
    if "bench" in args.checks and model_path:
        try:
            r = run_bench(args.device, model_path, args.bench_repeats)
        except Exception as e:  # noqa: BLE001
            import traceback

            r = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-6000:]}
        results.put("bench", r)
        print(f"[gpu_check] bench: {'ok' if r['ok'] else 'FAILED'} {r.get('error', '')}", flush=True)
    results.write(final=True)
    print(f"[gpu_check] {'all ok' if results.doc['ok'] else 'FAILED'} in {results.doc['wall_s']} s; wrote {args.out}")
    return 0 if results.doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
