"""KARD's reranker scoring and losses, as functions over plain tensors (no Ray, no model).

* :func:`maxsim` — late interaction (ColBERT): ``s(q, p) = sum_i max_j <q_i, p_j>`` over the
  non-padding tokens of query ``q`` and passage ``p`` (embeddings L2-normalised by the caller).
* :func:`rerank_kl_loss` — KARD's reranker objective (Kang et al. 2023, Eq. 6):
  ``KL( softmax(target / t1) || softmax(score / t2) )`` over each question's candidates,
  target = each candidate's BM25 score against the rationale; the mean over questions.
* :func:`rerank_ce_loss` — the option: cross-entropy of ``softmax(score / t2)`` to the
  candidate with the highest target.

Candidates are padded to ``K`` per question; ``mask`` (B, K) marks the real ones. A question
with no real candidate contributes 0 and does not count in the mean.

Reduction follows the project's rule (:func:`kale_ray.core.losses.masked_mean`): the loss is the
*global sample mean*, ``sum of per-question losses / global_count``. With data parallelism pass
``global_count`` = the all-reduced :func:`rerank_count` of the step; then the workers' losses
(and gradients) add up to those of the whole batch, whatever its split. ``None`` = this batch alone.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kale_ray.core.losses import masked_mean

_NEG = -1e9


def maxsim(q: Tensor, q_mask: Tensor, p: Tensor, p_mask: Tensor) -> Tensor:
    """Late-interaction scores of every query against every passage.

    Args:
        q: (Bq, Lq, D) query token embeddings; q_mask: (Bq, Lq) 1 for real tokens.
        p: (Bp, Lp, D) passage token embeddings; p_mask: (Bp, Lp).
    Returns:
        (Bq, Bp): ``sum_i max_j q_i . p_j`` over real query tokens i and real passage tokens j.
    """
    sim = torch.einsum("qid,pjd->qpij", q.float(), p.float())  # (Bq, Bp, Lq, Lp)
    sim = sim.masked_fill(p_mask[None, :, None, :] == 0, _NEG)
    best = sim.max(dim=-1).values  # (Bq, Bp, Lq)
    best = best.masked_fill(q_mask[:, None, :] == 0, 0.0)
    return best.sum(dim=-1)


def maxsim_paired(q: Tensor, q_mask: Tensor, p: Tensor, p_mask: Tensor) -> Tensor:
    """Scores of each query against its own K passages.

    Args: q (B, Lq, D), q_mask (B, Lq), p (B, K, Lp, D), p_mask (B, K, Lp). Returns (B, K).
    """
    sim = torch.einsum("bid,bkjd->bkij", q.float(), p.float())  # (B, K, Lq, Lp)
    sim = sim.masked_fill(p_mask[:, :, None, :] == 0, _NEG)
    best = sim.max(dim=-1).values  # (B, K, Lq)
    best = best.masked_fill(q_mask[:, None, :] == 0, 0.0)
    return best.sum(dim=-1)


def _masked_log_softmax(x: Tensor, mask: Tensor) -> Tensor:
    return torch.log_softmax(x.float().masked_fill(mask == 0, _NEG), dim=-1)


def rerank_count(mask: Tensor) -> int:
    """The loss's normaliser for one batch: questions with at least one real candidate. ``mask`` (B, K)."""
    return int(mask.any(dim=-1).sum())


def _sample_mean(per_row: Tensor, mask: Tensor, global_count: Tensor | float | None) -> Tensor:
    """Sum over the questions with a real candidate / ``global_count`` (default: their number here)."""
    return masked_mean(per_row, mask.any(dim=-1), global_count)


def rerank_kl_per_question(scores: Tensor, targets: Tensor, mask: Tensor, t1: float = 1.0, t2: float = 1.0
                           ) -> Tensor:
    """(B,) ``KL(softmax(targets_b / t1) || softmax(scores_b / t2))`` over each question's real candidates."""
    log_p = _masked_log_softmax(targets / t1, mask)  # (B, K) target distribution
    log_q = _masked_log_softmax(scores / t2, mask)  # (B, K) model distribution
    p = log_p.exp() * mask
    return (p * (log_p - log_q)).masked_fill(mask == 0, 0.0).sum(dim=-1)  # (B,)


def rerank_ce_per_question(scores: Tensor, targets: Tensor, mask: Tensor, t2: float = 1.0) -> Tensor:
    """(B,) cross-entropy of ``softmax(scores_b / t2)`` to the candidate with the highest target."""
    best = targets.float().masked_fill(mask == 0, _NEG).argmax(dim=-1)  # (B,)
    log_q = _masked_log_softmax(scores / t2, mask)
    return -log_q.gather(1, best[:, None]).squeeze(1)  # (B,)


def rerank_kl_loss(scores: Tensor, targets: Tensor, mask: Tensor, t1: float = 1.0, t2: float = 1.0,
                   global_count: Tensor | float | None = None) -> Tensor:
    """``sum_b KL(softmax(targets_b / t1) || softmax(scores_b / t2)) / global_count`` over real candidates.

    Args: scores (B, K) reranker scores; targets (B, K) BM25 scores vs the rationale; mask (B, K);
    global_count: questions in the whole step (all workers); None = :func:`rerank_count` of this batch.
    Returns: a 0-d tensor, fp32. 0 when the two distributions are equal.
    """
    return _sample_mean(rerank_kl_per_question(scores, targets, mask, t1, t2), mask, global_count)


def rerank_ce_loss(scores: Tensor, targets: Tensor, mask: Tensor, t2: float = 1.0,
                   global_count: Tensor | float | None = None) -> Tensor:
    """Cross-entropy of ``softmax(scores / t2)`` to the candidate with the highest target, summed over the
    questions / ``global_count`` (as :func:`rerank_kl_loss`). Returns 0-d."""
    return _sample_mean(rerank_ce_per_question(scores, targets, mask, t2), mask, global_count)


def rerank_loss(kind: str, scores: Tensor, targets: Tensor, mask: Tensor, t1: float, t2: float,
                global_count: Tensor | float | None = None) -> Tensor:
    """This batch's share of the step's global sample mean of loss ``kind`` (``kl`` or ``ce``)."""
    if kind == "kl":
        return rerank_kl_loss(scores, targets, mask, t1, t2, global_count)
    if kind == "ce":
        return rerank_ce_loss(scores, targets, mask, t2, global_count)
    raise ValueError(f"unknown reranker loss {kind!r} (kl, ce)")
