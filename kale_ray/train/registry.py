"""Registry of training losses: each name maps to a collator and a compute function.

A :class:`LossSpec` bundles what the trainer needs to train with one objective:

* ``collator_factory(tokenizer, cfg) -> collator``: rows (dicts) -> batch dict of tensors,
  or ``None`` when every row of the batch was rejected; the collator keeps its rejects in
  ``collator.rejects`` (a :class:`kale_ray.core.rejects.Rejects`) and counters in
  ``collator.stats``;
* ``compute(model, batch, cfg, dist) -> (loss, metrics)``: ``model`` is an
  :class:`~kale_ray.train.heads.AnswerLogits` (or the DeepSpeed engine wrapping one):
  ``model(input_ids=, attention_mask=, labels=)`` returns answer-position logits
  ``(N, V)`` and targets ``(N,)``; ``model(..., output="hidden")`` the last hidden states
  ``(B, T, H)``; ``model.module.lm`` / ``model.lm`` is the (PEFT) causal LM itself;
* ``count_fn(batch) -> int``: the loss's normaliser for this micro-batch (answer tokens
  by default). The trainer sums it over the micro-batches of an optimizer step and over
  all workers and passes the total as ``dist.global_count``.

Contract for ``compute`` (this is what makes the loss independent of sharding and of
gradient accumulation): return this micro-batch's *share* of the step's mean, i.e.
``sum over its tokens / dist.global_count`` (``masked_mean(..., global_count=...)``
in :mod:`kale_ray.core.losses` does exactly that). ``metrics`` are 0-d tensors or floats
with the same additive meaning (``ce``, ``kl``, ...): the trainer sums them over micro-batches
and all-reduces them over workers, and logs the result as the step's value.

Adding a loss: a method's package registers it (as ``kale_ray/methods/knowtuning/dpo.py`` does
for DPO and ``kale_ray/methods/kalm/losses.py`` for KaLM)::

    # my_pkg/losses.py
    from kale_ray.train.registry import register_loss

    @register_loss("my_loss", collator_factory=my_pair_collator, count_fn=lambda b: b["chosen_input_ids"].shape[0])
    def my_compute(model, batch, cfg, dist):
        ...
        return loss, {"my_loss": loss.detach()}

and names the module in its package's entry points, group ``kale_ray.losses``::

    [project.entry-points."kale_ray.losses"]
    my_loss = "my_pkg.losses"

:func:`get_loss` imports every module of that group in each process (driver and Ray workers)
before looking a name up, so the trainer names no method (no train -> method import). A frozen
reference model for DPO can be the same PEFT model under ``model.module.lm.disable_adapter()``.

Pure torch: imports no Ray or DeepSpeed.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import torch

from kale_ray.core.losses import IGNORE_INDEX, ka_loss, sft_loss
from kale_ray.train.collators import kale_collator, sft_collator

# The entry-point group of modules that register losses on import (pyproject.toml);
# get_loss()/list_losses() import them lazily.
LOSS_ENTRY_POINTS = "kale_ray.losses"


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a loss needs to know about the distributed step (``dist`` in ``compute``)."""

    world_size: int = 1
    rank: int = 0
    # count_fn summed over the step's micro-batches and all workers; None = this batch alone.
    global_count: float | None = None


def count_answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Number of labelled next-token positions (what ``select_positions`` keeps)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclasses.dataclass(frozen=True)
class LossSpec:
    name: str
    collator_factory: Callable[[Any, Any], Any]
    compute: Callable[..., tuple[torch.Tensor, dict[str, Any]]]
    count_fn: Callable[[dict[str, torch.Tensor]], int] = count_answer_tokens
    description: str = ""


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    collator_factory: Callable[[Any, Any], Any],
    count_fn: Callable[[dict[str, torch.Tensor]], int] = count_answer_tokens,
    description: str = "",
    replace: bool = False,
) -> Callable:
    """Decorator: register ``compute`` under ``name`` (a second registration needs ``replace=True``)."""

    def decorator(compute: Callable) -> Callable:
        if name in _REGISTRY and not replace and _REGISTRY[name].compute is not compute:
            raise ValueError(f"loss '{name}' is already registered (pass replace=True to override)")
        first_doc_line = ((compute.__doc__ or "").strip().splitlines() or [""])[0]
        _REGISTRY[name] = LossSpec(name, collator_factory, compute, count_fn, description or first_doc_line)
        return compute

    return decorator


