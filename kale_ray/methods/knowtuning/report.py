"""KnowTuning's ``report.md``: the fact-level metrics of every model side by side, a few held-out
answers with their verdicts, Stage I's data, the training runs, Stage II's pairs and the time of
every stage (built with :class:`kale_ray.runtime.report.Markdown`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kale_ray.runtime.report import Markdown, fmt

# (row title, key in a model's results, decimals; None: the correct / incorrect / unverifiable counts)
_FACT_ROWS = [("answers", "answers", 0), ("atomic facts per answer", "facts_per_answer", 2),
              ("**# correct facts per answer**", "correct_facts_per_answer", 2),
              ("total correct / incorrect / unverifiable", None, 0),
              ("**share correct** (of verifiable)", "share_correct", 3),
              ("**factual error rate** (of verifiable)", "factual_error_rate", 3),
              ("unverifiable share (of all facts)", "unverifiable_share", 3),
              ("**completeness** (reference facts covered, mean)", "completeness", 3),
              ("completeness (micro)", "completeness_micro", 3), ("empty answers", "empty_answers", 0),
              ("mean answer tokens", "mean_answer_tokens", 1)]


def _examples(md: Markdown, eval_dir: Path, labels: list[str], n: int = 2) -> None:
    """The first ``n`` held-out questions: each model's answer and the verdict on each of its facts."""
    per = {}
    for label in labels:
        path = eval_dir / label / "facts.jsonl"
        if path.exists():
            per[label] = [json.loads(x) for x in path.read_text().splitlines()[:n] if x.strip()]
    if not per:
        return
    md.section("Examples", level=3)
    for i in range(min(len(v) for v in per.values())):
        lines = [f"**{next(iter(per.values()))[i]['question']}**"]
        for label, rows in per.items():
            r = rows[i]
            verdicts = ", ".join(f"{f['status']}" for f in r["checks"]) or "no facts"
            text = r["generation"].replace("\n", " ")
            lines.append(f"- {label}: \"{text[:400]}{'...' if len(text) > 400 else ''}\" -> {verdicts}")
        md.para(*lines)


def _train_row(name: str, t: dict) -> list[str]:
    return [name, str(t.get("steps")), str(t.get("samples")), f"{fmt(t.get('first_loss'))} -> {fmt(t.get('final_loss'))}",
            fmt(t.get("seconds_per_step"), 2), fmt(t.get("wall_seconds"), 1)]


def write_report(out: Path, m: dict[str, Any]) -> None:
    ev, qa, s1, s2 = m["eval"], m["qa"], m["stage1"], m["stage2"]
    results = ev["results"]
    labels = list(results)
    md = Markdown("KnowTuning report")
    md.para(f"KG `{qa['kg']['source']}` ({qa['kg']['entities']} entities, {qa['kg']['triples']} triples); "
            f"{qa['train']} training / {qa['test']} held-out long-form questions, "
            f"{fmt(qa['facts_per_answer'], 1)} reference facts per answer. Student `{m['student']}`, "
            f"teacher `{m['teacher']}`. Machine: {m['machine'].get('cpus')} CPUs.")
    md.section(f"Fact-level evaluation on the same {ev['questions']} held-out questions")
    md.table(["metric", *labels], [
        [title, *(f"{r['total_correct']} / {r['total_incorrect']} / {r['total_unverifiable']}" if key is None
                  else fmt(r.get(key), d) if d else str(r.get(key)) for r in results.values())]
        for title, key, d in _FACT_ROWS])
    md.para("A fact is checked by linking the KG entities it names (names + exact synonyms) and looking up the "
            "triple between the question's subject and each of them (either direction). Correct = every such "
            "triple is in the KG; incorrect = one is not; unverifiable = it names no entity but the subject "
            "(counted apart, not in the shares). Completeness = share of the question's reference triples "
            "whose entity a correct fact names.",
            f"Fact extraction of the answers: {ev['extract'].get('by_extractor', ev['extract'])}; rejected "
            f"extractions by reason: {ev.get('extract_rejected') or {}}.")
    _examples(md, out / "eval", labels)
    x, ppl = s1["extract"], s1["perplexity"]
    md.section("Stage I: fine-grained knowledge augmentation")
    md.bullets([f"atomic facts: {s1['atomic_facts']} from {s1['answers']} answers ({fmt(s1['facts_per_answer'], 2)} "
                f"per answer); extractor: {x.get('by_extractor')}; teacher passes {x.get('passes', 0)}, parsed by "
                f"attempt {x.get('parsed_by_attempt', {})}; rejected by reason: {x.get('rejected_by_reason')}",
                f"perplexity under `{ppl['model']}` (context: {ppl['context']}): mean {fmt(ppl['mean'], 2)}, median "
                f"{fmt(ppl['median'], 2)}; difficult (alpha {s1['alpha']}, {s1['scope']}): {s1['difficult']} facts, "
                f"ppl >= {fmt(ppl['difficult_threshold'], 2)}",
                f"rewrites: {s1['rewrite'].get('by_rewriter')} (teacher passes {s1['rewrite'].get('passes', 0)}); "
                f"rejected by reason: {s1['rewrite'].get('rejected_by_reason')}",
                f"SFT rows: {s1['rows']}"])
    md.section("Training")
    md.table(["run", "steps", "rows seen", "loss first -> last", "s/step", "wall s"],
             [*(_train_row(f"{k} (sft)", t) for k, t in m["train"].items()),
              _train_row("stage2 (dpo)", s2.get("train") or {})])
    pairs, ra = s2.get("pairs") or {}, s2.get("rewards_after") or {}
    md.para(f"Stage II pairs: {pairs.get('pairs')} ({pairs.get('by_kind')}), skipped by reason "
            f"{pairs.get('rejected')}; implicit-reward accuracy after DPO on its training pairs "
            f"{fmt(ra.get('reward_accuracy'))}, margin {fmt(ra.get('reward_margin'), 4)}.")
    md.timings(m["timings"], reused=m.get("reused_stages") or [],
               extra=[(f"{part}.{k}", v) for part, info in (("stage1_data", s1), ("stage2", s2), ("eval", ev))
                      for k, v in (info.get("seconds") or {}).items()])
    md.write(out)
