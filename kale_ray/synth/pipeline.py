"""KI synthesis as one streaming Ray Data job: QA lines -> link -> paths -> prompts -> teacher -> parse/verify -> write.

No row passes through the driver. The driver plans shards (byte ranges of the question file,
``shard_size`` lines each, found in one constant-memory scan), puts the KG's arrays in the object
store once, and streams shard descriptors through Ray Data. Workers read their lines, link,
search, and write; the driver only sees per-shard counts.

Layout of ``out_dir`` (a local folder or a storage URI, see kale_ray.runtime.storage)::

    stages/synthesis.json              the settings behind these outputs (a rerun with others is refused)
    qa/train.jsonl, qa/test.jsonl      generated questions (qa.source=generate); a user's file is read in place
    qa/source.jsonl, qa/source.json    a qa.source that is not our JSONL (Parquet, CSV, datasets), converted once
    data/shard-00000.jsonl             kept rows (id, question, answer, question_entities, answer_entities,
                                       paths, rationale, teacher, ...)
    data/shard-00000.done              completion marker with the shard's counts
    rejects/shard-00000.jsonl          rows aside, each with a ``reason`` (``duplicate_id``: file, line, first_line)
    rejects/qa_lines.jsonl, kg_lines.jsonl   malformed input lines (file, line, reason)
    work/                              teacher stage in flight (per-shard inputs and parts); gone when done
    qa/questions.json                  what qa.source=generate asked for and got, by hop count and split
    summary.json                       rows in/out, rejected by reason, tokens, time per stage, teacher_share,
                                       warnings (a small test split, fewer questions than asked, ...)

Exactly once: a shard's files are written atomically, then its marker; a rerun skips marked
shards and redoes the rest. Teacher outputs are written in parts named by a hash of their row
ids (a retried task rewrites the same part) and merged into the shard by id.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kale_ray.config import SynthConfig, to_dict
from kale_ray.core.kg import GraphIndex, load_kg
from kale_ray.core.prompts import render_chat
from kale_ray.core import qa_formats
from kale_ray.core.qa import generate_questions, line_offsets, read_qa_jsonl, split_questions
from kale_ray.core.rejects import Rejects
from kale_ray.runtime.generate import row_error, use_ray
from kale_ray.runtime.stages import Stage, file_identity, without
from kale_ray.runtime.storage import Storage
from kale_ray.synth import steps
from kale_ray.synth.ids import duplicate_id_lines, dups_by_shard
from kale_ray.synth.qa_source import CONVERTED_QA, convert_qa_source, qa_source_kind, read_test_file, tree_identity

SHARD_FMT = "shard-{:05d}"

# Settings that change how fast a run goes, not what it writes.
_NOT_OUTPUT_SETTINGS = ("out_dir", "on_change", "search_workers", "search_shards_per_task", "generation.batch_size", "generation.concurrency",
                        "generation.max_concurrency", "generation.http_timeout_s", "generation.num_gpus_per_replica",
                        "generation.gpu_memory_utilization", "generation.tensor_parallel_size",
                        "generation.pipeline_parallel_size", "teacher.cache_dir", "tracking",
                        "max_teacher_failure_rate", "teacher_failure_min_rows")

# A test split smaller than this gives accuracies too noisy to compare (a warning, not an error).
MIN_TEST_QUESTIONS = 30


class TeacherFailureError(RuntimeError):
    """More than ``max_teacher_failure_rate`` of the teacher rows failed: the run stopped early.

    Shards already finished stay valid (a rerun resumes); the message has the count, the most
    common reasons, a sample error and how to continue. The CLI prints it as one line (exit 2).
    """


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
    paths: dict[str, Any] = field(default_factory=dict)
    teacher_share: float = 0.0  # kept rows whose rationale the teacher wrote (not the template, not its fallback)
    teacher_failures: dict[str, int] = field(default_factory=dict)  # teacher rows tried / failed, all shards
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return self.__dict__.copy()


STAGE_OUTPUTS = ("qa/train.jsonl", "summary.json")  # an earlier run's, even one without a settings record


def synthesis_settings(cfg: SynthConfig) -> dict:
    """What decides this job's outputs: the config (minus speed knobs) and its input files' identity."""
    s = without(to_dict(cfg), _NOT_OUTPUT_SETTINGS)
    inputs = {}
    for key, src in (("kg", cfg.kg.source), ("kg_names", cfg.kg.names), ("qa", cfg.qa.source), ("qa_test", cfg.qa.test_file)):
        if src and not src.startswith("builtin:") and src != "generate":
            inputs[key] = tree_identity(src) if key in ("qa", "qa_test") else file_identity(src)
    if any(src and src != "generate" and qa_source_kind(src) != "jsonl" for src in (cfg.qa.source, cfg.qa.test_file)):
        inputs["qa_conversion"] = qa_formats.VERSION  # how its rows become ours (qa/source.jsonl)
    s["inputs"] = inputs
    return s


# --------------------------------------------------------------------------- #
# The KG, shared
# --------------------------------------------------------------------------- #
def _columnar():
    try:
        from kale_ray.core import kgstore
        return kgstore
    except ImportError:  # pragma: no cover - the store ships with the package
        return None


def load_shared_kg(cfg: SynthConfig):
    """(kg, index, kg_for_questions): the columnar KG (cached on disk) when available."""
    kgstore = _columnar()
    if cfg.qa.source == "generate" or kgstore is None:
        kg = load_kg(cfg.kg.source, cfg.kg.names, cfg.kg.on_error)
        ckg = kgstore.ColumnarKG.from_kg(kg, undirected=cfg.kg.undirected_search) if kgstore else kg
        return ckg, kg
    args = (cfg.kg.source, cfg.kg.names, cfg.kg.on_error)
    if kgstore.cached_path(*args, undirected=cfg.kg.undirected_search) is None and use_ray("auto"):
        # First run on this KG: build the cache in a task on this node, so the driver's own memory
        # stays that of a coordinator (the build peaks at several times the arrays' size).
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        build = ray.remote(num_cpus=1, max_retries=0, scheduling_strategy=here)(_build_cache)
        try:
            ray.get(build.remote(*args, cfg.kg.undirected_search, os.environ.get("KALE_RAY_CACHE")))
        except ray.exceptions.RayTaskError as e:  # a bad line, a missing file: the error itself, in one line
            if isinstance(getattr(e, "cause", None), Exception):
                raise e.cause from None
            raise
    ckg = kgstore.load_columnar_kg(*args, undirected=cfg.kg.undirected_search)
    if cfg.paths.heuristic == "landmark" and cfg.paths.landmarks == "table":
        ckg = kgstore.ensure_landmarks(ckg)  # once per graph, into its cache folder (shared by the workers)
    return ckg, None


def _build_cache(source, names, on_error, undirected, cache_root) -> str:
    if cache_root:  # the driver's cache, whatever the worker's environment says
        os.environ["KALE_RAY_CACHE"] = cache_root
    from kale_ray.core import kgstore

    return kgstore.load_columnar_kg(source, names, on_error, undirected=undirected).path


def _share(kg, cfg: SynthConfig) -> Any:
    """What goes to the object store.

    A KG memory-mapped from its on-disk cache travels as its folder (a few hundred bytes): every
    worker maps the same files, so the node's page cache holds one copy and the driver never reads
    the arrays. A worker on a node without that folder builds (once per node) from the source files
    into its own cache. Any other KG travels as its arrays (zero-copy on every worker of a node).
    """
    if getattr(kg, "path", None):
        return {"path": kg.path, "source": cfg.kg.source, "names": cfg.kg.names, "on_error": cfg.kg.on_error,
                "undirected": cfg.kg.undirected_search}
    return kg.to_arrays() if hasattr(kg, "to_arrays") else (kg, GraphIndex.from_kg(kg))


def _open_shared(handle: dict):
    kgstore = _columnar()
    if Path(handle["path"], "meta.json").exists():
        try:
            return kgstore.ColumnarKG.open(handle["path"])
        except (OSError, ValueError):
            pass  # replaced or removed under us: rebuild below
    return kgstore.load_columnar_kg(handle["source"], handle["names"], handle["on_error"],
                                    undirected=handle["undirected"])


_CTX: dict[str, steps.SynthContext] = {}


def _context(kg_holder: list, cfg: SynthConfig) -> steps.SynthContext:
    """One SynthContext per worker process, over the shared arrays (built once, reused by later tasks)."""
    import ray

    key = kg_holder[0].hex()
    ctx = _CTX.get(key)
    if ctx is None:
        shared = ray.get(kg_holder[0])
        kgstore = _columnar()
        if isinstance(shared, dict) and "path" in shared:
            kg = _open_shared(shared)
            ctx = steps.SynthContext(kg, kg.index(cfg.kg.undirected_search), cfg.paths, linker=kgstore.ColumnarLinker(kg))
        elif isinstance(shared, tuple) and len(shared) == 2 and isinstance(shared[0], dict):
            kg = kgstore.ColumnarKG.from_arrays(*shared)
            ctx = steps.SynthContext(kg, kg.index(cfg.kg.undirected_search), cfg.paths, linker=kgstore.ColumnarLinker(kg))
        else:
            kg, index = shared
            ctx = steps.SynthContext(kg, index, cfg.paths)
        _CTX.clear()
        _CTX[key] = ctx
    return ctx


# --------------------------------------------------------------------------- #
# Shards
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ShardJob:
    """What every shard task needs besides its descriptor (small, pickled once per task)."""

    cfg: SynthConfig
    storage: Storage
    qa_path: str
    teacher_label: str
    kg_holder: list  # [ObjectRef of the shared KG] (a list, so Ray passes the ref, not the value)
    qa_rel: str = ""  # the question file inside ``storage`` when that is not local (copied once per node)

    def questions(self) -> str:
        if not self.qa_rel:
            return self.qa_path
        if self.qa_rel not in _QA_COPIES:
            _QA_COPIES[self.qa_rel] = _local_copy(self.storage, self.qa_rel)
        return _QA_COPIES[self.qa_rel]


_QA_COPIES: dict[str, str] = {}


def shard_name(shard: int) -> str:
    return SHARD_FMT.format(shard)


def write_shard(storage: Storage, shard: int, kept: list[dict], rejected: list[dict], teacher_rejected: list[dict],
                extra: dict | None = None) -> dict:
    """Write a shard's rows, then its marker. Raises a clear error if storage fails."""
    name = shard_name(shard)
    kept = sorted(kept, key=lambda r: r["id"])
    counts = {
        "shard": shard, "kept": len(kept), "rejected": dict(Counter(r["reason"] for r in rejected)),
        "teacher_rejected": dict(Counter(r["reason"] for r in teacher_rejected)),
        "teachers": dict(Counter(r["teacher"] for r in kept)),
        "tokens": int(sum(int(r.get("gen_tokens") or 0) for r in kept)),
        "by_hops": dict(Counter(str(r.get("num_hops") or 0) for r in kept)),
        "follows_question": dict(Counter(str(r.get("num_hops") or 0) for r in kept if r.get("path_follows_question"))),
        **(extra or {}),
    }
    try:
        storage.write_jsonl_atomic(f"rejects/{name}.jsonl",
                                   rejected + [dict(r, kept_with_fallback=True) for r in teacher_rejected])
        storage.write_jsonl_atomic(f"data/{name}.jsonl", kept)
        storage.write_atomic(f"data/{name}.done", json.dumps(counts))
    except OSError as e:
        raise OSError(f"could not write shard {name} under {storage.uri}: {e.strerror or e}. "
                      f"Shards already marked done are intact; rerun to resume.") from e
    return counts


