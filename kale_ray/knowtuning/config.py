"""The KnowTuning DPO stage's config: which answers, how they are disturbed, how DPO trains.

Pure Python (dataclasses from :mod:`kale_ray.config`): imports no torch, Ray or vLLM.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from kale_ray.config import ConfigError, KGConfig, TrainConfig
from kale_ray.knowtuning.corrupt import KINDS


@dataclasses.dataclass
class PairsConfig:
    """Better answers (lists of atomic facts) and their disturbed, worse versions."""

    kg: KGConfig = dataclasses.field(default_factory=KGConfig)
    # "neighbourhood": "What do you know about <entity>?" answered by the entity's own KG triples;
    # or a JSONL file of {"id"?, "question", "facts": ["text" | [text, [h, r, t] | null] | {text, triple?}]}.
    source: str = "neighbourhood"
    num_questions: int = 200  # neighbourhood only
    facts_per_answer: int = 4  # neighbourhood only
    min_facts: int = 2  # neighbourhood only: entities with fewer triples are not asked about
    beta: float = 0.5  # share of the facts deleted (completeness) and revised (factuality)
    kinds: list[str] = dataclasses.field(default_factory=lambda: list(KINDS))
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.beta <= 1.0:
            raise ConfigError(f"pairs.beta: must be in (0, 1], got {self.beta}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ConfigError(f"pairs.kinds: expected a non-empty subset of {list(KINDS)}, got {self.kinds}")
        if self.facts_per_answer < 1 or self.min_facts < 1:
            raise ConfigError("pairs.facts_per_answer and pairs.min_facts: must be >= 1")


def _dpo_train_defaults() -> TrainConfig:
    """The official Stage II: DPO beta 0.1 + 0.2 x SFT, 1 epoch, lr 1e-5; reference precomputed once."""
    cfg = TrainConfig(loss="dpo", lr=1e-5, epochs=1, warmup_steps=0, micro_batch_size=4, max_seq_len=256)
    cfg.dpo.reference = "precomputed"
    return cfg


@dataclasses.dataclass
class KnowTuningDPOJobConfig:
    """KnowTuning Stage II end to end: comparison pairs -> reference pass -> DPO on Ray Train -> reward check."""

    out: str = "runs/knowtuning_dpo"
    pairs: PairsConfig = dataclasses.field(default_factory=PairsConfig)
    train: TrainConfig = dataclasses.field(default_factory=_dpo_train_defaults)
    reference_batch_size: int = 8
    # Where the reference (and the after-training scoring) pass runs: a Ray Data actor ("ray"),
    # this process ("local"), or "auto" (Ray when it is initialised).
    reference_with: Literal["auto", "ray", "local"] = "auto"
    # After training, score the training pairs with the trained policy: implicit-reward accuracy and margin.
    score_after: bool = True
    ray_address: str | None = None  # None: RAY_ADDRESS or a local Ray

    def __post_init__(self) -> None:
        if self.train.loss != "dpo":
            raise ConfigError(f"train.loss: the KnowTuning DPO stage trains loss 'dpo', got {self.train.loss!r}")
        if self.reference_batch_size < 1:
            raise ConfigError(f"reference_batch_size: must be >= 1, got {self.reference_batch_size}")
