"""Run reports: metrics.json, report.md and a PNG plot (loss curves, accuracy bars)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kale_ray.runtime.report import Markdown, fmt


def plot(out_png: Path, histories: dict[str, list[dict]], evals: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for name, hist in histories.items():
        if hist:
            ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], label=f"{name} total loss")
            if "ce" in hist[0] and name != "sft":
                ax.plot([h["step"] for h in hist], [h["ce"] for h in hist], "--", label=f"{name} answer CE")
    ax.set_xlabel("step"); ax.set_ylabel("loss"); ax.set_title("training loss"); ax.legend(fontsize=8)
    ax = axes[1]
    if histories.get("kale") and "kl" in histories["kale"][0]:
        h = histories["kale"]
        ax.plot([x["step"] for x in h], [x["kl"] for x in h], color="tab:purple")
        ax.set_title("KALE: KL(teacher view || student view)"); ax.set_xlabel("step")
    else:
        ax.axis("off")
    ax = axes[2]
    names = list(evals)
    accs = [evals[n]["accuracy"] for n in names]
    lo = [evals[n]["accuracy"] - evals[n]["accuracy_ci95"][0] for n in names]
    hi = [evals[n]["accuracy_ci95"][1] - evals[n]["accuracy"] for n in names]
    kis = [evals[n]["known_and_incorrect_rate"] for n in names]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], accs, width=0.4, yerr=[lo, hi], capsize=4, label="accuracy (95% CI)")
    ax.bar([i + 0.2 for i in x], kis, width=0.4, label="known & incorrect rate")
    ax.set_xticks(list(x)); ax.set_xticklabels(names); ax.set_ylim(0, 1); ax.legend(fontsize=8)
    ax.set_title("held-out multi-hop questions")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def write_report(out: Path, metrics: dict[str, Any]) -> None:
    ev, s = metrics["eval"], metrics["synthesis"]
    md = Markdown("KALE demo report")
    md.para(f"KG: `{s['kg']['source']}` ({s['kg']['entities']} entities, {s['kg']['triples']} triples); "
            f"model: `{metrics['model']}`; machine: {metrics['machine']['cpus']} CPUs, {metrics['machine']['platform']}.")
    md.section("Held-out multi-hop questions")
    md.table(["model", "accuracy", "95% CI", "probe (hop fact) accuracy", "known & incorrect rate", "K&I given known", "n"],
             [[name, m["accuracy"], f"[{fmt(m['accuracy_ci95'][0])}, {fmt(m['accuracy_ci95'][1])}]", m["probe_accuracy"],
               m["known_and_incorrect_rate"], m["known_and_incorrect_given_known"], m["n_questions"]]
              for name, m in ev.items()])
    if "sft" in ev and "kale" in ev:
        d = ev["kale"]["accuracy"] - ev["sft"]["accuracy"]
        md.para(f"KALE - SFT accuracy: **{d * 100:+.1f} points** (same data, steps, seed and LoRA budget). "
                "With this many questions, differences inside the CIs are not significant.")
    by_hops = {name: m["known_and_incorrect_by_hops"] for name, m in ev.items() if m.get("known_and_incorrect_by_hops")}
    if by_hops:
        md.section("Per hop count (questions with probes): accuracy / hop-fact accuracy / known & incorrect rate")
        hs = sorted({h for v in by_hops.values() for h in v}, key=int)
        md.table(["model"] + [f"{h}-hop" for h in hs],
                 [[name] + [(f"{fmt(v[h]['accuracy'])} / {fmt(v[h]['probe_accuracy'])} / "
                             f"{fmt(v[h]['known_and_incorrect_rate'])} (n={v[h]['n_with_probes']})") if h in v else "-"
                            for h in hs] for name, v in by_hops.items()])
    _general_section(md, metrics)
    g, blind = metrics.get("gate") or {}, metrics.get("question_blind") or {}
    if g:
        md.section("Testbed gate (SFT)")
        md.bullets([f"multi-hop accuracy {fmt(g['sft_accuracy'])} vs hop-fact (probe) accuracy "
                    f"{fmt(g['sft_probe_accuracy'])}: {'composes' if g['multi_hop_at_most_hop_fact'] else 'NOT composing: the questions have a shortcut'}",
                    f"known & incorrect rate {fmt(g['sft_known_and_incorrect_rate'])} (aim >= {fmt(g['min_known_and_incorrect'])}): "
                    f"{'enough for KALE to fix' if g['known_and_incorrect_enough'] else 'too little for KALE to fix'}",
                    f"gate: {'passed' if g['passed'] else 'not passed'}"])
    if blind:
        md.section("Question-blind baselines (choices only, no question entity)")
        hops = sorted({h for b in blind.values() for h in b["by_hops"]}, key=int)
        md.table(["prior", "accuracy", "chance"] + [f"{h}-hop" for h in hops] + ["n"],
                 [[p, b["accuracy"], b["chance"]] + [b["by_hops"].get(h, {}).get("accuracy") for h in hops] + [b["n"]]
                  for p, b in blind.items()])
        md.para("Near chance: the choices do not give the answer away; far above it, a model can answer "
                "without composing the facts.")
    md.section("Synthesis")
    md.bullets([f"rows in {s['rows_in']}, out {s['rows_out']}, rejected {s['rejected'] or 0}",
                f"rationales by teacher: {s['teacher_counts']}",
                f"teacher outputs that failed verification (replaced by the template rationale): {s['teacher_rejected'] or 0}",
                f"tokens generated: {s['tokens_generated']}",
                f"questions: {s['qa']}"])
    md.section("Training")
    md.bullets(f"{name}: {t.get('steps')} steps, final loss {fmt(t.get('final_loss'))}, {fmt(t.get('samples_per_s'))} "
               f"samples/s, {fmt(t.get('seconds_per_step'))} s/step, {fmt(t.get('wall_seconds'))} s"
               for name, t in metrics["train"].items())
    md.timings(metrics["timings"])
    md.para("![plot](plot.png)")
    md.write(out)


def _general_section(md: Markdown, metrics: dict[str, Any]) -> None:
    """Accuracy on the held-out general questions per model, KALE - SFT paired per question, and per
    category; nothing when the run was evaluated without them (``eval.general=""``)."""
    gen = {name: m["general"] for name, m in metrics["eval"].items() if m.get("general")}
    if not gen:
        return
    md.section("General ability (held-out general QA, never trained on)")
    md.table(["model", "accuracy [95% CI]", "parse rate", "n"],
             [[name, f"{fmt(g['accuracy'])} [{fmt(g['accuracy_ci95'][0])}, {fmt(g['accuracy_ci95'][1])}]",
               g["parse_rate"], g["n"]] for name, g in gen.items()])
    d = (metrics.get("general") or {}).get("kale_minus_sft")
    if d and d.get("diff") is not None:
        md.para(f"KALE - SFT, paired per question: **{d['diff'] * 100:+.1f} points** (95% CI "
                f"[{d['ci95'][0] * 100:+.1f}, {d['ci95'][1] * 100:+.1f}], n={d['n']}; "
                f"only SFT right {d['only_a_right']}, only KALE right {d['only_b_right']}). Questions from `{next(iter(gen.values())).get('source')}`: "
                "an interval wholly below zero means KALE cost general ability; one across zero, no difference "
                "measurable with this many questions.")
    cats = sorted({c for g in gen.values() for c in g.get("by_category", {})})
    if cats:
        md.table(["model"] + cats, [[name] + [g["by_category"].get(c, {}).get("accuracy") for c in cats]
                                    for name, g in gen.items()])


def write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
