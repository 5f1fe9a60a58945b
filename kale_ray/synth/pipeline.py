"""KI synthesis on Ray Data: QA rows -> linking -> paths -> prompts -> teacher -> parse -> verify -> write.

Layout of ``out_dir``::

    qa/train.jsonl, qa/test.jsonl      the questions (generated once; reruns read them back)
    data/shard-00000.jsonl             kept rows (id, question, answer, question_entities,
                                       answer_entities, paths, rationale, teacher, ...)
    rejects/shard-00000.jsonl          rows aside, each with a ``reason``
    data/shard-00000.done              completion marker with the shard's counts
    summary.json                       rows in/out, rejected by reason, tokens, time per stage

Resume: rows are cut into fixed shards in question order. A shard is written atomically
(temp file + rename) and then marked done; a rerun skips done shards and redoes the rest,
so after a crash no row is lost and none is duplicated.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kale_ray.config import SynthConfig, dump_config
from kale_ray.core.kg import GraphIndex, KnowledgeGraph, load_kg
from kale_ray.core.prompts import render_chat
from kale_ray.core.qa import QAExample, generate_questions, read_qa_jsonl, split_questions, write_qa_jsonl
from kale_ray.core.rejects import Rejects
from kale_ray.synth import steps

SHARD_FMT = "shard-{:05d}"


@dataclass
class SynthSummary:
    rows_in: int = 0
    rows_out: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    teacher_rejected: dict[str, int] = field(default_factory=dict)  # teacher outputs replaced by the template
    teacher_counts: dict[str, int] = field(default_factory=dict)
    tokens_generated: int = 0
    shards_total: int = 0
    shards_skipped: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    qa: dict[str, Any] = field(default_factory=dict)
    kg: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return self.__dict__.copy()


# --------------------------------------------------------------------------- #
# Questions
# --------------------------------------------------------------------------- #
def prepare_questions(cfg: SynthConfig, kg: KnowledgeGraph, out_dir: Path, rejects: Rejects
                      ) -> tuple[list[QAExample], list[QAExample]]:
    """Generate (or load) the train/test questions once; reruns read the saved files back."""
    train_p, test_p = out_dir / "qa" / "train.jsonl", out_dir / "qa" / "test.jsonl"
    if train_p.exists() and test_p.exists():
        return list(read_qa_jsonl(train_p, rejects)), list(read_qa_jsonl(test_p, rejects))
    qa = cfg.qa
    if qa.source == "generate":
        questions = generate_questions(kg, qa.num_questions, qa.hops, qa.num_choices, qa.max_answers, qa.seed)
        train, test = split_questions(questions, qa.test_fraction, qa.seed)
    else:
        train = list(read_qa_jsonl(qa.source, rejects))
        test = list(read_qa_jsonl(qa.test_file, rejects)) if qa.test_file else []
    if cfg.max_rows:
        train = train[: cfg.max_rows]
    write_qa_jsonl(test, test_p)
    write_qa_jsonl(train, train_p)
    return train, test


# --------------------------------------------------------------------------- #
# Shards
# --------------------------------------------------------------------------- #
def _atomic_write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with tmp.open("w") as f:
            for r in rows:
                f.write(json.dumps(r, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written file behind
        raise


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def shard_done(out_dir: Path, shard: int) -> bool:
    return (out_dir / "data" / (SHARD_FMT.format(shard) + ".done")).exists()


def write_shard(out_dir: Path, shard: int, kept: list[dict], rejected: list[dict], teacher_rejected: list[dict]) -> dict:
    """Write a shard's files, then its marker. Raises a clear error if storage fails."""
    name = SHARD_FMT.format(shard)
    data_dir, rej_dir = out_dir / "data", out_dir / "rejects"
    counts = {
        "shard": shard, "kept": len(kept), "rejected": dict(Counter(r["reason"] for r in rejected)),
        "teacher_rejected": dict(Counter(r["reason"] for r in teacher_rejected)),
        "teachers": dict(Counter(r["teacher"] for r in kept)),
        "tokens": int(sum(int(r.get("gen_tokens") or 0) for r in kept)),
    }
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        rej_dir.mkdir(parents=True, exist_ok=True)
        kept = sorted(kept, key=lambda r: r["id"])
        _atomic_write_jsonl(rej_dir / f"{name}.jsonl", rejected + [dict(r, kept_with_fallback=True) for r in teacher_rejected])
        _atomic_write_jsonl(data_dir / f"{name}.jsonl", kept)
        marker = data_dir / f"{name}.done"
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps(counts))
        tmp.replace(marker)
        _fault_injection_point(shard)
    except OSError as e:
        raise OSError(f"could not write shard {name} under {out_dir}: {e.strerror or e}. "
                      f"Shards already marked done are intact; rerun to resume.") from e
    return counts


