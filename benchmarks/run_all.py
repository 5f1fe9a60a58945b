"""Run every benchmark, then regenerate benchmarks/README.md from benchmarks/results/*.json
(README.header.md, the generated tables, then README.footer.md: the hand-written measurement sections).

    python benchmarks/run_all.py            # full runs (an hour or more on 2 cores; the accuracy testbed at smoke size)
    python benchmarks/run_all.py --quick    # smoke-size runs
    python benchmarks/run_all.py --table    # only rebuild the README table from existing results
    python benchmarks/run_all.py --only bench_dpo.py,bench_generation.py

``bench_synth_scale.py`` at full size (10^5, 10^6, 5*10^6 entities x 10^4..10^6 questions) runs for hours
with today's pipeline (each run capped by its ``--timeout``); ``--quick`` is 10^5 entities x 10^4 questions.
The accuracy testbed's full size (several seeds x ~25 min) is not part of a plain run:
``python benchmarks/bench_accuracy.py --size full --seeds 0,1,2``. ``bench_dpo.py`` needs the
``bench`` extra (TRL): ``pip install -e ".[bench]"``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TESTBED = "testbed-hpo-1ep"  # accuracy.json's entry of the known-and-incorrect testbed (bench_accuracy.py --key)
SCRIPTS = ["bench_paths.py", "bench_ka_loss.py", "bench_generation.py", "bench_dpo.py", "bench_accuracy.py",
           "bench_recipes.py", "bench_synth_scale.py", "bench_question_paths.py"]


def _get(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _load(name: str):
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def _met(ok) -> str:
    return "—" if ok is None else ("**met**" if ok else "**not met**")


def _la(*values) -> str:
    vals = [v for v in values if isinstance(v, (int, float))]
    return f"{min(vals):.1f}–{max(vals):.1f}" if vals else "?"


def _load_of(data: dict) -> str:
    """1-minute load average range while measured, from whichever fields the script wrote."""
    samples = _get(data, "load", "samples")
    if samples:
        return _la(*[s["loadavg"][0] for s in samples])
    m = data.get("machine") or {}
    if "loadavg_at_start" in m:
        return _la(m["loadavg_at_start"][0], (m.get("loadavg_at_end") or [None])[0])
    if "loadavg" in data:
        return _la(*[v[0] for v in data["loadavg"].values() if isinstance(v, list)])
    return "not recorded"


def rows() -> list[list[str]]:
    out: list[list[str]] = []
    paths = _load("paths.json")
    if paths:
        s = paths.get("summary") or {}
        b = s.get("bidirectional") or {}
        sh = s.get("shared_answers_batched_cached") or {}
        la = _load_of(paths)
        if b:
            out.append(["KG path search vs networkx `shortest_simple_paths`, cold pairs (HPO)", "`paths.json`",
                        f"{b['ratio_vs_networkx_cpu_time']:.1f}x paths per CPU-s, {b['ratio_vs_networkx']:.1f}x wall",
                        ">= 20x", _met(b["ratio_vs_networkx_cpu_time"] >= 20), la])
        if sh:
            out.append(["KG path search, shared answers batched with a worker cache (HPO)", "`paths.json`",
                        f"{sh['ratio_vs_networkx_cpu_time']:.1f}x per CPU-s, {sh['ratio_vs_networkx']:.1f}x wall",
                        ">= 20x", _met(sh["ratio_vs_networkx_cpu_time"] >= 20), la])
        rs = paths.get("ray_data_scaling") or {}
        if rs.get("measured"):
            sp = rs["speedup_wall"]
            w = sorted(sp, key=int)
            out.append([f"Ray Data sampling stage {w[0]} -> {w[-1]} workers (HPO, {rs['pairs']} pairs)", "`paths.json`",
                        f"{sp[w[-1]]:.2f}x wall ({rs['pairs_per_s_wall'][w[0]]:.0f} -> {rs['pairs_per_s_wall'][w[-1]]:.0f} pairs/s)",
                        f"report (ideal {int(w[-1]) // int(w[0])}x)", "—",
                        _la(rs.get("loadavg_at_start", [None])[0], rs.get("loadavg_at_end", [None])[0])
                        if rs.get("loadavg_at_start") else _la(*[r["loadavg_before"] for v in rs["raw"].values() for r in v])])
        else:
            out.append(["Ray Data sampling stage 1 -> 2 workers", "`paths.json`", "not measured", "report", "—", "—"])
    out += synth_scale_rows()
    qp = _load("question_paths.json")
    for kg, r in ((qp or {}).get("results") or {}).items():
        on, off = r["steered"]["shares"]["all"], r["baseline"]["shares"]["all"]
        out.append([f"First path takes the question's relation chain ({kg}, {on['n']} generated 2-3-hop questions)",
                    "`question_paths.json`", f"{on['takes_chain']:.3f} steered vs {off['takes_chain']:.3f} re-ranked only "
                    f"({r['ratio_takes_chain']:.1f}x)", f">= {qp['target']}", _met(r["target_met"]), _load_of(qp)])
    ka = _load("ka_loss.json")
    if ka:
        entry, which = (ka["full"], "full") if "full" in ka else (ka.get("quick"), "quick")
        r = entry["ratios_project_over_naive"]
        out.append([f"KA loss vs naive full-vocab two-pass ({which})", "`ka_loss.json`",
                    f"loss peak memory {r['loss_part_peak_memory']:.3f}x, step time {r['step_time']:.2f}x; "
                    f"losses agree to {entry['agreement']['loss_abs_diff']:.0e}",
                    "loss peak memory <= 0.5x at equal step time", _met(entry.get("target_met")), _load_of(entry)])
    gen = _load("generation.json")
    if gen:
        r = gen["ratios"]
        la = _load_of(gen)
        tag = " (quick)" if _get(gen, "config", "quick") else ""
        out.append([f"Generation: Ray Data + ray.data.llm + vLLM vs bare `vllm.LLM.generate`{tag}", "`generation.json`",
                    f"{r['pipeline_over_bare_vllm']:.2f}x output tok/s", ">= 0.9x",
                    _met(r["pipeline_over_bare_vllm"] >= 0.9), la])
        out.append([f"Generation: pipeline vs batched HF `generate`{tag}", "`generation.json`",
                    f"{r['pipeline_over_hf_generate']:.2f}x output tok/s (bare vLLM {r['bare_vllm_over_hf_generate']:.2f}x)",
                    ">= 3x", _met(r["pipeline_over_hf_generate"] >= 3), la])
    else:
        out.append(["Generation throughput", "`generation.json`", "not run yet", ">= 0.9x bare vLLM, >= 3x HF", "—", "—"])
    gt = _load("generation_threads2.json")
    if gt:
        r = gt["ratios"]
        out.append(["Generation, every engine given 2 threads (`--threads 2`)", "`generation_threads2.json`",
                    f"pipeline {r['pipeline_over_bare_vllm']:.2f}x bare vLLM, {r['pipeline_over_hf_generate']:.2f}x HF "
                    f"(bare vLLM {r['bare_vllm_over_hf_generate']:.2f}x HF)", ">= 0.9x, >= 3x",
                    _met(r["pipeline_over_bare_vllm"] >= 0.9 and r["pipeline_over_hf_generate"] >= 3), _load_of(gt)])
    dpo = _load("dpo.json")
    if dpo:
        entry, which = (dpo["full"], "full") if "full" in dpo else (dpo["quick"], "quick")
        h = entry["headline"]
        extra = f"; TRL's default (per-step reference) {h['per_step_reference_ratio']:.2f}x" if h.get("per_step_reference_ratio") else ""
        if h.get("deepspeed_engine_ratio"):
            extra += f"; the trainer's DeepSpeed ZeRO-2 step {h['deepspeed_engine_ratio']:.2f}x"
        out.append([f"DPO step vs TRL `DPOTrainer` ({which}: {entry['config']['model']}, "
                    f"{'full FT' if entry['config']['full_ft'] else 'LoRA'}, precomputed reference)", "`dpo.json`",
                    f"{h['ratio_pairs_per_s']:.2f}x pairs/s{extra}; losses agree: step 1 to {h['first_step_loss_abs_diff']:.0e}, "
                    f"all steps to {h['max_abs_loss_diff_over_steps']:.0e}",
                    ">= 1.3x", _met(h["target_met"]), _load_of(entry)])
    else:
        out.append(["DPO step vs TRL `DPOTrainer`", "`dpo.json`", "not run yet", ">= 1.3x", "—", "—"])
    acc = _load("accuracy.json")
    if acc:
        # the known-and-incorrect testbed (issue 15: HPO, where the gate passes) first
        entry = acc.get(TESTBED) or acc.get("full") or acc.get("demo") or acc.get("medium") or acc.get("smoke")
        h = entry["headline"]
        ci = h["paired_ci95_points"]
        size = entry["size"] + ("" if entry.get("full_size_ran") or entry["size"] == "testbed"
                                else "; the 1500-question full size not run")
        out.append([f"Accuracy testbed KALE vs SFT ({size}, seeds {h['seeds']}, n={h['n_questions_pooled']})",
                    "`accuracy.json`",
                    f"SFT {h['sft_accuracy']:.3f}, KALE {h['kale_accuracy']:.3f}: {h['kale_minus_sft_points']:+.1f} points "
                    f"(paired 95% CI {ci[0]:+.1f} .. {ci[1]:+.1f}); known & incorrect SFT {h['sft_known_and_incorrect']:.3f}, "
                    f"KALE {h['kale_known_and_incorrect']:.3f}",
                    "report (papers: +4.18 avg, up to +11.72)", "—", _load_of(entry)])
    else:
        out.append(["Accuracy testbed KALE vs SFT", "`accuracy.json`", "not run yet", "report", "—", "—"])
    for method, label in (("knowtuning", "KnowTuning vs SFT (HPO, fact-level)"), ("kard", "KARD (a)/(b)/(c) + reranker vs BM25 (UMLS)"),
                          ("kalm", "KaLM before vs after alignment (UMLS KG completion)")):
        doc = _load(f"{method}.json")
        entry = (doc or {}).get("full") or (doc or {}).get("quick")
        if entry:
            which = entry["size"] + (f"; reused: {len(entry['reused_stages'])} stages" if entry.get("reused_stages") else "")
            la = ("read from the finished run (its report has the machine)" if entry.get("reused_stages")
                  and not _get(entry, "stage_seconds", "total_this_run", default=0) > 60 else _load_of(entry))
            out.append([f"{label} ({which})", f"`{method}.json`", entry["headline"], "report", "—", la])
        else:
            out.append([label, f"`{method}.json`", "not run yet", "report", "—", "—"])
    return out


def synth_scale_rows() -> list[list[str]]:
    """bench_synth_scale.py: per target, the largest KG size it was measured at, from the newer of
    ``make bench``'s ``synth_scale.json`` and the quiet 1e6 run; plus the driver at 1e6 questions."""
    docs = [(d.get("date", ""), name, d) for name in ("synth_scale.json", "synth_scale_1e6_quiet.json")
            if (d := _load(name))]
    if not docs:
        return [["Synthesis at KG scale (issue 11)", "`synth_scale.json`", "not run yet", "see issue 11", "—", "—"]]
    _, fname, doc = max(docs)
    out = _synth_target_rows(doc, fname)
    q6 = _load("synth_scale_1e6_q1e6.json")
    if q6:
        out += [r for r in _synth_target_rows(q6, "synth_scale_1e6_q1e6.json") if "driver" in r[0]]
    return out


