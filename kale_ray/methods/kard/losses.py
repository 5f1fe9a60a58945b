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
"""
from __future__ import annotations

import torch
from torch import Tensor

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


def _row_mean(per_row: Tensor, mask: Tensor) -> Tensor:
    valid = mask.any(dim=-1)
    if not bool(valid.any()):
        return per_row.sum() * 0.0
    return per_row[valid].mean()


def rerank_kl_loss(scores: Tensor, targets: Tensor, mask: Tensor, t1: float = 1.0, t2: float = 1.0) -> Tensor:
    """``mean_b KL(softmax(targets_b / t1) || softmax(scores_b / t2))`` over real candidates.

    Args: scores (B, K) reranker scores; targets (B, K) BM25 scores vs the rationale; mask (B, K).
    Returns: a 0-d tensor, fp32. 0 when the two distributions are equal.
    """
    log_p = _masked_log_softmax(targets / t1, mask)  # (B, K) target distribution
    log_q = _masked_log_softmax(scores / t2, mask)  # (B, K) model distribution
    p = log_p.exp() * mask
    kl = (p * (log_p - log_q)).masked_fill(mask == 0, 0.0).sum(dim=-1)  # (B,)
    return _row_mean(kl, mask)


def rerank_ce_loss(scores: Tensor, targets: Tensor, mask: Tensor, t2: float = 1.0) -> Tensor:
    """Cross-entropy of ``softmax(scores / t2)`` to the candidate with the highest target. Returns 0-d."""
    best = targets.float().masked_fill(mask == 0, _NEG).argmax(dim=-1)  # (B,)
    log_q = _masked_log_softmax(scores / t2, mask)
    nll = -log_q.gather(1, best[:, None]).squeeze(1)  # (B,)
    return _row_mean(nll, mask)


def rerank_loss(kind: str, scores: Tensor, targets: Tensor, mask: Tensor, t1: float, t2: float) -> Tensor:
    if kind == "kl":
        return rerank_kl_loss(scores, targets, mask, t1, t2)
    if kind == "ce":
        return rerank_ce_loss(scores, targets, mask, t2)
    raise ValueError(f"unknown reranker loss {kind!r} (kl, ce)")
