"""The KnowTuning DPO stage's config: which answers, how they are disturbed, how DPO trains.

Pure Python (dataclasses from :mod:`kale_ray.config`): imports no torch, Ray or vLLM.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar, Literal

from kale_ray.config import ConfigError, GenerationConfig, KGConfig, ModelConfig, TrainConfig, num
from kale_ray.methods.knowtuning.corrupt import KINDS


@dataclasses.dataclass
class PairsConfig:
    """Better answers (lists of atomic facts) and their disturbed, worse versions."""

    kg: KGConfig = dataclasses.field(default_factory=KGConfig)
    # "neighbourhood": "What do you know about <entity>?" answered by the entity's own KG triples;
    # or a JSONL file of {"id"?, "question", "facts": ["text" | [text, [h, r, t] | null] | {text, triple?}]}.
    source: str = "neighbourhood"
    num_questions: int = num(200, ge=1)  # neighbourhood only
    facts_per_answer: int = num(4, ge=1)  # neighbourhood only
    min_facts: int = num(2, ge=1)  # neighbourhood only: entities with fewer triples are not asked about
    beta: float = num(0.5, gt=0, le=1)  # share of the facts deleted (completeness) and revised (factuality)
    kinds: list[str] = dataclasses.field(default_factory=lambda: list(KINDS))
    seed: int = num(0, ge=0)

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ConfigError(f"pairs.kinds: expected a non-empty subset of {list(KINDS)}, got {self.kinds}")


@dataclasses.dataclass
class DPOConfig:
    """KnowTuning's knowledge-comparison stage (``loss: dpo``): DPO over (better, worse) answers + gamma x SFT.

    Per pair: ``dpo_loss(policy - reference margins) + gamma * mean CE of the chosen answer's tokens``
    (the official run's LLaMA-Factory ``dpo_ftx 0.2``); averaged over pairs.
    """

    beta: float = num(0.1, gt=0)
    gamma: float = num(0.2, ge=0)  # weight of the SFT term on the chosen (better) answer; 0 = pure DPO
    # "sigmoid": DPO (Rafailov et al.); "ipo": (margin - 1/(2 beta))^2 on length-averaged log-probs (Azar et al.).
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = num(0.0, ge=0, lt=0.5)  # conservative DPO (sigmoid only)
    # "adapter_disabled": a no-grad forward of the same LoRA model with the adapter off, every step;
    # "precomputed": rows carry ref_chosen_logp / ref_rejected_logp from one batch pass before
    # training (kale_ray.methods.knowtuning.dpo.add_reference_logps); rows without them are rejected.
    reference: Literal["adapter_disabled", "precomputed"] = "adapter_disabled"

    def __post_init__(self) -> None:  # ranges: num(...) above, checked on load
        if self.loss_type == "ipo" and self.label_smoothing != 0.0:
            raise ConfigError("dpo.label_smoothing: applies to loss_type 'sigmoid' only")


@dataclasses.dataclass
class DPOTrainConfig(TrainConfig):
    """Training with KnowTuning's DPO loss (``loss: dpo``): the shared settings plus ``dpo``."""

    loss: str = "dpo"
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)


def _dpo_train_defaults() -> DPOTrainConfig:
    """The official Stage II: DPO beta 0.1 + 0.2 x SFT, 1 epoch, lr 1e-5; reference precomputed once."""
    cfg = DPOTrainConfig(loss="dpo", lr=1e-5, epochs=1, warmup_steps=0, micro_batch_size=4, max_seq_len=256)
    cfg.dpo.reference = "precomputed"
    return cfg


