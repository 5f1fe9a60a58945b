"""The ``kalm`` job's config: KG + split, training (``KaLMTrainConfig``: ``loss: kalm`` and its ``kalm`` section), evaluation.

Pure Python (dataclasses from :mod:`kale_ray.config`): imports no torch, Ray or vLLM.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from kale_ray.config import ConfigError, GenerationConfig, KGConfig, LoRAConfig, TrainConfig, num


@dataclasses.dataclass
class KaLMConfig:
    """KaLM's training loss: ``L = L_exp + lm_weight * L_LM`` (``loss: kalm``).

    ``L_exp`` is the dual-view contrastive loss: "[ head, relation ]" and "{ tail }" embedded
    by the LM (last-layer hidden state of the last non-pad token, L2-normalised),
    ``S = (e_hr . e_t - margin I) / tau`` with in-batch negatives and false negatives (same
    tail, or another known tail of (h, r)) masked out; ``L_LM`` is the triple-completion
    cross-entropy on the tail tokens. Defaults are the official run's (PursuitYP/KaLM).
    """

    tau: float = num(0.05, gt=0)  # fixed temperature (the official code's learnable 1/tau is never optimised)
    margin: float = num(0.02, ge=0)  # additive margin subtracted from the positive pair's cosine
    lm_weight: float = num(0.01, ge=0)  # lambda; 0 skips the LM forward pass entirely
    symmetric: bool = True  # (CE over rows + CE over columns) / 2; false = rows (hr -> t) only
    mask_false_negatives: bool = True
    # All-gather the embeddings of every worker's micro-batch so each (h, r) sees
    # world_size x micro_batch_size - 1 negatives instead of micro_batch_size - 1. Costs one
    # all_gather of 2 x (B, H) embeddings (+ ids) per micro-batch and a (G, G) score matrix, G = B x world.
    gather_negatives: bool = False
    max_embed_len: int = num(64, ge=2)  # tokens per embedded view; longer views are cut on the right (counted)


@dataclasses.dataclass
class KaLMTrainConfig(TrainConfig):
    """Training with KaLM's loss (``loss: kalm``): the shared settings plus ``kalm``."""

    loss: str = "kalm"
    kalm: KaLMConfig = dataclasses.field(default_factory=KaLMConfig)


@dataclasses.dataclass
class KaLMEvalConfig:
    """KaLM evaluation: embedding-based KG completion and multiple-choice KGQA by generation."""

    max_test_triples: int = num(0, ge=0)  # 0 = every test triple; else a seeded sample of this many
    embed_batch_size: int = num(64, ge=1)  # texts per forward pass when embedding entities / queries
    # "ray": a Ray Data map_batches actor; "local": a batched torch pass in this process;
    # "auto": ray when Ray is initialised.
    embed_with: Literal["auto", "ray", "local"] = "auto"
    embed_threads: int = num(0, ge=0)  # torch threads of the embedding pass; 0 = all cores
    # Ranking is done in blocks of query_chunk x entity_chunk scores: never a full N x N matrix.
    query_chunk: int = num(256, ge=1)
    entity_chunk: int = num(4096, ge=1)
    kgqa: bool = True
    kgqa_per_task: int = num(50, ge=1)  # questions per KGQA task (tail, head, relation, triple classification)
    num_choices: int = num(4, ge=2)
    generation: GenerationConfig = dataclasses.field(
        default_factory=lambda: GenerationConfig(max_tokens=24, temperature=0.0)
    )
    seed: int = num(0, ge=0)


def _kalm_train_defaults() -> KaLMTrainConfig:
    """The official recipe's choices: LoRA r=8 on the MLP projections, lr 1e-4, ZeRO-2."""
    cfg = KaLMTrainConfig(loss="kalm", lr=1e-4, warmup_steps=2, micro_batch_size=8, max_seq_len=128)
    cfg.lora = LoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj"])
    return cfg


@dataclasses.dataclass
class KaLMDataConfig:
    """Which triples train and which test, and how relations read as text."""

    kg: KGConfig = dataclasses.field(default_factory=KGConfig)
    # "official": the builtin KG's own train/valid/test files (pykeen's UMLS/Nations split);
    # "random": a seeded split of all triples with test_fraction (users' KGs).
    split: Literal["official", "random"] = "official"
    test_fraction: float = num(0.1, gt=0, lt=1)
    max_train_triples: int = num(0, ge=0)  # 0 = all; else a seeded sample (before the inverse triples are added)
    add_inverse: bool = True  # train on (t, inverse r, h) too (the official recipe does)
    # Text of an inverse relation: "prefix" -> "inverse of <rel>", "suffix" -> "<rel> (reverse)".
    inverse_text: Literal["prefix", "suffix"] = "prefix"
    seed: int = num(0, ge=0)


@dataclasses.dataclass
class KaLMJobConfig:
    """KaLM end to end: evaluate the base model, align it, evaluate the merged model, report."""

    out: str = "runs/kalm"
    data: KaLMDataConfig = dataclasses.field(default_factory=KaLMDataConfig)
    train: KaLMTrainConfig = dataclasses.field(default_factory=_kalm_train_defaults)
    eval: KaLMEvalConfig = dataclasses.field(default_factory=KaLMEvalConfig)
    eval_before: bool = True  # the base model's metrics, for the side-by-side report
    kgqa_before: bool = True  # also KGQA (a vLLM engine start) for the base model; KG completion always
    ray_address: str | None = None  # None: RAY_ADDRESS or a local Ray
    # A rerun into an out folder made with other settings: "error" stops with the changed keys,
    # "overwrite" deletes the first changed stage's outputs and recomputes it and every later one.
    on_change: Literal["error", "overwrite"] = "error"

    def __post_init__(self) -> None:
        if self.train.loss != "kalm":
            raise ConfigError(f"train.loss: the kalm job trains loss 'kalm', got {self.train.loss!r}")