def _synth_target_rows(doc: dict, fname: str) -> list[list[str]]:
    best: dict[str, dict] = {}
    for t in doc.get("targets") or []:
        if t["target"] not in best or t["entities"] >= best[t["target"]]["entities"]:
            best[t["target"]] = t
    la = _load_of(doc)
    out = []
    for t in best.values():
        n = t["entities"]
        size = f"{n:.0e}".replace("e+0", "e") if float(f"{n:.0e}") == n else str(n)
        meas = "did not finish" if t["measured"] is None else (
            f"{t['measured']:.2f} {t.get('unit') or ''}".strip()
            + (f" (baseline {t['baseline']:.2f}, ratio {t['ratio']:.2f})" if t.get("ratio") is not None else ""))
        out.append([f"Synthesis at scale, {size} entities: {t['target']}" + (f" ({t['note']})" if "questions" in t.get("note", "")[:20] else ""),
                    f"`{fname}`", meas,
                    "issue 11 (met judged at the size it names)", _met(t["met"]), la])
    return out


def _f(x, fmt=".3f") -> str:
    return "—" if x is None else format(x, fmt)


def _pts(d: dict) -> str:
    """A paired difference in points with its 95% interval."""
    if not d or d.get("diff") is None or d["diff"] != d["diff"]:
        return "—"
    return f"{100 * d['diff']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"


