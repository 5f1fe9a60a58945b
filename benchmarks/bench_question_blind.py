"""The shortcut check of the generated questions: a question-blind baseline per hop count.

    python benchmarks/bench_question_blind.py                  # UMLS and Nations, 500 questions, seed 0
    python benchmarks/bench_question_blind.py --n 200 --seeds 0,1,2

Pure Python, no model (seconds). For each distractor setting, generates questions (and their hop
probes) and scores two guessers that never see the question's entity: ``range`` picks the choice
most often a tail of the question's last relation (the answer's type and prior), ``tail`` the
choice most often a tail of any relation (the choices alone), ``answer`` the choice most often the
gold of the other questions of the same hop count and last relation (the answer prior fine-tuning
can learn). Near chance (1/choices) means the choices do not give the answer away. Prints a
table, writes benchmarks/results/question_blind.json.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "question_blind.json"

# (label, generate_questions keywords): the original policy, then the testbed's
SETTINGS = [
    ("range (original)", dict(distractors="range")),
    ("reachable, tier<=range", dict(distractors="reachable", max_distractor_tier="range")),
    ("matched, tier<=range", dict(distractors="matched", max_distractor_tier="range")),
    ("matched, tier<=range, share<=0.25", dict(distractors="matched", max_distractor_tier="range",
                                                max_answer_share=0.25)),
]


def measure(kg_source: str, n: int, seeds: list[int], hops: list[int]) -> list[dict]:
    from kale_ray.core.kg import load_kg
    from kale_ray.core.qa import generate_questions
    from kale_ray.methods.kale.metrics import question_blind_baseline

    kg = load_kg(kg_source)
    rows = []
    for label, kw in SETTINGS:
        qs, probes, t0 = [], [], time.perf_counter()
        for seed in seeds:
            got = generate_questions(kg, n, hops, seed=seed, **kw)
            qs += got
            probes += [p for q in got for p in q.probes]
        row = {"kg": kg_source, "setting": label, "options": kw, "n": len(qs), "requested": n * len(seeds),
               "seconds": time.perf_counter() - t0, "tiers": dict(Counter(q.distractor_tier for q in qs))}
        for prior in ("range", "tail", "answer"):
            row[prior] = question_blind_baseline(kg, qs, prior)
            row[f"{prior}_probes"] = question_blind_baseline(kg, probes, prior)
        rows.append(row)
    return rows


def table(rows: list[dict], hops: list[int]) -> str:
    head = ["KG", "distractors", "n", "prior"] + [f"{h}-hop" for h in hops] + ["all", "probes", "chance"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for prior in ("range", "tail", "answer"):
            b, bp = r[prior], r[f"{prior}_probes"]
            cells = [r["kg"].split(":")[-1], r["setting"], f"{r['n']}/{r['requested']}", prior]
            cells += [f"{b['by_hops'][str(h)]['accuracy']:.3f} ({b['by_hops'][str(h)]['n']})" if str(h) in b["by_hops"]
                      else "-" for h in hops]
            cells += [f"{b['accuracy']:.3f}", f"{bp['accuracy']:.3f}", f"{b['chance']:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kgs", default="builtin:umls,builtin:nations")
    ap.add_argument("--n", type=int, default=500, help="questions requested per seed")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--hops", default="1,2,3")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    hops = [int(h) for h in a.hops.split(",")]
    rows = [r for src in a.kgs.split(",") for r in measure(src, a.n, seeds, hops)]
    print(table(rows, hops))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": a.n, "seeds": seeds, "hops": hops, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