@dataclasses.dataclass
class DPOStageConfig:
    """How the DPO stage trains and scores: the keys the Stage II job has at its top level and the
    whole recipe has under ``stage2`` (both configs are this class plus their own keys)."""

    train: DPOTrainConfig = dataclasses.field(default_factory=_dpo_train_defaults)  # the recipe: model = Stage I's
    reference_batch_size: int = num(8, ge=1)
    # Where the reference (and the after-training scoring) pass runs: a Ray Data actor ("ray"),
    # this process ("local"), or "auto" (Ray when it is initialised).
    reference_with: Literal["auto", "ray", "local"] = "auto"
    # After training, score the training pairs with the trained policy: implicit-reward accuracy and margin.
    score_after: bool = True

    _key: ClassVar[str] = ""  # where this section sits in the user's YAML, for messages

    def __post_init__(self) -> None:
        if self.train.loss != "dpo":
            raise ConfigError(f"{self._key}train.loss: the KnowTuning DPO stage trains loss 'dpo', "
                              f"got {self.train.loss!r}")

    def dpo_stage(self) -> dict[str, Any]:
        """This section's DPO-stage settings (deep copies), as keyword arguments of another DPOStageConfig."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(DPOStageConfig)}


@dataclasses.dataclass
class KnowTuningDPOJobConfig(DPOStageConfig):
    """KnowTuning Stage II end to end: comparison pairs -> reference pass -> DPO on Ray Train -> reward check."""

    out: str = "runs/knowtuning_dpo"
    pairs: PairsConfig = dataclasses.field(default_factory=PairsConfig)
    ray_address: str | None = None  # None: RAY_ADDRESS or a local Ray
    # A rerun whose settings differ from those behind out's outputs (runtime.stages.Run): "error" stops
    # and names the changed keys; "overwrite" deletes that stage's outputs and redoes it and every later one.
    on_change: Literal["error", "overwrite"] = "error"


# --------------------------------------------------------------------------- the whole recipe


@dataclasses.dataclass
class LongFormQAConfig:
    """The long-form questions KnowTuning starts from, each with the KG facts its answer is built from."""

    kg: KGConfig = dataclasses.field(default_factory=lambda: KGConfig(source="builtin:hpo"))
    # "kg": questions about KG subjects, answered by ``facts_per_answer`` of their own triples;
    # or a JSONL file of {"id"?, "question", "subject"?, "answer"?, "facts": [text | [text, triple] | {text, triple?}]}.
    source: str = "kg"
    test_file: str | None = None  # users' held-out file (same format); else a seeded split of the questions
    num_questions: int = num(120, ge=1)  # kg only: train + test questions
    test_fraction: float = num(0.25, ge=0, lt=1)
    facts_per_answer: int = num(4, ge=1)
    min_facts: int = num(3, ge=1)  # kg only: subjects with fewer such triples are not asked about
    max_facts: int = num(60, ge=1)  # kg only: nor subjects with more (umbrella terms, not one disease)
    # kg only: the relations whose triples make an answer (empty = every outgoing triple) and the
    # question asked about the subject ({name} is its name).
    relations: list[str] = dataclasses.field(default_factory=lambda: ["has_phenotype"])
    question_template: str = "Describe the clinical features of {name}."
    # "template": the facts' sentences joined (exact); "teacher": a paragraph the teacher writes from
    # the facts (checked to state at least one; else the template answer, counted).
    answers: Literal["template", "teacher"] = "template"
    seed: int = num(0, ge=0)

    def __post_init__(self) -> None:
        if self.max_facts < self.min_facts:
            raise ConfigError(f"qa.max_facts: must be >= qa.min_facts ({self.min_facts}), got {self.max_facts}")
        if "{name}" not in self.question_template:
            raise ConfigError(f"qa.question_template: needs a {{name}} placeholder, got {self.question_template!r}")


@dataclasses.dataclass
class TeacherStepConfig:
    """How one teacher step asks, retries and falls back."""

    max_attempts: int = num(3, ge=1)  # a generation that does not parse is retried with another seed, then rejected
    retry_temperature: float = num(0.7, ge=0)  # greedy decoding repeats itself: retries sample at this temperature
    structured_output: bool = True  # JSON-schema output: vLLM guided decoding, or response_format on the http backend
    max_tokens: int = num(192, ge=1)


def _stage1_train_defaults() -> TrainConfig:
    """The official Stage I: SFT on original + rewritten QA, lr 1e-4, 3 epochs."""
    return TrainConfig(loss="sft", lr=1e-4, epochs=3, warmup_steps=2, micro_batch_size=4, max_seq_len=256)


@dataclasses.dataclass
class StageIConfig:
    """Fine-grained knowledge augmentation: atomic facts -> perplexity -> difficult facts -> rewritten QA -> SFT."""

    extract: TeacherStepConfig = dataclasses.field(default_factory=TeacherStepConfig)
    rewrite: TeacherStepConfig = dataclasses.field(default_factory=lambda: TeacherStepConfig(max_attempts=2,
                                                                                            max_tokens=160))
    max_facts: int = num(12, ge=1)  # per extracted answer
    # An answer whose extraction is rejected after every attempt: "sentences" keeps it with one fact per
    # sentence (counted as sentence-fallback), "none" leaves it out of the fine-grained step (counted).
    extract_fallback: Literal["sentences", "none"] = "sentences"
    alpha: float = num(0.5, ge=0, le=1)  # share of atomic facts with the highest perplexity that are "difficult"
    difficulty_scope: Literal["global", "per_question"] = "global"
    ppl_model: str = ""  # "" = the student (stage1.train.model); or any HF folder / builtin
    ppl_context: Literal["question", "none"] = "question"  # a fact's perplexity given the question prompt, or alone
    ppl_batch_size: int = num(16, ge=1)
    ppl_with: Literal["auto", "ray", "local"] = "auto"
    min_fact_overlap: float = num(0.5, ge=0, le=1)  # a rewritten answer must hold this share of its fact's content words
    rewrite_fallback: Literal["template", "none"] = "template"  # exact template QA for a rejected rewrite
    train: TrainConfig = dataclasses.field(default_factory=_stage1_train_defaults)

    def __post_init__(self) -> None:
        if self.train.loss != "sft":
            raise ConfigError(f"stage1.train.loss: Stage I trains loss 'sft', got {self.train.loss!r}")


@dataclasses.dataclass
class StageIIConfig(DPOStageConfig):
    """Coarse-grained knowledge comparison: DPO from the Stage I model (the pairs of :class:`PairsConfig`
    from the training QA's facts, with this ``beta`` and these ``kinds``)."""

    beta: float = num(0.5, gt=0, le=1)  # share of facts deleted / revised
    kinds: list[str] = dataclasses.field(default_factory=lambda: list(KINDS))

    _key: ClassVar[str] = "stage2."


@dataclasses.dataclass
class FactEvalConfig:
    """Fact-level evaluation of generated answers to the held-out questions."""

    generation: GenerationConfig = dataclasses.field(
        default_factory=lambda: GenerationConfig(max_tokens=128, temperature=0.0))
    extractor: Literal["teacher", "sentences"] = "teacher"  # teacher falls back to sentences on rejects (counted)
    extract: TeacherStepConfig = dataclasses.field(default_factory=lambda: TeacherStepConfig(max_attempts=2))
    max_questions: int = num(0, ge=0)  # 0 = every held-out question
    include_base: bool = False  # also the untrained student
    parallel_models: bool = True  # generate with every model's vLLM engine at once (start-ups overlap)
    match_relation: bool = False  # a named relation phrase must match the KG triple's relation
    min_surface_chars: int = num(4, ge=1)  # entity names shorter than this are not linked


@dataclasses.dataclass
class KnowTuningJobConfig:
    """KnowTuning end to end: long-form QA -> Stage I (facts, perplexity, rewrites, SFT) -> Stage II (DPO) -> fact eval."""

    out: str = "runs/knowtuning"
    qa: LongFormQAConfig = dataclasses.field(default_factory=LongFormQAConfig)
    teacher: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    generation: GenerationConfig = dataclasses.field(default_factory=lambda: GenerationConfig(temperature=0.0))
    stage1: StageIConfig = dataclasses.field(default_factory=StageIConfig)
    stage2: StageIIConfig = dataclasses.field(default_factory=StageIIConfig)
    # "sft": a baseline SFT on the original QA only (same student, hyper-parameters and epochs as Stage I);
    # "none": no baseline (the report compares the Stage I model with KnowTuning instead).
    baseline: Literal["sft", "none"] = "sft"
    eval: FactEvalConfig = dataclasses.field(default_factory=FactEvalConfig)
    # Run the recipe up to and including this stage (the per-stage entry points), or everything.
    stop_after: Literal["qa", "stage1_data", "stage1", "stage2", "all"] = "all"
    ray_address: str | None = None
    # A rerun whose settings differ from those behind out's outputs (runtime.stages.Run): "error" stops
    # and names the changed keys; "overwrite" deletes that stage's outputs and redoes it and every later one.
    on_change: Literal["error", "overwrite"] = "error"

    def __post_init__(self) -> None:
        if self.generation.backend not in ("vllm", "http", "template"):
            raise ConfigError(f"generation.backend: unknown {self.generation.backend!r}")