def _fault_injection_point(shard: int) -> None:
    """Tests only: with KALE_RAY_FAULT_PAUSE_AFTER_SHARD=N the driver stalls after shard N is
    marked done, so a test can SIGKILL the run at a known point (the kill itself is real)."""
    pause = os.environ.get("KALE_RAY_FAULT_PAUSE_AFTER_SHARD")
    if pause is not None and pause.strip().isdigit() and int(pause) == shard:
        time.sleep(3600)


def read_shard_counts(out_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out_dir / "data").glob("shard-*.done"))]


# --------------------------------------------------------------------------- #
# Ray Data stages
# --------------------------------------------------------------------------- #
_CTX_CACHE: dict[str, steps.SynthContext] = {}


def _search_batch(batch: dict[str, np.ndarray], kg_ref_holder: list, cfg_paths) -> dict[str, list]:
    """Ray Data map_batches fn: link + path search for a batch of QA rows (a CPU task)."""
    import ray

    key = kg_ref_holder[0].hex()
    ctx = _CTX_CACHE.get(key)
    if ctx is None:
        kg, index = ray.get(kg_ref_holder[0])
        ctx = steps.SynthContext(kg, index, cfg_paths)
        _CTX_CACHE.clear()
        _CTX_CACHE[key] = ctx
    rows = _batch_to_rows(batch)
    out = [steps.link_and_search(r, ctx) for r in rows]
    return _rows_to_batch(out)


def _batch_to_rows(batch: dict[str, Any]) -> list[dict]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: _py(batch[k][i]) for k in keys} for i in range(n)]


