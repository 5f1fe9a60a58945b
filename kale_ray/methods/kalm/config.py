"""The ``kalm`` job's config: KG + split, training (``TrainConfig`` with ``loss: kalm``), evaluation.

Pure Python (dataclasses from :mod:`kale_ray.config`): imports no torch, Ray or vLLM.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from kale_ray.config import ConfigError, KaLMEvalConfig, KGConfig, LoRAConfig, TrainConfig, num


def _kalm_train_defaults() -> TrainConfig:
    """The official recipe's choices: LoRA r=8 on the MLP projections, lr 1e-4, ZeRO-2."""
    cfg = TrainConfig(loss="kalm", lr=1e-4, warmup_steps=2, micro_batch_size=8, max_seq_len=128)
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
    train: TrainConfig = dataclasses.field(default_factory=_kalm_train_defaults)
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