def loss_modules() -> dict[str, str]:
    """``{entry-point name: module}`` of the installed packages' loss plug-ins."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value.split(":")[0] for ep in entry_points(group=LOSS_ENTRY_POINTS)}


def _import_loss_modules() -> None:
    for name, module in loss_modules().items():
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"loss plug-in {name!r} ({LOSS_ENTRY_POINTS} entry point): cannot import "
                              f"{module!r}: {e}") from e


def list_losses() -> list[str]:
    _import_loss_modules()
    return sorted(_REGISTRY)


def get_loss(name: str) -> LossSpec:
    _import_loss_modules()
    if name not in _REGISTRY:
        raise KeyError(f"unknown loss '{name}'; known losses: {', '.join(sorted(_REGISTRY))} (plug-ins come from "
                       f"the installed packages' {LOSS_ENTRY_POINTS!r} entry points: is kale-ray installed, "
                       f"`pip install -e .`?)")
    return _REGISTRY[name]


# --------------------------------------------------------------------------- built-in losses


def _view(batch: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        "input_ids": batch[prefix + "input_ids"],
        "attention_mask": batch[prefix + "attention_mask"],
        "labels": batch[prefix + "labels"],
    }


@register_loss("sft", collator_factory=lambda tok, cfg: sft_collator(tok, cfg.max_seq_len))
def sft_compute(model, batch, cfg, dist: StepContext):
    """Cross-entropy on the completion tokens given ``prompt`` (KARD / KnowTuning SFT)."""
    logits, targets = model(**_view(batch))  # (N, V), (N,)
    loss, parts = sft_loss(logits, targets, global_count=dist.global_count)
    return loss, {"ce": parts["ce"]}


@register_loss("kale", collator_factory=lambda tok, cfg: kale_collator(tok, cfg.max_seq_len))
def kale_compute(model, batch, cfg, dist: StepContext):
    """KALE: CE(answer | prompt) + lam * KL(teacher || student) over the answer tokens.

    The student sees ``prompt``; the teacher is the same model seeing ``teacher_prompt``
    (question + knowledge rationale). The teacher pass runs without gradient when
    ``cfg.ka.stop_gradient_teacher`` (and no teacher CE is asked for).
    """
    ka = cfg.ka
    s_logits, targets = model(**_view(batch))  # (N, V), (N,)
    teacher_grad = (not ka.stop_gradient_teacher) or ka.teacher_ce_weight > 0
    with torch.set_grad_enabled(teacher_grad and torch.is_grad_enabled()):
        t_logits, t_targets = model(**_view(batch, "teacher_"))  # (N, V), (N,)
    if not torch.equal(targets, t_targets):
        raise AssertionError("student and teacher views label different answer tokens")
    loss, parts = ka_loss(
        s_logits, t_logits, targets, lam=ka.lam, temperature=ka.temperature, direction=ka.direction,
        global_count=dist.global_count, stop_gradient_teacher=ka.stop_gradient_teacher,
    )
    metrics: dict[str, Any] = {"ce": parts["ce"], "kl": parts["kl"]}
    if ka.teacher_ce_weight > 0:
        t_ce, _ = sft_loss(t_logits, targets, global_count=dist.global_count)
        loss = loss + ka.teacher_ce_weight * t_ce
        metrics["teacher_ce"] = t_ce.detach()
    return loss, metrics
