"""benchmarks/gpu_check.sh on this CPU machine: its argument parsing and its dry run (plan + the
loss checks on the CPU). The GPU run itself needs a lent CUDA machine (see the README)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sh(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args, "--python", sys.executable], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_parse_args_defaults_and_checks(gc, monkeypatch, tmp_path):
    monkeypatch.delenv("OUT", raising=False)
    a = gc.parse_args([])
    assert a.checks == ["losses", "zero2", "zero3", "bench"] and a.device == "cuda" and not a.dry_run
    assert a.out.endswith("benchmarks/results/gpu_check.json")
    a = gc.parse_args(["--dry-run", "--checks", "bench,losses", "--out", str(tmp_path / "r.json")])
    assert a.device == "cpu" and a.checks == ["losses", "bench"] and a.out == str(tmp_path / "r.json")
    assert gc.parse_args(["--checks", "all"]).checks == list(gc.CHECKS)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gc.parse_args([]).out == str(tmp_path / "gpu_check.json")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown check"):
        gc.parse_checks("losses,zero4")
    with pytest.raises(SystemExit) as e:
        gc.parse_args(["--checks", "nope"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        gc.parse_args(["--bench-repeats", "0"])


def test_shell_arguments():
    r = _sh("--help")
    assert r.returncode == 0 and "--dry-run" in r.stdout and "--out" in r.stdout
    r = _sh("--bogus")
    assert r.returncode == 2 and "unknown argument '--bogus'" in r.stderr
    r = _sh("--timeout", "soon")
    assert r.returncode == 2 and "--timeout" in r.stderr
    r = _sh("--dry-run", "--checks", "zero9")
    assert r.returncode == 2 and "unknown check" in r.stderr


def test_dry_run_plans_and_runs_the_loss_checks_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = _sh("--dry-run", "--out", str(out), "--wheels", str(tmp_path / "no-wheels"), "--work", str(tmp_path / "w"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dry run ok" in r.stdout and "no-wheels (MISSING" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["dry_run"] is True and doc["device"] == "cpu" and doc["finished"] is True and doc["ok"] is True
    assert set(doc["plan"]["checks"]) == {"losses", "zero2", "zero3", "bench"}
    assert all(c["status"] in ("ready", "blocked") for c in doc["plan"]["checks"].values())
    assert doc["plan"]["checks"]["losses"]["status"] == "ready"
    assert doc["plan"]["wheels"]["present"] is False
    losses = doc["results"]["losses"]
    assert losses["ok"] and losses["device"] == "cpu" and losses["n"] > 80 and not losses["failed"]
    assert losses["heavy_imports"] == []  # the loss code needs neither Ray, vLLM nor DeepSpeed
    names = {rec["name"] for rec in losses["records"]}
    assert {"golden ka_loss lam=0.5", "golden dpo sigmoid", "golden info_nce symmetric"} <= names
    assert {rec["dtype"] for rec in losses["records"]} == {"float32", "bfloat16"}
    assert set(doc["results"]) == {"losses"}  # the GPU checks do not run in a dry run


def test_unpack_wheels_picks_the_wheel_for_this_python(gc, tmp_path):
    wheels = tmp_path / "w"
    wheels.mkdir()
    for tag, marker in (("py3-none-any", "pure"), ("cp27-cp27m-manylinux1_x86_64", "old")):
        with zipfile.ZipFile(wheels / f"fake_pkg-1.0-{tag}.whl", "w") as z:
            z.writestr("fake_pkg/__init__.py", f"KIND = {marker!r}\n")
    done = gc.unpack_wheels(wheels, tmp_path / "site", ["fake-pkg"])
    assert done == ["fake_pkg-1.0-py3-none-any.whl"]
    assert "pure" in (tmp_path / "site" / "fake_pkg" / "__init__.py").read_text()
    with pytest.raises(FileNotFoundError, match="no wheel of missing"):
        gc.unpack_wheels(wheels, tmp_path / "site", ["missing"])
    assert set(gc.missing_wheel_dists()) <= {d for _, d in gc.WHEEL_DEPS} | set(gc.PYDANTIC)