def _ka_tables(entry: dict) -> list[str]:
    """bench_accuracy's pooled per-hop comparison and its KA settings grid (when the entry has them)."""
    parts: list[str] = []
    g = (entry.get("pooled") or {}).get("gate")
    if g and g.get("models"):
        hops = sorted({h for m in g["models"].values() for h in m["by_hops"]}, key=int)
        parts += [f"The gate, pooled over seeds {entry['seeds']} (per hop count: multi-hop accuracy / hop-fact accuracy / "
                  "known & incorrect rate, over the probed questions):", "",
                  "| model | seeds | n | multi-hop accuracy [95% CI] | hop-fact accuracy | known | known & incorrect [95% CI] | "
                  "missed when known [95% CI] | " + " | ".join(f"{h}-hop" for h in hops) + " |",
                  "|---|---|---|---|---|---|---|---|" + "---|" * len(hops)]
        for name in [m for m in ("base", "sft", "kale") if m in g["models"]]:
            m = g["models"][name]
            a = m["all"]
            cells = [f"{m['by_hops'][h]['accuracy']:.3f} / {m['by_hops'][h]['probe_accuracy']:.3f} / "
                     f"{m['by_hops'][h]['known_and_incorrect_rate']:.3f}" if h in m["by_hops"] else "—" for h in hops]
            parts.append(f"| {name} | {','.join(map(str, m['seeds']))} | {a['n']} | {a['accuracy']:.3f} "
                         f"[{a['accuracy_ci95'][0]:.3f}, {a['accuracy_ci95'][1]:.3f}] | {a['probe_accuracy']:.3f} | {a['n_known']} | "
                         f"{a['n_ki']} ({a['known_and_incorrect_rate']:.3f} [{a['known_and_incorrect_ci95'][0]:.3f}, "
                         f"{a['known_and_incorrect_ci95'][1]:.3f}]) | {a['known_and_incorrect_given_known']:.3f} "
                         f"[{a['known_and_incorrect_given_known_ci95'][0]:.3f}, {a['known_and_incorrect_given_known_ci95'][1]:.3f}] | "
                         + " | ".join(cells) + " |")
        for prior, b in sorted(g.get("question_blind", {}).items()):
            cells = [f"{b['by_hops'][h]['accuracy']:.3f}" if h in b["by_hops"] else "—" for h in hops]
            parts.append(f"| question-blind, {prior} prior (chance {b['chance']:.3f}) | {','.join(map(str, b['seeds']))} | {b['n']} | "
                         f"{b['accuracy']:.3f} | — | — | — | — | " + " | ".join(cells) + " |")
        parts += [""]
    c = (entry.get("pooled") or {}).get("compare")
    if c:
        parts += [f"Pooled over seeds {entry['seeds']}, per hop count (known & incorrect: share of the probed questions; "
                  "its paired difference is per question, K&I under KALE minus under SFT):", "",
                  "| hops | n | SFT | KALE | KALE − SFT, points [95% CI] | K&I SFT | K&I KALE | K&I KALE − SFT, points [95% CI] |",
                  "|---|---|---|---|---|---|---|---|"]
        for h, v in [("all", c)] + sorted(c["by_hops"].items()):
            parts.append(f"| {h} | {v['sft']['n']} | {v['sft']['accuracy']:.3f} | {v['kale']['accuracy']:.3f} | "
                         f"{_pts(v['kale_minus_sft_paired'])} | {v['sft']['n_known_and_incorrect']} ({v['sft']['known_and_incorrect_rate']:.3f}) | "
                         f"{v['kale']['n_known_and_incorrect']} ({v['kale']['known_and_incorrect_rate']:.3f}) | "
                         f"{_pts(v['known_and_incorrect_kale_minus_sft_paired'])} |")
        parts += [""]
    grid = entry.get("ka_grid") or []
    if grid:
        parts += ["KA settings, each KALE model against its seed's SFT (same rows, steps, LoRA); the defaults are forward KL, "
                  "T = 1, λ = 1, no teacher-view CE:", "",
                  "| setting | seed | KALE accuracy | KALE − SFT, points [95% CI] | K&I KALE (SFT) | unparsed answers KALE (SFT) | "
                  "general QA KALE − SFT [95% CI] |", "|---|---|---|---|---|---|---|"]
        for g in grid:
            v = g["compare"]
            parts.append(f"| `{' '.join(g['overrides'])}` | {g['seed']} | {v['kale']['accuracy']:.3f} | {_pts(v['kale_minus_sft_paired'])} | "
                         f"{v['kale']['n_known_and_incorrect']} ({v['sft']['n_known_and_incorrect']}) | "
                         f"{v['unparsed']['kale']} ({v['unparsed']['sft']}) | {_pts(g['general_kale_minus_sft'])} |")
        parts += [""]
    pooled = {k: v for k, v in (entry.get("ka_pooled") or {}).items() if len(v["seeds"]) > 1}
    if pooled:
        parts += ["KA settings run at more than one seed, pooled over those seeds, beside the default settings' KALE at the "
                  "same seeds:", "",
                  "| setting | seeds | n | KALE − SFT, points [95% CI] | default KALE − SFT, same seeds | "
                  "K&I KALE / default / SFT | unparsed KALE / default / SFT | general QA KALE − SFT |", "|---|---|---|---|---|---|---|---|"]
        for v in pooled.values():
            c, d = v["compare"], v["default_at_same_seeds"] or {}
            parts.append(f"| `{' '.join(v['overrides'])}` | {','.join(map(str, v['seeds']))} | {c['sft']['n']} | "
                         f"{_pts(c['kale_minus_sft_paired'])} | {_pts(d.get('kale_minus_sft_paired'))} | "
                         f"{c['kale']['n_known_and_incorrect']} / {(d.get('kale') or {}).get('n_known_and_incorrect', '—')} / "
                         f"{c['sft']['n_known_and_incorrect']} | {c['unparsed']['kale']} / "
                         f"{(d.get('unparsed') or {}).get('kale', '—')} / {c['unparsed']['sft']} | {_pts(v.get('general_kale_minus_sft'))} |")
        parts += [""]
    return parts


