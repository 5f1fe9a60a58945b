"""Held-out QA evaluation with generation through vLLM (ray.data.llm), plus hop probes.

The student sees exactly the prompt string training used (``student_messages`` rendered
with the model's chat template), greedy decoding; answers are scored by choice matching
(multiple choice) or normalised match (open questions). A test file written by synthesis marks
the rows whose answer does not link to the KG (``"answer_linked": false``); the metrics then also
hold ``linked``: the same metrics over the linked rows only. The held-out general questions
(``general``, :mod:`kale_ray.methods.kale.general`) go through the same pass and are summarised apart.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from kale_ray.config import EvalConfig, dump_config
from kale_ray.core.io import write_json, write_jsonl
from kale_ray.core.parse import is_correct
from kale_ray.core.prompts import render_chat, student_messages
from kale_ray.core.qa import QAExample, read_qa_jsonl
from kale_ray.core.rejects import Rejects
from kale_ray.methods.kale.general import PREDICTIONS, general_file, general_items, read_general
from kale_ray.methods.kale.metrics import summarize, summarize_general


def eval_items(questions: list[QAExample], with_probes: bool = True) -> list[dict[str, Any]]:
    """One item per question, and one per hop probe (kind='probe', qid = its question)."""
    items = []
    for q in questions:
        items.append({"item_id": q.id, "qid": q.id, "kind": "question", "question": q.question,
                      "choices": list(q.choices), "all_answers": list(q.all_answers or [q.answer]),
                      "num_hops": q.num_hops})
        if with_probes:
            for i, p in enumerate(q.probes):
                items.append({"item_id": f"{q.id}#hop{i}", "qid": q.id, "kind": "probe", "question": p["question"],
                              "choices": list(p.get("choices") or []),
                              "all_answers": list(p.get("all_answers") or [p["answer"]]), "num_hops": 1})
    return items


def build_items(cfg: EvalConfig, questions: list[QAExample]) -> list[dict[str, Any]]:
    """Everything one generation pass asks: the test questions (with their hop probes when
    ``cfg.known_and_incorrect``), then the general questions of ``cfg.general`` (none for "")."""
    general = general_file(cfg.general)
    return eval_items(questions, cfg.known_and_incorrect) + (general_items(read_general(general)) if general else [])


def score(item: dict[str, Any], generation: str, error: str = "") -> dict[str, Any]:
    if error:
        return dict(item, generation="", prediction=None, correct=False, parsed=False, skipped=_skip_reason(error))
    ok, pred = is_correct(generation, item["all_answers"], item["choices"])
    return dict(item, generation=generation, prediction=pred, correct=bool(ok), parsed=pred is not None, skipped="")


def unlinked_ids(path: str | Path) -> set[str]:
    """Ids of the rows of a QA file marked ``"answer_linked": false`` (synthesis's qa/test.jsonl)."""
    out: set[str] = set()
    with Path(path).expanduser().open("rb") as f:
        for raw in f:
            if b'"answer_linked"' not in raw:
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                continue  # the reader rejects it with its reason
            if isinstance(obj, dict) and obj.get("answer_linked") is False and obj.get("id"):
                out.add(str(obj["id"]))
    return out


def with_linked(metrics: dict[str, Any], scored: list[dict[str, Any]], unlinked: set[str]) -> dict[str, Any]:
    """``metrics`` plus ``n_answer_unlinked`` and, when some questions' answers do not link to the KG,
    ``linked``: the metrics over the other questions (and their probes) only."""
    qids = {r["qid"] for r in scored if r.get("kind") == "question"}
    metrics["n_answer_unlinked"] = len(qids & unlinked)
    if metrics["n_answer_unlinked"]:
        metrics["linked"] = summarize([r for r in scored if r["qid"] not in unlinked])
    return metrics


def _skip_reason(error: str) -> str:
    e = error.lower()
    if "maximum context length" in e or "too long" in e or "too_long" in e or "max_model_len" in e or "longer than" in e:
        return "prompt_too_long"
    return "generation_failed"


def evaluate(cfg: EvalConfig, label: str = "model", progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on ``cfg.data`` (and ``cfg.general``); write predictions.jsonl (and
    general_predictions.jsonl) and metrics.json. Ray must be up.

    ``generation.backend``: ``vllm`` (the model's folder or hub name) or ``http`` (an
    OpenAI-compatible endpoint serving ``model.name``), both through kale_ray.runtime.generate.
    """
    from kale_ray.models import load_tokenizer, resolve_model
    from kale_ray.runtime.generate import generate

    t0 = time.perf_counter()
    out_dir = Path(cfg.out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out_dir / "config.yaml")
    rejects = Rejects()
    questions = list(read_qa_jsonl(cfg.data, rejects))
    if rejects.total():
        rejects.write_jsonl(out_dir / "rejected_qa_lines.jsonl")
    general = general_file(cfg.general)
    items = build_items(cfg, questions)
    model_path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    tok = load_tokenizer(model_path, cfg.model.trust_remote_code)
    progress(f"[eval:{label}] {len(questions)} questions, {len(items)} items (with hop probes and general "
             f"questions) through vLLM")
    # Over-long prompts are not sent (runtime.generate checks the budget): they score as skipped.
    msgs = {it["item_id"]: student_messages(it["question"], it["choices"]) for it in items}
    gens = generate([{"key": i, "prompt": render_chat(m, tok), "messages": m} for i, m in msgs.items()],
                    model_path, cfg.generation, cfg.model, tokenizer=tok)
    scored = [score(it, gens[str(it["item_id"])]["text"], gens[str(it["item_id"])]["error"]) for it in items]
    if len(scored) != len(items):
        raise RuntimeError(f"evaluation lost items: {len(items)} in, {len(scored)} scored")
    scored.sort(key=lambda r: r["item_id"])
    held_out = [r for r in scored if r["kind"] == "general"]
    scored = [r for r in scored if r["kind"] != "general"]
    write_jsonl(out_dir / "predictions.jsonl", scored)
    metrics = with_linked(summarize(scored), scored, unlinked_ids(cfg.data))
    if general:
        write_jsonl(out_dir / PREDICTIONS, held_out)
        metrics["general"] = dict(summarize_general(held_out), source=cfg.general, file=str(general))
    metrics.update(label=label, model=cfg.model.name, data=cfg.data, seconds=time.perf_counter() - t0)
    write_json(out_dir / "metrics.json", metrics)
    progress(f"[eval:{label}] accuracy {metrics['accuracy']:.3f} (n={metrics['n_questions']}), "
             f"probe accuracy {metrics['probe_accuracy']:.3f}, known&incorrect {metrics['known_and_incorrect_rate']:.3f} "
             f"({metrics['seconds']:.0f}s)")
    if "linked" in metrics:
        lk = metrics["linked"]
        progress(f"[eval:{label}] {metrics['n_answer_unlinked']} questions' answers do not link to the KG; "
                 f"accuracy without them {lk['accuracy']:.3f} (n={lk['n_questions']})")
    if general:
        g = metrics["general"]
        progress(f"[eval:{label}] general questions ({cfg.general}): accuracy {g['accuracy']:.3f} (n={g['n']})")
    return metrics
