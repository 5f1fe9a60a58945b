"""Paths that follow the question (issue 11, item 3): does the first path take the question's own chain?

    python benchmarks/bench_question_paths.py                 # UMLS and Nations, 500 questions, seed 0
    python benchmarks/bench_question_paths.py --n 300 --seeds 0,1

In-process, no Ray (seconds): generates 2- and 3-hop questions (every question's relation chain is
in the KG by construction: it was walked), then runs synthesis's own ``link_and_search`` on each,
with the question's relations steering the search (``paths.follow_question_relations=true``, the
default) and, side by side on the same questions, the baseline that only re-ranks the shortest
paths (``false``). Per KG, hop count and mode it reports the share of questions whose first path

* **takes the chain**: its relation sequence is the question's, walked forward from the question
  entity (the same relations, order and directions; the nodes may differ where the KG has several
  instances of the chain);
* **mentions**: uses at least one relation the question names (what ``summary.json`` reports as
  ``first_path_follows_question`` in a synthesis run).

Target: >= 80% take the chain with the search steered. Writes benchmarks/results/question_paths.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import Load, machine, now, versions, write_result  # noqa: E402

OUT = HERE / "results" / "question_paths.json"
TARGET = 0.8


def first_path_steps(row: dict) -> list[tuple[str, bool]]:
    """(relation, walked head -> tail) of each hop of the first path, from the question entity."""
    if not row.get("paths"):
        return []
    cur, out = row["question_entities"][0], []
    for h, r, t in row["paths"][0]:
        out.append((r, h == cur))
        cur = t if h == cur else h
    return out


def measure(kg_source: str, n: int, seeds: list[int], hops: list[int], follow: bool) -> dict:
    """Per hop count: questions, first path takes the chain, mentions a relation, no path; seconds."""
    from kale_ray.config import SynthConfig, load_config
    from kale_ray.core.kg import GraphIndex, load_kg
    from kale_ray.core.qa import generate_questions
    from kale_ray.synth import steps

    cfg = load_config(SynthConfig, None, [f"paths.follow_question_relations={str(follow).lower()}"])
    kg = load_kg(kg_source)
    ctx = steps.SynthContext(kg, GraphIndex.from_kg(kg, undirected=cfg.kg.undirected_search), cfg.paths)
    counts: dict[str, Counter] = {}
    t0 = time.perf_counter()
    for seed in seeds:
        for q in generate_questions(kg, n, hops, seed=seed):
            row = steps.link_and_search(steps.qa_row(q), ctx)
            c = counts.setdefault(str(q.num_hops), Counter())
            c["questions"] += 1
            if row["reject_reason"]:
                c[row["reject_reason"]] += 1
                continue
            c["takes_chain"] += first_path_steps(row) == [(r, True) for _, r, _ in q.hops]
            c["mentions"] += bool(row["path_follows_question"])
    return {"by_hops": {h: dict(c) for h, c in sorted(counts.items())}, "seconds": time.perf_counter() - t0,
            "paths_config": {"follow_question_relations": follow, "heuristic": cfg.paths.heuristic,
                             "k": cfg.paths.k, "oversample": cfg.paths.oversample,
                             "fill_after_chain": cfg.paths.fill_after_chain}}


def shares(by_hops: dict) -> dict:
    total = Counter()
    for c in by_hops.values():
        total.update(c)
    out = {h: {k: c.get(k, 0) / c["questions"] for k in ("takes_chain", "mentions")} | {"n": c["questions"]}
           for h, c in by_hops.items()}
    out["all"] = {k: total.get(k, 0) / total["questions"] for k in ("takes_chain", "mentions")} | {"n": total["questions"]}
    return out


def table(results: dict) -> str:
    lines = ["| KG | hops | n | takes the chain: steered | baseline (re-rank only) | mentions a relation: steered | baseline |",
             "|---|---|---|---|---|---|---|"]
    for kg, r in results.items():
        on, off = r["steered"]["shares"], r["baseline"]["shares"]
        for h in on:
            lines.append(f"| {kg} | {h} | {on[h]['n']} | {on[h]['takes_chain']:.3f} | {off[h]['takes_chain']:.3f} "
                         f"| {on[h]['mentions']:.3f} | {off[h]['mentions']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kgs", default="builtin:umls,builtin:nations")
    ap.add_argument("--n", type=int, default=500, help="questions asked per KG and seed")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--hops", default="2,3")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--quick", action="store_true", help="--n 100")
    args = ap.parse_args(argv)
    if args.quick:
        args.n = min(args.n, 100)
    seeds = [int(s) for s in args.seeds.split(",")]
    hops = [int(h) for h in args.hops.split(",")]
    load = Load()
    results = {}
    for kg in args.kgs.split(","):
        r = {}
        for name, follow in (("steered", True), ("baseline", False)):
            m = measure(kg, args.n, seeds, hops, follow)
            m["shares"] = shares(m["by_hops"])
            r[name] = m
        r["ratio_takes_chain"] = (r["steered"]["shares"]["all"]["takes_chain"]
                                  / max(r["baseline"]["shares"]["all"]["takes_chain"], 1e-9))
        r["target_met"] = r["steered"]["shares"]["all"]["takes_chain"] >= TARGET
        results[kg.replace("builtin:", "")] = r
        s = r["steered"]["shares"]["all"]
        print(f"{kg}: first path takes the question's chain {s['takes_chain']:.3f} steered vs "
              f"{r['baseline']['shares']['all']['takes_chain']:.3f} re-ranked ({r['ratio_takes_chain']:.2f}x), "
              f"n={s['n']}; target >= {TARGET}: {'met' if r['target_met'] else 'NOT met'}", flush=True)
    print(table(results))
    write_result("question_paths", {"benchmark": "question_paths", "date": now(), "machine": machine(),
                                    "versions": versions("numpy"), "load": load.as_dict(), "target": TARGET,
                                    "config": {"n": args.n, "seeds": seeds, "hops": hops}, "results": results,
                                    "table": table(results)}, out=args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