def method_tables() -> str:
    """The side-by-side tables of bench_recipes.py's results, one per method."""
    parts = []
    acc = _load("accuracy.json") or {}
    # the known-and-incorrect testbed (HPO), then the demo-size runs (the earlier UMLS demo)
    for key in [TESTBED] + [next((k for k in ("full", "demo", "medium") if k in acc), "")]:
        entry = acc.get(key)
        if not entry:
            continue
        parts += [f"### KALE vs SFT, accuracy testbed ({entry['size']} size, `accuracy.json` key `{key}`)", "",
                  "| seed | n | base | SFT [95% CI] | KALE [95% CI] | KALE − SFT paired [95% CI] | K&I SFT | K&I KALE |",
                  "|---|---|---|---|---|---|---|---|"]
        def cell(r):
            return f"{r['accuracy']:.3f} [{r['accuracy_ci95'][0]:.3f}, {r['accuracy_ci95'][1]:.3f}]"
        for r in entry["per_seed"]:
            m, d = r["metrics"], r["kale_minus_sft_paired"]
            parts.append(f"| {r['seed']} | {m['kale']['n']} | {_f((m.get('base') or {}).get('accuracy'))} | {cell(m['sft'])} | {cell(m['kale'])} | "
                         f"{100 * d['diff']:+.1f} pts [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] | "
                         f"{m['sft']['known_and_incorrect_rate']:.3f} | {m['kale']['known_and_incorrect_rate']:.3f} |")
        p, d = entry["pooled"], entry["pooled"]["kale_minus_sft_paired"]
        base = _f((p.get('base') or {}).get('accuracy')) + (f" (seeds {','.join(map(str, p['base']['seeds']))})"
                                                            if (p.get('base') or {}).get('seeds') else "")
        parts.append(f"| pooled | {p['kale']['n']} | {base} | {cell(p['sft'])} | {cell(p['kale'])} | "
                     f"{100 * d['diff']:+.1f} pts [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] | "
                     f"{p['sft']['known_and_incorrect_rate']:.3f} | {p['kale']['known_and_incorrect_rate']:.3f} |")
        a = entry.get("across_seeds") or {}
        if a.get("ci95_t"):
            parts += ["", f"Across seeds: mean KALE − SFT {100 * a['mean']:+.1f} points (t interval "
                      f"{100 * a['ci95_t'][0]:+.1f} .. {100 * a['ci95_t'][1]:+.1f}, {len(a['per_seed_diff'])} seeds)."]
        gq = (entry.get("pooled") or {}).get("general") or {}
        if gq:
            accs = ", ".join(f"{m} {a:.3f}" for m, a in gq["mean_accuracy"].items())
            parts += ["", f"General questions (200, never trained on; seeds {','.join(map(str, gq['seeds']))}): mean accuracy {accs}; "
                      f"KALE − SFT paired over (seed, question) {_pts(gq['kale_minus_sft'])} points."]
        parts += [""] + _ka_tables(entry)
    kt = (_load("knowtuning.json") or {}).get("full") or (_load("knowtuning.json") or {}).get("quick")
    if kt:
        t = kt["table"]
        parts += [f"### KnowTuning vs {t['baseline']} ({kt['size']}, {t['n_questions']} held-out questions, `knowtuning.json`)", "",
                  f"| metric | {t['baseline']} | KnowTuning | difference | better |", "|---|---|---|---|---|"]
        parts += [f"| {r['metric']} | {_f(r['baseline'])} | {_f(r['method'])} | {_f(r['diff'], '+.3f')} | {r['better']} |"
                  for r in t["rows"]]
        d = t["paired_correct_facts_per_question"]
        if d.get("n"):
            parts += ["", f"Paired per question, correct facts KnowTuning - {t['baseline']}: {d['mean']:+.3f} "
                      f"(bootstrap 95% CI {d['ci95'][0]:+.3f} .. {d['ci95'][1]:+.3f}, n={d['n']})."]
        parts += [""]
    kd = (_load("kard.json") or {}).get("full") or (_load("kard.json") or {}).get("quick")
    if kd:
        t = kd["table"]
        parts += [f"### KARD ({kd['size']}, `kard.json`)", "", "| model | accuracy | 95% CI | n | parse rate |", "|---|---|---|---|---|"]
        parts += [f"| {r['model']} | {_f(r['accuracy'])} | {_f(r['ci95'][0])}–{_f(r['ci95'][1])} | {r['n']} | {_f(r['parse_rate'], '.2f')} |"
                  for r in t["rows"]]
        pa = t["paired"]
        parts += ["", "Paired per question: " + "; ".join(
            f"{k.replace('_minus_', ' − ')} {_f(v['diff'], '+.3f')} (95% CI {_f(v['ci95'][0], '+.3f')} .. {_f(v['ci95'][1], '+.3f')})"
            for k, v in pa.items() if v.get("diff") is not None) + ".", "",
                  f"| reranker vs BM25 (n={t['reranker_n']}, {t['reranker_candidates']} candidates) | BM25 | reranker |",
                  "|---|---|---|"]
        parts += [f"| hit@{h['k']} | {_f(h['bm25'])} | {_f(h['reranker'])} |" for h in t["reranker_hits"]]
        parts += [""]
    km = (_load("kalm.json") or {}).get("full") or (_load("kalm.json") or {}).get("quick")
    if km:
        t = km["table"]
        parts += [f"### KaLM before vs after ({km['size']}, {t['n_queries']} completion queries over {t['num_entities']} entities, "
                  f"random MRR {t['random_mrr']:.3f}, `kalm.json`)", "", "| metric (both directions) | before | after | change |",
                  "|---|---|---|---|"]
        parts += [f"| {r['metric']} | {_f(r['before'])} | {_f(r['after'])} | {_f(r['diff'], '+.3f')} |"
                  for r in t["completion"] if r["direction"] == "both"]
        parts += ["", "| KGQA task | before | after | chance | n |", "|---|---|---|---|---|"]
        parts += [f"| {q['task']} | {_f(q['before'])} | {_f(q['after'])} | {_f(q['chance'])} | {q['n']} |" for q in t["kgqa"]]
        parts += [""]
    return "\n".join(parts)


def table() -> str:
    lines = ["| benchmark | result file | measured | target | met | load avg (1 min) while measured |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows()]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated script names")
    args = ap.parse_args()
    failed = []
    if not args.table:
        scripts = [s for s in SCRIPTS if not args.only or s in args.only.split(",")]
        for s in scripts:
            cmd = [sys.executable, str(HERE / s)] + (["--quick"] if args.quick else [])
            print("$", " ".join(cmd), flush=True)
            if subprocess.call(cmd) != 0:
                failed.append(s)
    text = (HERE / "README.header.md").read_text() if (HERE / "README.header.md").exists() else "# Benchmarks\n"
    (HERE / "README.md").write_text(text.rstrip("\n") + "\n\n## Latest results\n\n_Generated by `python benchmarks/run_all.py --table` "
                                    "from `results/*.json`._\n\n" + table() + "\n\n## Method vs baseline tables\n\n"
                                    + method_tables() + "\n"
                                    + ("\n" + (HERE / "README.footer.md").read_text() if (HERE / "README.footer.md").exists() else ""))
    print((HERE / "README.md").read_text())
    if failed:
        print("failed:", failed, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
