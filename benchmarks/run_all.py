"""Run every benchmark, then regenerate benchmarks/README.md from benchmarks/results/*.json.

    python benchmarks/run_all.py            # full runs (tens of minutes on 2 cores)
    python benchmarks/run_all.py --quick    # smoke-size runs
    python benchmarks/run_all.py --table    # only rebuild the README table from existing results
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCRIPTS = ["bench_paths.py", "bench_ka_loss.py", "bench_generation.py"]


def _get(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def table() -> str:
    rows = ["| benchmark | result file | headline | target |", "|---|---|---|---|"]
    for f in sorted(RESULTS.glob("*.json")):
        data = json.loads(f.read_text())
        if f.name == "paths.json":
            ours = _get(data, "ours") or {}
            headline = json.dumps({k: v for k, v in ours.items() if "ratio" in k or "paths_per_s" in k}, default=str)[:300]
            rows.append(f"| KG path search vs networkx (HPO) | `{f.name}` | {headline} | >= 20x networkx |")
        elif f.name == "ka_loss.json":
            full = data.get("full") or data.get("quick") or {}
            ratios = json.dumps(_get(full, "ratios_project_over_naive"), default=str)[:300]
            rows.append(f"| KA loss vs naive full-vocab two-pass | `{f.name}` | {ratios} | loss peak memory <= 0.5x naive at equal step time |")
        else:
            rows.append(f"| {data.get('benchmark', f.stem)} | `{f.name}` | {json.dumps(data.get('ratios', data.get('summary', '')), default=str)[:300]} | {data.get('target', '')} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    failed = []
    if not args.table:
        for s in SCRIPTS:
            cmd = [sys.executable, str(HERE / s)] + (["--quick"] if args.quick else [])
            print("$", " ".join(cmd), flush=True)
            if subprocess.call(cmd) != 0:
                failed.append(s)
    text = (HERE / "README.header.md").read_text() if (HERE / "README.header.md").exists() else "# Benchmarks\n"
    (HERE / "README.md").write_text(text + "\n## Latest results\n\n" + table() + "\n")
    print((HERE / "README.md").read_text())
    if failed:
        print("failed:", failed, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
