"""What every benchmark result records about how it was obtained: machine, versions, load.

``machine()`` and ``versions(...)`` are JSON-ready dicts; ``Load`` samples ``os.getloadavg()``
before and after a measurement (on a shared 2-core machine a timing taken while another heavy
job runs measures that job too, so every result says what the load was).
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
        info["cpu_model"] = name
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
    except (OSError, StopIteration):
        pass
    return info


def versions(*modules: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for m in modules:
        try:
            out[m] = getattr(importlib.import_module(m), "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing optional module is recorded as None
            out[m] = None
    return out


class Load:
    """``os.getloadavg()`` at the start, at named points, and at the end of a benchmark."""

    def __init__(self) -> None:
        self.samples: list[dict[str, Any]] = [{"at": "start", "time": now(), "loadavg": list(os.getloadavg())}]

    def mark(self, at: str) -> list[float]:
        la = list(os.getloadavg())
        self.samples.append({"at": at, "time": now(), "loadavg": la})
        return la

    def as_dict(self) -> dict[str, Any]:
        self.mark("end")
        one = [s["loadavg"][0] for s in self.samples]
        return {"samples": self.samples, "loadavg_1min_max": max(one), "loadavg_1min_min": min(one),
                "note": "os.getloadavg() on a 2-core machine shared with other jobs; above ~2 the timings "
                        "include contention from other processes"}


def write_result(name: str, result: dict[str, Any], key: str | None = None, out: str | Path | None = None) -> Path:
    """Write ``results/<name>.json``; with ``key``, keep other keys of an existing file (quick vs full runs)."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if key is None:
        doc = result
    else:
        doc = {}
        if path.exists():
            try:
                doc = json.loads(path.read_text())
            except json.JSONDecodeError:
                doc = {}
        doc[key] = result
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path