def shards_per_task(shards: int, workers: int, setting: int = 0) -> int:
    """Shards a path-search task takes: ``setting`` if > 0, else enough tasks for about 8 per worker
    (load balance, and room for nodes that join mid-run), at most 16 shards a task (a task per shard
    pays a scheduling round trip each: on 2 cores with 256-row shards the workers sat idle half the time)."""
    if setting > 0:
        return setting
    return max(1, min(16, shards // max(1, 8 * workers)))


def _search_batch(batch: dict[str, np.ndarray], kg_holder: list, job: ShardJob) -> dict[str, np.ndarray]:
    """Ray Data task: shard descriptors in; for each, read its lines, link, search, write; counts out."""
    t0 = time.perf_counter()
    ctx = _context(kg_holder, job.cfg)
    setup = time.perf_counter() - t0
    outs = []
    for i in range(len(batch["shard"])):
        desc = {k: int(batch[k][i]) for k in ("shard", "start", "end", "first_line")}
        if "dups" in batch:
            desc["dups"] = str(batch["dups"][i])
        t, c = time.perf_counter(), time.process_time()
        counts = _search_shard(desc, ctx, job)
        # Where a task's time goes (summary.json "seconds": search_tasks_*): the pipeline's overhead
        # is its wall time minus these.
        counts["task_seconds"] = {"wall": time.perf_counter() - t, "cpu": time.process_time() - c,
                                  "setup": setup if i == 0 else 0.0}
        counts["task_span"] = [time.time() - (time.perf_counter() - t), time.time()]  # wall clock, for the timeline
        outs.append(json.dumps(counts))
    return {"counts": np.array(outs, dtype=object)}


def _search_shard(desc: dict, ctx: steps.SynthContext, job: ShardJob) -> dict:
    cfg, storage, shard = job.cfg, job.storage, desc["shard"]
    name = shard_name(shard)
    qa_rej = Rejects()
    examples = list(read_qa_jsonl(job.questions(), qa_rej, byte_range=(desc["start"], desc["end"]),
                                  first_line=desc["first_line"]))
    if qa_rej.total():
        storage.write_jsonl_atomic(f"rejects/qa_lines/{name}.jsonl", qa_rej.rows)
    kept, rejected, to_teacher = [], [], []
    template = cfg.generation.backend == "template"
    dup = _DuplicateLines(desc.get("dups"), qa_rej)
    for ex in examples:
        first, line = dup.check(ex.id)
        if first:
            rejected.append(steps.duplicate_id_record(steps.qa_row(ex), _qa_file(cfg), line, first))
            continue
        row = steps.link_and_search(dict(steps.qa_row(ex), shard=shard), ctx)
        if row["reject_reason"]:
            rejected.append(steps.reject_record(row))
        elif template or (row.get("num_hops") and int(row["num_hops"]) < cfg.teacher_min_hops):
            kept.append(_with_path_flags(steps.finish_row(row, ctx.kg, "template", False)[0], row))
        else:
            to_teacher.append(row)
    extra = {"rows_in": len(examples), "qa_rejected": qa_rej.counts(), "hops_in": dict(Counter(str(ex.num_hops) for ex in examples))}
    if not to_teacher:
        return write_shard(storage, shard, kept, rejected, [], extra)
    # The teacher stage picks these up; the rows already final wait beside them.
    storage.write_jsonl_atomic(f"work/{name}/final.jsonl", [{"kept": r} for r in kept] + [{"reject": r} for r in rejected])
    storage.write_jsonl_atomic(f"work/{name}/teacher_in.jsonl", to_teacher)
    counts = dict(extra, shard=shard, to_teacher=len(to_teacher), final=False)
    storage.write_atomic(f"work/{name}/searched.done", json.dumps(counts))
    return counts


class _DuplicateLines:
    """Which of a shard's rows reuse an id that an earlier line of the file carries.

    ``dups`` (from the driver's scan, :func:`duplicate_id_lines`): ``{id: [first_line, [lines of
    this shard carrying it]]}``. The reader yields rows in line order without their numbers; the
    lines it rejected are taken out, so the k-th row with an id is the k-th remaining line with it.
    """

    def __init__(self, dups: str | None, qa_rej: Rejects) -> None:
        info = json.loads(dups) if dups else {}
        bad = {int(r.get("line") or 0) for r in qa_rej.rows} if info else set()
        self.first = {i: int(f) for i, (f, _) in info.items()}
        self.lines = {i: [int(x) for x in ls if int(x) not in bad] for i, (_, ls) in info.items()}

    def check(self, rid: str) -> tuple[int, int]:
        """(first line, this row's line) when this row is a duplicate, else (0, 0)."""
        queue = self.lines.get(rid)
        if not queue:
            return 0, 0
        line = queue.pop(0)
        return (self.first[rid], line) if line != self.first[rid] else (0, 0)


def _qa_file(cfg: SynthConfig) -> str:
    return "qa/train.jsonl" if cfg.qa.source == "generate" else cfg.qa.source


def _with_path_flags(kept: dict, row: dict) -> dict:
    for k in ("path_follows_question", "path_methods"):
        if k in row:
            kept[k] = row[k]
    return kept


# --------------------------------------------------------------------------- #
# Teacher stage (vLLM / HTTP)
# --------------------------------------------------------------------------- #
class PromptRenderer:
    """Ray Data callable class: teacher messages -> the teacher's chat-templated prompt; flags over-long prompts.

    An over-long prompt is replaced by a one-word stub so that it never reaches the engine's
    context limit; the finish step rejects the row as ``prompt_too_long`` whatever comes back.
    """

    def __init__(self, model_path: str, max_model_len: int, max_tokens: int, trust_remote_code: bool = False) -> None:
        from kale_ray.models import load_tokenizer

        self.tok = load_tokenizer(model_path, trust_remote_code)
        self.budget = max_model_len - max_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts, too_long, n_tokens = [], [], []
        for m in batch["teacher_messages"]:
            text = render_chat(json.loads(m), self.tok)
            n = len(self.tok(text, add_special_tokens=False)["input_ids"])
            prompts.append(text if n <= self.budget else "Hi")
            n_tokens.append(n)
            too_long.append(n > self.budget)
        batch["prompt"] = np.array(prompts, dtype=object)
        batch["prompt_too_long"] = np.array(too_long)
        batch["prompt_tokens_est"] = np.array(n_tokens)
        return batch


def _teacher_row(row: dict) -> dict:
    """A teacher-stage input line -> the columns the engines need (the row itself travels as JSON text)."""
    r = json.loads(row["text"])
    return {"shard": int(r["shard"]), "row_json": row["text"], "teacher_messages": r["teacher_messages"],
            "messages_json": r["teacher_messages"]}


def _finish_batch(batch: dict[str, np.ndarray], job: ShardJob) -> dict[str, np.ndarray]:
    """Ray Data task: parse + verify each generation, write one part file per shard; counts out."""
    cfg, storage = job.cfg, job.storage
    kg = _context(job.kg_holder, cfg).kg  # names for the grounding check, from the same shared arrays
    by_shard: dict[int, list[dict]] = {}
    tally: dict[int, _Tally] = {}
    n = len(batch["row_json"])
    for i in range(n):
        row = json.loads(batch["row_json"][i])
        gen = batch["generation"][i] if "generation" in batch else ""
        err = batch["gen_error"][i] if "gen_error" in batch else ""
        row["generation"] = "" if gen is None else str(gen)
        row["gen_error"] = row_error({"gen_error": err})
        row["gen_tokens"] = int(batch["gen_tokens"][i]) if "gen_tokens" in batch else 0
        if "prompt_too_long" in batch and bool(batch["prompt_too_long"][i]):
            row["reject_reason"] = "prompt_too_long"
            row["reject_detail"] = (f"teacher prompt has {int(batch['prompt_tokens_est'][i])} tokens; budget "
                                    f"{cfg.teacher.max_model_len} - max_tokens {cfg.generation.max_tokens}")
            rec = {"reject": steps.reject_record(row)}
        else:
            kept, reject = steps.finish_row(row, kg, job.teacher_label, cfg.fallback_to_template, cfg.min_path_coverage)
            rec = {}
            if kept is not None:
                rec["kept"] = _with_path_flags(kept, row)
                if reject is not None:
                    rec["teacher_reject"] = reject
            else:
                rec["reject"] = reject
            tally.setdefault(int(row["shard"]), _Tally()).add(reject)
        by_shard.setdefault(int(row["shard"]), []).append(rec)
    out: dict[str, list] = {k: [] for k in ("shard", "part", "n", "tried", "failed", "reasons", "sample")}
    for shard, recs in by_shard.items():
        ids = sorted(_rec_id(r) for r in recs)
        part = "part-" + hashlib.blake2b("\n".join(ids).encode(), digest_size=8).hexdigest()
        storage.write_jsonl_atomic(f"work/{shard_name(shard)}/{part}.jsonl", recs)
        t = tally.get(shard, _Tally())
        for k, v in (("shard", shard), ("part", part), ("n", len(recs)), ("tried", t.tried), ("failed", t.failed),
                     ("reasons", json.dumps(t.reasons)), ("sample", t.sample)):
            out[k].append(v)
    return {k: np.array(v, dtype=np.int64 if k in ("shard", "n", "tried", "failed") else object) for k, v in out.items()}


class _Tally:
    """Teacher rows tried and failed (a generation error, or an output rejected: replaced by the template,
    or rejected without fallback), the failures by reason and one sample error. Over-long prompts,
    which never reach the teacher, are not counted."""

    def __init__(self) -> None:
        self.tried = self.failed = 0
        self.reasons: Counter = Counter()
        self.sample = ""

    def add(self, reject: dict | None) -> None:
        self.tried += 1
        if reject is not None:
            self.failed += 1
            self.reasons[steps.teacher_failure_reason(reject)] += 1
            if not self.sample:
                self.sample = " ".join(str(reject.get("detail") or reject.get("reason") or "").split())[:300]

    def merge(self, tried: int, failed: int, reasons: dict, sample: str) -> None:
        self.tried += tried
        self.failed += failed
        self.reasons.update(reasons)
        self.sample = self.sample or sample

    def exceeded(self, cfg: SynthConfig) -> bool:
        return self.tried >= cfg.teacher_failure_min_rows and self.failed > cfg.max_teacher_failure_rate * self.tried

    def message(self, cfg: SynthConfig, shards_done: int, shards_total: int) -> str:
        gen = cfg.generation
        top = ", ".join(f"{r} x{c}" for r, c in self.reasons.most_common(3))
        fix = f" (generation.http_base_url={gen.http_base_url})" if gen.backend == "http" else ""
        kept = "keep the template rationale" if cfg.fallback_to_template else "are rejected"
        return (f"the teacher ({_teacher_label(cfg)}) failed on {self.failed} of {self.tried} rows tried "
                f"({self.failed / self.tried:.0%}, over max_teacher_failure_rate={cfg.max_teacher_failure_rate:g}); "
                f"most common: {top}; sample error: {self.sample!r}. Stopped early: the {shards_done} of "
                f"{shards_total} shards already finished stay valid and a rerun resumes. To continue: fix the "
                f"teacher{fix}, or accept more failures with max_teacher_failure_rate=1.0 (failed rows {kept}), "
                f"or use the template rationale on purpose with generation.backend=template "
                f"(in a new out_dir, or with on_change=overwrite).")


def _rec_id(rec: dict) -> str:
    return str((rec.get("kept") or rec.get("reject"))["id"])


def finalize_shard(storage: Storage, shard: int, expected: int) -> dict:
    """Merge a shard's teacher parts (deduplicated by row id) with its final rows; write it and its marker."""
    name = shard_name(shard)
    seen: set[str] = set()
    kept, rejected, teacher_rej = [], [], []
    counts = json.loads(storage.read_text(f"work/{name}/searched.done"))
    for rec in storage.read_jsonl(f"work/{name}/final.jsonl"):
        (kept if "kept" in rec else rejected).append(rec.get("kept") or rec.get("reject"))
    n = tried = failed = 0
    for part in storage.list(f"work/{name}", suffix=".jsonl"):
        if not part.startswith("part-"):
            continue
        for rec in storage.read_jsonl(f"work/{name}/{part}"):
            rid = _rec_id(rec)
            if rid in seen:  # a part written twice by a retried task: the same rows
                continue
            seen.add(rid)
            n += 1
            if "kept" in rec:
                kept.append(rec["kept"])
                tried += 1
                if "teacher_reject" in rec:
                    teacher_rej.append(rec["teacher_reject"])
                    failed += 1
            else:
                rejected.append(rec["reject"])
                if rec["reject"].get("reason") != "prompt_too_long":  # never reached the teacher
                    tried += 1
                    failed += 1
    if n != expected:
        raise RuntimeError(f"shard {name}: {n} teacher rows on storage, expected {expected}")
    extra = {k: counts[k] for k in ("rows_in", "qa_rejected", "hops_in") if k in counts}
    extra.update(teacher_tried=tried, teacher_failed=failed)
    out = write_shard(storage, shard, kept, rejected, teacher_rej, extra)
    for f in storage.list(f"work/{name}"):
        storage.delete(f"work/{name}/{f}")
    return out


def _on_shard_done(shard: int, counts: dict) -> None:
    """Called in the driver after each shard is marked done (tests plug in here)."""


def _model_label(cfg: SynthConfig) -> str:
    return cfg.teacher.name.replace("builtin:", "")


# --------------------------------------------------------------------------- #
# Questions
# --------------------------------------------------------------------------- #
def prepare_questions(cfg: SynthConfig, kg, storage: Storage, link_kg=None) -> tuple[str, dict]:
    """The question file the shards read, and what is known about the split up front.

    ``qa.source=generate``: questions are generated once into ``qa/train.jsonl`` and
    ``qa/test.jsonl`` (the stage's settings guard them), with what was asked for and what came
    out by hop count and split in ``qa/questions.json``. A user's file is read in place; its
    held-out file is copied to ``qa/test.jsonl`` line by line, each row marked ``answer_linked``
    (false: its answer names no entity of ``link_kg``, default ``kg``; kept, so that evaluation
    can report accuracy with and without those rows).
    """
    qa = cfg.qa
    info: dict[str, Any] = {}
    if qa.source == "generate":
        if not (storage.exists("qa/train.jsonl") and storage.exists("qa/test.jsonl")):
            questions = generate_questions(kg, qa.num_questions, qa.hops, qa.num_choices, qa.max_answers, qa.seed,
                                           **qa.generator_options())
            train, test = split_questions(questions, qa.test_fraction, qa.seed)
            if cfg.max_rows:
                train = train[: cfg.max_rows]
            storage.write_jsonl_atomic("qa/test.jsonl", [q.to_dict() for q in test])
            storage.write_atomic("qa/questions.json", json.dumps({
                "requested": qa.num_questions, "hops_requested": list(qa.hops), "generated": len(questions),
                "generated_by_hops": _by_hops(questions), "train_by_hops": _by_hops(train)}))
            storage.write_jsonl_atomic("qa/train.jsonl", [q.to_dict() for q in train])
        src = _local_copy(storage, "qa/train.jsonl")
        if storage.exists("qa/questions.json"):
            info.update(json.loads(storage.read_text("qa/questions.json")))
        info.update(_test_info(storage))
        return src, info
    src = str(Path(qa.source).expanduser())
    if not Path(src).exists():
        raise FileNotFoundError(f"QA file not found: {src}")
    converted = convert_qa_source(cfg, storage)  # None: our JSONL, read in place
    if converted is not None:
        src = _local_copy(storage, CONVERTED_QA)
        info.update(converted)
    if qa.test_file and not storage.exists("qa/test.jsonl"):
        rej = Rejects()
        linker = _linker(link_kg if link_kg is not None else kg)
        test = [dict(q.to_dict(), answer_linked=steps.answer_linked(q, linker)) for q in read_test_file(cfg, rej)]
        storage.write_jsonl_atomic("qa/test.jsonl", test)
        if rej.total():
            storage.write_jsonl_atomic("rejects/qa_test_lines.jsonl", rej.rows)
    info.update(_test_info(storage))
    return src, info


def _by_hops(questions) -> dict[str, int]:
    return {str(h): c for h, c in sorted(Counter(int(q.num_hops) for q in questions).items())}


def _test_info(storage: Storage) -> dict:
    """The test split as written: size, by hop count, rows whose answer does not link to the KG."""
    if not storage.exists("qa/test.jsonl"):
        return {"test": 0, "test_by_hops": {}, "test_unlinked": 0}
    n, unlinked, hops = 0, 0, Counter()
    for r in storage.read_jsonl("qa/test.jsonl"):
        n += 1
        unlinked += r.get("answer_linked") is False
        hops[int(r.get("num_hops") or 0)] += 1
    return {"test": n, "test_by_hops": {str(h): c for h, c in sorted(hops.items())}, "test_unlinked": unlinked}


def _linker(kg):
    from kale_ray.core.qa import EntityLinker

    kgstore = _columnar()
    if kgstore is not None and isinstance(kg, kgstore.ColumnarKG):
        return kgstore.ColumnarLinker(kg)
    return EntityLinker(kg)


def question_warnings(cfg: SynthConfig, info: dict) -> list[str]:
    """What a user should know about the questions before trusting the numbers (printed, and in summary.json)."""
    out = []
    qa = cfg.qa
    if qa.source == "generate" and "generated" in info:
        if info["generated"] < qa.num_questions:
            out.append(f"{info['generated']} questions generated of qa.num_questions={qa.num_questions} asked "
                       f"(by hops: {_hops_text(info['generated_by_hops'])}): the KG ({cfg.kg.source}) has too few "
                       f"distinct chains with at most qa.max_answers={qa.max_answers} answers")
        missing = [h for h in qa.hops if not info["generated_by_hops"].get(str(h))]
        if missing:
            out.append(f"no {'/'.join(map(str, missing))}-hop questions could be generated "
                       f"(qa.hops={list(qa.hops)}) from {cfg.kg.source}")
    if (qa.source == "generate" or qa.test_file) and info.get("test", 0) < MIN_TEST_QUESTIONS:
        where, fix = ("", "; use a bigger KG, more qa.num_questions or a larger qa.test_fraction (test questions "
                      "are multi-hop)") if qa.source == "generate" else (f" ({qa.test_file})", "")
        out.append(f"the test split{where} has {info.get('test', 0)} questions (fewer than {MIN_TEST_QUESTIONS}): "
                   f"its accuracy is too noisy to compare{fix}")
    if info.get("test_unlinked"):
        out.append(f"{info['test_unlinked']} of {info['test']} test questions have an answer that does not link to "
                   f"the KG (marked answer_linked=false in qa/test.jsonl; evaluate reports accuracy with and "
                   f"without them)")
    return out


def _hops_text(by_hops: dict) -> str:
    return ", ".join(f"{h}-hop {c}" for h, c in sorted(by_hops.items(), key=lambda kv: int(kv[0]))) or "none"


def _local_copy(storage: Storage, rel: str) -> str:
    """A path the shard tasks can open: the file itself when local, else a cached local copy."""
    if storage.is_local:
        return storage.path(rel)
    cache = Path(os.environ.get("KALE_RAY_CACHE", "~/.cache/kale_ray")).expanduser() / "qa"
    cache.mkdir(parents=True, exist_ok=True)
    data = storage.read_bytes(rel)
    dest = cache / (hashlib.blake2b(data, digest_size=12).hexdigest() + ".jsonl")
    if not dest.exists():
        tmp = dest.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(dest)
    return str(dest)


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #
def run_synthesis(cfg: SynthConfig, progress: Callable[[str], None] = print) -> SynthSummary:
    """Run (or resume) a synthesis job. Ray must be initialised (``ray.init``) by the caller."""
    import ray

    t_all = time.perf_counter()
    # A task's own error (disk full, a bug) reaches the caller as itself, not as a generic UDF failure.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    if cfg.shard_size < 1:
        raise ValueError(f"shard_size: must be >= 1, got {cfg.shard_size}")
    storage = Storage.from_uri(cfg.out_dir)
    storage.makedirs()
    stage = Stage(storage, "synthesis", synthesis_settings(cfg))
    stage.claim(cfg.on_change, outputs=STAGE_OUTPUTS, wipe=lambda: _wipe(storage))
    text = _config_yaml(cfg)
    if not (storage.exists("config.yaml") and storage.read_text("config.yaml") == text):
        storage.write_atomic("config.yaml", text)
    summary = SynthSummary()
    times = summary.seconds

    t = time.perf_counter()
    kg, kg_py = load_shared_kg(cfg)
    if not storage.exists("rejects/kg_lines.jsonl"):  # the KG's identity is part of the settings
        storage.write_jsonl_atomic("rejects/kg_lines.jsonl", kg.rejects.rows)
    summary.kg = kg.summary()
    times["load_kg"] = time.perf_counter() - t
    progress(f"[synth] KG {cfg.kg.source}: {kg.num_entities} entities, {kg.num_relations} relations, "
             f"{len(kg.triples)} triples; rejected lines: {kg.rejects.counts() or 0}")

    t = time.perf_counter()
    qa_path, qa_info = prepare_questions(cfg, kg_py, storage, link_kg=kg)
    max_lines = cfg.max_rows if cfg.qa.source != "generate" else 0
    slices = line_offsets(qa_path, cfg.shard_size, max_lines)
    summary.shards_total = len(slices)
    done = {int(n[len("shard-"):-len(".done")]) for n in storage.list("data", suffix=".done")}
    pending = [dict(shard=i, start=s, end=e, first_line=fl, dups="") for i, (s, e, fl) in enumerate(slices)
               if i not in done]
    if pending:  # ids used twice: found once here for the whole file (shards are read in parallel)
        dups = duplicate_id_lines(qa_path, max_lines)
        by_shard = dups_by_shard(dups, slices)
        for d in pending:
            d["dups"] = by_shard.get(d["shard"], "")
        if dups:
            progress(f"[synth] {sum(len(ls) - 1 for _, ls in dups.values())} rows reuse the id of an earlier line "
                     f"({len(dups)} ids): rejected as duplicate_id")
    times["questions"] = time.perf_counter() - t
    summary.shards_skipped = len(slices) - len(pending)
    progress(f"[synth] questions from {qa_path}: {len(slices)} shards of {cfg.shard_size} lines")
    if "format" in qa_info:
        bad = qa_info["source_rejected"]
        progress(f"[synth] qa.source {cfg.qa.source}: format {qa_info['format']}"
                 f"{' (detected from the first row)' if cfg.qa.format == 'auto' else ''}; {qa_info['source_rows']} rows, "
                 f"{qa_info['converted']} converted to {CONVERTED_QA}, rejected {bad or 0}"
                 f"{'; first: ' + qa_info['first_reject'] if qa_info.get('first_reject') else ''}")
    if cfg.qa.source == "generate" and "generated" in qa_info:
        progress(f"[synth] questions: {qa_info['requested']} asked, {qa_info['generated']} generated "
                 f"({_hops_text(qa_info['generated_by_hops'])}); train {sum(qa_info['train_by_hops'].values())} "
                 f"({_hops_text(qa_info['train_by_hops'])}, with the 1-hop questions of every hop fact); "
                 f"test {qa_info['test']} ({_hops_text(qa_info['test_by_hops'])})")
    elif qa_info.get("test"):
        progress(f"[synth] test split: {qa_info['test']} questions ({_hops_text(qa_info['test_by_hops'])}), "
                 f"{qa_info['test_unlinked']} with an answer that does not link to the KG")
    summary.warnings = question_warnings(cfg, qa_info)
    for w in summary.warnings:
        progress(f"[synth] warning: {w}")
    if summary.shards_skipped:
        progress(f"[synth] resuming: {summary.shards_skipped}/{len(slices)} shards already done")

    if pending:
        kg_ref = ray.put(_share(kg, cfg))
        del kg_py
        qa_rel = "" if storage.is_local else "qa/train.jsonl" if cfg.qa.source == "generate" else (
            CONVERTED_QA if "format" in qa_info else "")
        job = ShardJob(cfg, storage, qa_path, _teacher_label(cfg), [kg_ref], qa_rel)
        _run_pending(cfg, job, pending, summary, progress)

    _totals(storage, summary, qa_info)
    tf = summary.teacher_failures
    if tf.get("tried", 0) >= cfg.teacher_failure_min_rows and tf["failed"] > cfg.max_teacher_failure_rate * tf["tried"]:
        # this run's rows stayed under the rate (or it would have stopped), but with earlier runs' shards not
        summary.warnings.append(f"the teacher failed on {tf['failed']} of {tf['tried']} rows over all shards "
                                f"(over max_teacher_failure_rate={cfg.max_teacher_failure_rate:g})")
        progress(f"[synth] warning: {summary.warnings[-1]}")
    times["total"] = time.perf_counter() - t_all
    storage.write_atomic("summary.json", json.dumps(summary.to_dict(), indent=2))
    from kale_ray.runtime.tracking import log_summary  # cfg.tracking: the summary as metrics, summary.json
    log_summary(cfg.tracking, summary.to_dict(), cfg.out_dir, params=to_dict(cfg))
    stage.finish(rows_in=summary.rows_in, rows_out=summary.rows_out)
    progress(f"[synth] done: {summary.rows_in} in, {summary.rows_out} out, rejected {summary.rejected or 0}; "
             f"teacher outputs replaced by template: {summary.teacher_rejected or 0}; "
             f"{summary.tokens_generated} tokens generated; {times['total']:.1f}s")
    progress(f"[synth] {_share_text(cfg, summary)}")
    if summary.qa.get("test_unlinked"):
        progress(f"[synth] test: {summary.qa['test']} questions, {summary.qa['test_unlinked']} whose answer does not "
                 f"link to the KG (answer_linked=false in qa/test.jsonl)")
    if summary.warnings:
        progress(f"[synth] {len(summary.warnings)} warning(s) above (summary.json: warnings)")
    if summary.rows_in != summary.rows_out + sum(summary.rejected.values()):
        raise RuntimeError(f"row accounting mismatch: in={summary.rows_in} out={summary.rows_out} "
                           f"rejected={summary.rejected}")
    return summary


def _share_text(cfg: SynthConfig, s: SynthSummary) -> str:
    """The teacher's share of the kept rationales, said on every run."""
    by = {k: v for k, v in sorted(s.teacher_counts.items()) if v}
    teacher = sum(v for k, v in by.items() if not k.startswith("template"))
    rest = ", ".join(f"{k} {v}" for k, v in by.items() if k.startswith("template"))
    tf = s.teacher_failures
    tried = f"; teacher rows failed: {tf['failed']} of {tf['tried']}" if tf.get("tried") else ""
    return (f"teacher share of kept rationales: {s.teacher_share:.1%} ({teacher} of {s.rows_out} by "
            f"{_teacher_label(cfg)}{'; ' + rest if rest else ''}){tried}")


def _teacher_label(cfg: SynthConfig) -> str:
    b = cfg.generation.backend
    return f"vllm:{_model_label(cfg)}" if b == "vllm" else b


def _config_yaml(cfg: SynthConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _wipe(storage: Storage) -> None:
    for folder in ("data", "rejects", "rejects/qa_lines", "qa", "work", "stages"):
        for name in storage.list(folder):
            storage.delete(f"{folder}/{name}")
    for name in storage.list("work"):
        for f in storage.list(f"work/{name}"):
            storage.delete(f"work/{name}/{f}")
    if storage.exists("summary.json"):
        storage.delete("summary.json")


def _run_pending(cfg: SynthConfig, job: ShardJob, pending: list[dict], summary: SynthSummary, progress) -> None:
    import ray

    times = summary.seconds
    storage = job.storage
    searched = {}
    for d in pending:  # shards whose search finished in an earlier run, waiting for the teacher
        rel = f"work/{shard_name(d['shard'])}/searched.done"
        if storage.exists(rel):
            searched[d["shard"]] = json.loads(storage.read_text(rel))
    to_search = [d for d in pending if d["shard"] not in searched]

    t = time.perf_counter()
    if to_search:
        workers = cfg.search_workers or None
        per_task = shards_per_task(len(to_search), cfg.search_workers or int(ray.cluster_resources().get("CPU", 1)),
                                   cfg.search_shards_per_task)
        ds = ray.data.from_items(to_search, override_num_blocks=math.ceil(len(to_search) / per_task))
        out = ds.map_batches(_search_batch, batch_size=per_task, batch_format="numpy", num_cpus=1,
                             concurrency=workers, fn_kwargs={"kg_holder": job.kg_holder, "job": job})
        task_s: Counter = Counter()
        t_wall0, first_start, last_end = time.time(), None, None
        for row in out.iter_rows():
            c = json.loads(row["counts"])
            task_s.update(c.pop("task_seconds", {}))
            span = c.pop("task_span", None)
            if span:
                first_start = span[0] if first_start is None else min(first_start, span[0])
                last_end = span[1] if last_end is None else max(last_end, span[1])
            if c.get("final") is False:
                searched[c["shard"]] = c
            else:
                progress(f"[synth] shard {c['shard']}: {c['kept']} kept, {sum(c['rejected'].values())} rejected")
                _on_shard_done(c["shard"], c)
        for k, v in task_s.items():
            times[f"search_tasks_{k}"] = round(v, 3)
        if first_start is not None:  # where the stage's wall time goes: before the first task, after the last
            times["search_first_task_start"] = round(first_start - t_wall0, 3)
            times["search_after_last_task"] = round(time.time() - last_end, 3)
    times["link_and_paths"] = time.perf_counter() - t
    progress(f"[synth] linking + path search: {len(to_search)} shards in {times['link_and_paths']:.1f}s")
    if searched:
        t = time.perf_counter()
        _teacher_stage(cfg, job, searched, progress, summary.shards_total)
        times["teacher_and_verify"] = time.perf_counter() - t


def _teacher_stage(cfg: SynthConfig, job: ShardJob, searched: dict[int, dict], progress, shards_total: int = 0) -> None:
    """Stream every waiting shard's rows through the teacher; finish and write them in Ray Data tasks."""
    import ray

    from kale_ray.models import resolve_model
    from kale_ray.runtime.generate import generation_stage

    gen, storage = cfg.generation, job.storage
    if gen.backend not in ("vllm", "http"):
        raise ValueError(f"generation.backend: unknown backend {gen.backend!r} (vllm, http, template)")
    for shard in searched:  # parts of a killed run: redone (exactly once comes from the shard merge)
        for f in storage.list(f"work/{shard_name(shard)}", suffix=".jsonl"):
            if f.startswith("part-"):
                storage.delete(f"work/{shard_name(shard)}/{f}")
    files = [storage.path(f"work/{shard_name(s)}/teacher_in.jsonl") for s in sorted(searched)]
    # The light stages take fractions of a CPU so that the engine actor always finds one (on a
    # 2-CPU machine whole-CPU readers and renderers would starve it: a deadlock).
    light = 0.25
    ds = ray.data.read_text(files, filesystem=storage.fs, ray_remote_args={"num_cpus": light}).map(
        _teacher_row, num_cpus=light)
    model_path = cfg.teacher.name
    if gen.backend == "vllm":
        model_path = resolve_model(cfg.teacher.name, cfg.teacher.cache_dir)
        ds = ds.map_batches(PromptRenderer, fn_constructor_args=(model_path, cfg.teacher.max_model_len, gen.max_tokens,
                                                                 cfg.teacher.trust_remote_code),
                            batch_size=64, concurrency=1, batch_format="numpy", num_cpus=light)
    # vLLM engines or network-bound HTTP actors (a fraction of a CPU each, so they never starve the light stages)
    out = generation_stage(ds, model_path, gen, cfg.teacher, num_cpus=light)
    out = out.map_batches(_finish_batch, batch_size=gen.batch_size, batch_format="numpy", num_cpus=light,
                          fn_kwargs={"job": job})
    parts: dict[int, dict[str, int]] = {s: {} for s in searched}
    finalize = ray.remote(finalize_shard)
    running: dict[Any, int] = {}
    n = 0
    tally = _Tally()  # this run's teacher rows: checked against max_teacher_failure_rate as parts arrive
    rows = iter(out.iter_rows())
    try:
        for row in rows:
            shard = int(row["shard"])
            if str(row["part"]) not in parts[shard]:  # a part reported twice (a retried task) counts once
                tally.merge(int(row.get("tried", 0)), int(row.get("failed", 0)),
                            json.loads(row.get("reasons") or "{}"), str(row.get("sample") or ""))
            parts[shard][str(row["part"])] = int(row["n"])
            n += int(row["n"])
            if sum(parts[shard].values()) == searched[shard]["to_teacher"]:
                running[finalize.remote(storage, shard, searched[shard]["to_teacher"])] = shard
            running = _collect(running, progress, block=False)
            if tally.exceeded(cfg):
                _collect(running, progress, block=True)  # shards whose parts are all in: finished, valid
                done = len(storage.list("data", suffix=".done"))
                raise TeacherFailureError(tally.message(cfg, done, shards_total or done))
    finally:
        close = getattr(rows, "close", None)
        if close is not None:  # stops the streaming pipeline (engines, HTTP actors) on an early stop
            close()
    _collect(running, progress, block=True)
    missing = {s: searched[s]["to_teacher"] - sum(p.values()) for s, p in parts.items()
               if sum(p.values()) != searched[s]["to_teacher"]}
    if missing:
        raise RuntimeError(f"teacher rows missing after the pipeline, by shard: {missing}")
    progress(f"[synth] teacher ({gen.backend}) generated for {n} rows")


def _collect(running: dict, progress, block: bool) -> dict:
    import ray

    while running:
        ready, _ = ray.wait(list(running), num_returns=1, timeout=None if block else 0)
        if not ready:
            break
        shard = running.pop(ready[0])
        c = ray.get(ready[0])
        progress(f"[synth] shard {shard}: {c['kept']} kept, {sum(c['rejected'].values())} rejected")
        _on_shard_done(shard, c)
    return running


def _totals(storage: Storage, summary: SynthSummary, qa_info: dict) -> None:
    """Totals over every shard marker (this run's and earlier ones'); input-line rejects gathered."""
    rej, teacher_rej, teachers, qa_rej, hops_in, by_hops, follows = (Counter() for _ in range(7))
    kept = tokens = rows_in = tried = failed = 0
    for name in storage.list("data", suffix=".done"):
        c = json.loads(storage.read_text(f"data/{name}"))
        rej.update(c["rejected"])
        teacher_rej.update(c["teacher_rejected"])
        teachers.update(c["teachers"])
        qa_rej.update(c.get("qa_rejected", {}))
        hops_in.update(c.get("hops_in", {}))
        by_hops.update(c.get("by_hops", {}))
        follows.update(c.get("follows_question", {}))
        kept += c["kept"]
        tokens += c["tokens"]
        rows_in += c.get("rows_in", 0)
        tried += c.get("teacher_tried", 0)
        failed += c.get("teacher_failed", 0)
    lines = []
    for name in storage.list("rejects/qa_lines", suffix=".jsonl"):
        lines += storage.read_jsonl(f"rejects/qa_lines/{name}")
    if lines:
        storage.write_jsonl_atomic("rejects/qa_lines.jsonl", sorted(lines, key=lambda r: r.get("line", 0)))
    summary.rows_in, summary.rows_out = rows_in, kept
    summary.rejected, summary.teacher_rejected, summary.teacher_counts = dict(rej), dict(teacher_rej), dict(teachers)
    summary.tokens_generated = tokens
    qa_rej.update(qa_info.get("source_rejected", {}))  # rows of a converted source that did not convert
    summary.qa = {"train": rows_in, "test": qa_info.get("test", 0), "rejected_lines": dict(qa_rej),
                  "train_by_hops": dict(sorted(hops_in.items(), key=lambda kv: int(kv[0]))),
                  "test_by_hops": qa_info.get("test_by_hops", {}), "test_unlinked": qa_info.get("test_unlinked", 0)}
    for k in ("requested", "hops_requested", "generated", "generated_by_hops", "format", "source_rows", "converted"):
        if k in qa_info:
            summary.qa[k] = qa_info[k]
    summary.teacher_share = (sum(n for t, n in teachers.items() if not t.startswith("template")) / kept) if kept else 0.0
    summary.teacher_failures = {"tried": tried, "failed": failed}
    summary.paths = {"kept_by_hops": dict(by_hops), "first_path_follows_question_by_hops": dict(follows),
                     "first_path_follows_question": (sum(follows.values()) / kept) if kept else 0.0}