def _py(v):
    if isinstance(v, np.ndarray):
        return [_py(x) for x in v.tolist()] if v.dtype == object else v.tolist()
    if isinstance(v, list):
        return [_py(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v


def _rows_to_batch(rows: list[dict]) -> dict[str, list]:
    """Column-major batch; nested values are JSON text so Arrow never has to unify odd shapes."""
    cols: dict[str, list] = defaultdict(list)
    for r in rows:
        for k, v in r.items():
            cols[k].append(json.dumps(v) if isinstance(v, (list, dict)) else v)
    return {k: np.array(v, dtype=object) for k, v in cols.items()}


_JSON_COLS = ("choices", "all_answers", "question_entities", "answer_entities", "hops", "paths", "path_methods", "facts")


def _decode(row: dict) -> dict:
    row = {k: _py(v) for k, v in row.items()}
    for k in _JSON_COLS:
        if isinstance(row.get(k), str):
            row[k] = json.loads(row[k])
    return row


def _normalise_generation(row: dict) -> dict:
    """One row shape after the teacher, whether the engine succeeded or not."""
    err = row.pop("__inference_error__", "") or row.get("gen_error") or ""
    gen = row.get("generation")
    for k in ("prompt_token_ids", "batch_uuid", "sampling_params"):
        row.pop(k, None)
    row["generation"] = "" if gen is None else str(gen)
    row["gen_tokens"] = int(row.get("gen_tokens") or 0)
    row["prompt_tokens"] = int(row.get("prompt_tokens") or 0)
    row["gen_error"] = "" if err in (None, "None") else str(err)
    return row


class PromptRenderer:
    """Ray Data callable class: teacher messages -> the teacher's chat-templated prompt; flags over-long prompts."""

    def __init__(self, model_path: str, max_model_len: int, max_tokens: int, trust_remote_code: bool = False) -> None:
        from kale_ray.models import load_tokenizer

        self.tok = load_tokenizer(model_path, trust_remote_code)
        self.budget = max_model_len - max_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts, too_long, n_tokens = [], [], []
        for m in batch["teacher_messages"]:
            text = render_chat(json.loads(m), self.tok)
            n = len(self.tok(text, add_special_tokens=False)["input_ids"])
            prompts.append(text)
            n_tokens.append(n)
            too_long.append(n > self.budget)
        batch["prompt"] = np.array(prompts, dtype=object)
        batch["prompt_too_long"] = np.array(too_long)
        batch["prompt_tokens_est"] = np.array(n_tokens)
        return batch


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #
def run_synthesis(cfg: SynthConfig, progress: Callable[[str], None] = print) -> SynthSummary:
    """Run (or resume) a synthesis job. Ray must be initialised (``ray.init``) by the caller."""
    import ray

    t_all = time.perf_counter()
    out_dir = Path(cfg.out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out_dir / "config.yaml")
    summary = SynthSummary()
    times = summary.seconds

    t = time.perf_counter()
    kg = load_kg(cfg.kg.source, cfg.kg.names, cfg.kg.on_error)
    index = GraphIndex.from_kg(kg, undirected=cfg.kg.undirected_search)
    kg.rejects.write_jsonl(out_dir / "rejects" / "kg_lines.jsonl")
    summary.kg = kg.summary()
    times["load_kg"] = time.perf_counter() - t
    progress(f"[synth] KG {kg.source}: {kg.num_entities} entities, {kg.num_relations} relations, "
             f"{len(kg.triples)} triples; rejected lines: {kg.rejects.counts() or 0}")

    t = time.perf_counter()
    qa_rejects = Rejects()
    train_q, test_q = prepare_questions(cfg, kg, out_dir, qa_rejects)
    if qa_rejects.total():
        qa_rejects.write_jsonl(out_dir / "rejects" / "qa_lines.jsonl")
    summary.qa = {"train": len(train_q), "test": len(test_q), "rejected_lines": qa_rejects.counts(),
                  "train_by_hops": dict(Counter(str(q.num_hops) for q in train_q)),
                  "test_by_hops": dict(Counter(str(q.num_hops) for q in test_q))}
    times["questions"] = time.perf_counter() - t
    progress(f"[synth] questions: {len(train_q)} train (to synthesise), {len(test_q)} held-out test")

    n_shards = (len(train_q) + cfg.shard_size - 1) // cfg.shard_size
    summary.shards_total = n_shards
    pending = [s for s in range(n_shards) if not shard_done(out_dir, s)]
    summary.shards_skipped = n_shards - len(pending)
    if summary.shards_skipped:
        progress(f"[synth] resuming: {summary.shards_skipped}/{n_shards} shards already done")

    rows: list[dict] = []
    for s in pending:
        for ex in train_q[s * cfg.shard_size: (s + 1) * cfg.shard_size]:
            rows.append(dict(steps.qa_row(ex), shard=s))
    expected = Counter(r["shard"] for r in rows)

    if rows:
        _run_pending(cfg, kg, index, rows, expected, out_dir, summary, progress)

    # Totals over all shards (including ones done by an earlier run).
    totals_rej, totals_teacher, teachers, kept, tokens = Counter(), Counter(), Counter(), 0, 0
    for c in read_shard_counts(out_dir):
        totals_rej.update(c["rejected"])
        totals_teacher.update(c["teacher_rejected"])
        teachers.update(c["teachers"])
        kept += c["kept"]
        tokens += c["tokens"]
    summary.rows_in = len(train_q)
    summary.rows_out = kept
    summary.rejected = dict(totals_rej)
    summary.teacher_rejected = dict(totals_teacher)
    summary.teacher_counts = dict(teachers)
    summary.tokens_generated = tokens
    times["total"] = time.perf_counter() - t_all
    (out_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    progress(f"[synth] done: {summary.rows_in} in, {summary.rows_out} out, rejected {summary.rejected or 0}; "
             f"teacher outputs replaced by template: {summary.teacher_rejected or 0}; "
             f"{tokens} tokens generated; {times['total']:.1f}s")
    if summary.rows_in != summary.rows_out + sum(summary.rejected.values()):
        raise RuntimeError(f"row accounting mismatch: in={summary.rows_in} out={summary.rows_out} "
                           f"rejected={summary.rejected}")
    return summary


def _run_pending(cfg: SynthConfig, kg: KnowledgeGraph, index: GraphIndex, rows: list[dict], expected: Counter,
                 out_dir: Path, summary: SynthSummary, progress) -> None:
    import ray

    times = summary.seconds
    kg_ref = ray.put((kg, index))  # one copy in the object store, shared by every search task

    # Stage 1: linking + path search as CPU tasks.
    t = time.perf_counter()
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(64, len(rows) // 16)))
    searched = ds.map_batches(_search_batch, batch_size=32, batch_format="numpy",
                              fn_kwargs={"kg_ref_holder": [kg_ref], "cfg_paths": cfg.paths}).materialize()
    times["link_and_paths"] = time.perf_counter() - t
    progress(f"[synth] linking + path search: {searched.count()} rows in {times['link_and_paths']:.1f}s")

    buffers: dict[int, dict[str, list]] = defaultdict(lambda: {"kept": [], "rejected": [], "teacher": []})
    written: set[int] = set()

    def account(shard: int) -> None:
        b = buffers[shard]
        if len(b["kept"]) + len(b["rejected"]) == expected[shard] and shard not in written:
            write_shard(out_dir, shard, b["kept"], b["rejected"], b["teacher"])
            written.add(shard)
            progress(f"[synth] shard {shard}: {len(b['kept'])} kept, {len(b['rejected'])} rejected")
            del buffers[shard]

    backend = cfg.generation.backend
    t = time.perf_counter()
    ok_rows = []
    for row in searched.iter_rows():
        row = _decode(row)
        if row["reject_reason"]:
            buffers[row["shard"]]["rejected"].append(steps.reject_record(row))
            account(row["shard"])
        else:
            ok_rows.append(row)
    if backend == "template":
        gen_rows = iter(ok_rows)
    elif backend in ("vllm", "http"):
        for row in [r for r in ok_rows if int(r.get("num_hops") or 0) < cfg.teacher_min_hops and r.get("num_hops")]:
            kept, _ = steps.finish_row(row, kg, "template", False)
            buffers[row["shard"]]["kept"].append(kept)
            account(row["shard"])
        ok_rows = [r for r in ok_rows if not (int(r.get("num_hops") or 0) < cfg.teacher_min_hops and r.get("num_hops"))]
        gen_rows = _teacher_stage(cfg, ok_rows, out_dir, progress, buffers, account)
    else:
        raise ValueError(f"generation.backend: unknown backend {backend!r} (vllm, http, template)")

    for row in gen_rows:
        kept, reject = steps.finish_row(row, kg, backend if backend != "vllm" else f"vllm:{_model_label(cfg)}",
                                        cfg.fallback_to_template, cfg.min_path_coverage)
        shard = row["shard"]
        if kept is not None:
            buffers[shard]["kept"].append(kept)
            if reject is not None:
                buffers[shard]["teacher"].append(reject)
        else:
            buffers[shard]["rejected"].append(reject)
        account(shard)
    times["teacher_and_verify"] = time.perf_counter() - t
    missing = {s: expected[s] - len(b["kept"]) - len(b["rejected"]) for s, b in buffers.items()}
    if any(missing.values()):
        raise RuntimeError(f"rows missing after the pipeline, by shard: {missing}")


def _model_label(cfg: SynthConfig) -> str:
    return cfg.teacher.name.replace("builtin:", "")


def _teacher_stage(cfg: SynthConfig, ok_rows: list[dict], out_dir: Path, progress, buffers, account):
    """Yield rows with ``generation`` filled by the vLLM or HTTP teacher."""
    import ray

    from kale_ray.llm import HttpGenerator, build_vllm_processor
    from kale_ray.models import resolve_model

    gen = cfg.generation
    if not ok_rows:
        return
    # Rows leave the teacher in input order, so shards complete one after another and a
    # crash loses at most the shards in flight.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    items = [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()} for r in ok_rows]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(64, len(items) // max(1, gen.batch_size))))
    if gen.backend == "vllm":
        model_path = resolve_model(cfg.teacher.name, cfg.teacher.cache_dir)
        ds = ds.map_batches(PromptRenderer, fn_constructor_args=(model_path, cfg.teacher.max_model_len, gen.max_tokens,
                                                                 cfg.teacher.trust_remote_code),
                            batch_size=64, concurrency=1, batch_format="numpy")
        ds = ds.materialize()
        too_long = ds.filter(lambda r: bool(r["prompt_too_long"]))
        for row in too_long.iter_rows():
            row = _decode(row)
            row["reject_reason"] = "prompt_too_long"
            row["reject_detail"] = (f"teacher prompt has {row['prompt_tokens_est']} tokens; budget "
                                    f"{cfg.teacher.max_model_len} - max_tokens {gen.max_tokens}")
            buffers[row["shard"]]["rejected"].append(steps.reject_record(row))
            account(row["shard"])
        fits = ds.filter(lambda r: not bool(r["prompt_too_long"]))
        processor = build_vllm_processor(model_path, gen, cfg.teacher.max_model_len, cfg.teacher.trust_remote_code)
        out = processor(fits)
    else:
        ds = ds.map(lambda r: dict(r, messages_json=r["teacher_messages"]))
        out = ds.map_batches(HttpGenerator, fn_constructor_args=(gen, cfg.teacher.name), batch_size=gen.batch_size,
                             concurrency=_pool(gen), batch_format="numpy")
    n = 0
    for row in out.iter_rows():
        n += 1
        yield _normalise_generation(_decode(row))
    progress(f"[synth] teacher ({gen.backend}) generated for {n} rows")


def _pool(gen):
    return (gen.concurrency, gen.max_concurrency) if gen.max_concurrency > gen.concurrency else gen.concurrency
