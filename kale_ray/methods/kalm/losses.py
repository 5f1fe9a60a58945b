"""KaLM's training loss on the trainer's registry: ``loss: kalm``.

``L = L_exp + lambda * L_LM`` (KaLM, Yu et al. 2024; official code PursuitYP/KaLM):

* ``L_exp``, explicit alignment: view A "[ head, relation ]" and view B "{ tail }" are run
  through the LM; each is embedded by the last-layer hidden state of its last non-pad token,
  L2-normalised; ``S = (e_hr . e_t^T - margin I) / tau`` over the micro-batch; in-batch false
  negatives (same tail, or another known tail of (h, r)) are masked out; symmetric InfoNCE
  ``(CE(S) + CE(S^T)) / 2`` (:func:`kale_ray.core.losses.info_nce`).
* ``L_LM``, implicit alignment: cross-entropy of the tail tokens given the triple-completion
  instruction (prompt tokens unlabelled).

Reduction (the trainer's contract, :mod:`kale_ray.train.registry`): the normaliser is the
number of *triples* (``count_fn``), ``G`` = triples of the step over all micro-batches and
workers. A micro-batch returns ``(sum of its rows' L_exp + lambda * sum of its rows' L_LM) / G``
with ``L_LM`` of a row = the mean CE over that row's tail tokens. The ``L_LM`` term is
therefore exactly invariant to sharding and accumulation; ``L_exp`` is not by nature (a
row's negatives are the other rows of its micro-batch) unless ``kalm.gather_negatives``
makes the negatives every worker's micro-batch (see :func:`global_batch_share`).

Differences from the official code, on purpose: the temperature is fixed (the official
``log_inv_t`` parameter lives on the HF Trainer, not the model, so the optimizer never sees
it: it stays 1/0.05); the LM term uses every row of the batch (the official one samples 4 of
8 rows to save memory); masked pairs get ``-inf`` (official ``-1e4``: the same softmax).

Pure torch (+ a tokenizer for the collator): imports no Ray or DeepSpeed.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor

from kale_ray.core.losses import IGNORE_INDEX, info_nce, token_cross_entropy
from kale_ray.train.collators import (
    RowCollator,
    COMPLETION_TOO_LONG,
    EMPTY_COMPLETION,
    MISSING_FIELD,
    build_sequence,
    pad_views,
    rows_from_columns,
)
from kale_ray.train.registry import StepContext, register_loss

EMPTY_VIEW = "empty_view"
TEXT_FIELDS = ("query_text", "key_text", "prompt", "completion")


# --------------------------------------------------------------------------- pure pieces


def last_token_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Hidden state of each row's last non-pad token: ``(B, T, H), (B, T) -> (B, H)``.

    Works for right and left padding (the last position whose mask is 1).
    """
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden (B, T, H) and mask (B, T), got {tuple(hidden.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    positions = torch.arange(hidden.shape[1], device=hidden.device)  # (T,)
    last = torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).amax(dim=1)  # (B,)
    if bool((last < 0).any()):
        raise ValueError("a row has no non-pad token")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)


def false_negative_mask(tail_ids: Tensor, known_tails: Tensor) -> Tensor:
    """``(B,), (B, K) -> (B, B)`` bool: True at ``(i, j)`` when key ``j`` is also a true answer for query ``i``.

    Key ``j`` (entity ``tail_ids[j]``) is a false negative for query ``i`` = (h_i, r_i) when
    it is the same entity as ``i``'s tail, or one of ``known_tails[i]`` (every training tail
    of (h_i, r_i); ``-1`` pads a row). The diagonal is True (``info_nce`` ignores it).

    >>> false_negative_mask(torch.tensor([5, 6, 5]), torch.tensor([[5, 6], [6, -1], [5, -1]])).int().tolist()
    [[1, 1, 1], [0, 1, 0], [1, 0, 1]]
    """
    if tail_ids.dim() != 1 or known_tails.dim() != 2 or known_tails.shape[0] != tail_ids.shape[0]:
        raise ValueError(f"expected tail_ids (B,) and known_tails (B, K), got {tuple(tail_ids.shape)} and "
                         f"{tuple(known_tails.shape)}")
    same_tail = tail_ids[:, None] == tail_ids[None, :]  # (B, B)
    known = (known_tails[:, :, None] == tail_ids[None, None, :]).any(dim=1)  # (B, K, B) -> (B, B)
    return same_tail | known


def exp_loss_sum(query: Tensor, keys: Tensor, mask: Tensor | None, tau: float, margin: float,
                 symmetric: bool) -> Tensor:
    """Sum over the ``B`` rows of the (symmetric) InfoNCE: ``info_nce(...) * B`` (0-d)."""
    return info_nce(query, keys, tau=tau, margin=margin, false_negative_mask=mask, symmetric=symmetric) * query.shape[0]


def global_batch_share(local_q: Tensor, local_k: Tensor, gathered_q: Tensor, gathered_k: Tensor, offset: int,
                       world_size: int, mask: Tensor | None, tau: float, margin: float, symmetric: bool,
                       global_count: float) -> Tensor:
    """One worker's term of ``L_exp`` over the *gathered* batch of all workers (``gather_negatives``).

    ``gathered_*`` ``(G, H)`` are every worker's embeddings (no gradient); this worker's rows
    ``offset : offset + B`` are replaced by ``local_*`` ``(B, H)`` (with gradient), and
    ``x = sum over the G rows of InfoNCE / global_count`` is computed on every worker. The
    return value is ``x - x.detach() + x.detach() / world_size``:

    * its *value* is ``x / world_size``, so the values summed over workers give ``x`` once;
    * its *gradient* is ``dx`` through this worker's embeddings only; summed over workers
      (DeepSpeed's average times the trainer's ``world_size`` factor) that is the full ``dx``.

    The cost: one all_gather of ``2 x (B, H)`` embeddings per micro-batch and a ``(G, G)``
    score matrix on every worker (G = B x workers): small next to the forward passes.
    """
    b = local_q.shape[0]
    q = torch.cat([gathered_q[:offset], local_q, gathered_q[offset + b:]])  # (G, H)
    k = torch.cat([gathered_k[:offset], local_k, gathered_k[offset + b:]])  # (G, H)
    x = exp_loss_sum(q, k, mask, tau, margin, symmetric) / global_count
    return x - x.detach() + x.detach() / world_size


def per_row_mean(values: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """Mean of ``values`` ``(N,)`` per row id ``rows`` ``(N,)``: ``(B,)`` (0 for a row with none)."""
    sums = torch.zeros(num_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)
    counts = torch.zeros(num_rows, dtype=values.dtype, device=values.device).index_add(
        0, rows, torch.ones_like(values))
    return sums / counts.clamp(min=1)


# --------------------------------------------------------------------------- collator


def _pad_right(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class KaLMCollator(RowCollator):
    """Rows (:func:`kale_ray.methods.kalm.data.training_rows`) -> both views, the LM batch, the ids.

    Batch (``B`` rows kept)::

        query_input_ids / query_attention_mask   (B, Tq)  "[ head, relation ]", no special tokens
        key_input_ids / key_attention_mask       (B, Tk)  "{ tail }"
        input_ids / attention_mask / labels      (B, T)   prompt + completion, labels on the tail tokens
        tail_ids                                 (B,)     entity id of each key
        known_tails                              (B, K)   training tails of each (h, r), -1 padded

    Rejected rows (missing field, empty view, completion longer than ``max_seq_len``) are
    counted per reason in ``rejects``; a view longer than ``max_embed_len`` tokens is cut on
    the right and counted in ``stats``. Returns ``None`` when every row was rejected.
    """

    def __init__(self, tokenizer: Any, max_seq_len: int, max_embed_len: int, keep_rejected: int = 1000):
        super().__init__(tokenizer, max_seq_len, keep_rejected, min_seq_len=1)
        self.max_embed_len = max_embed_len

    def _view(self, ids: list[int], name: str) -> list[int]:
        if len(ids) > self.max_embed_len:
            self.stats[f"{name}_truncated"] += 1
            return ids[: self.max_embed_len]
        return ids

    def __call__(self, rows: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, Tensor] | None:
        rows = rows_from_columns(rows) if isinstance(rows, Mapping) else list(rows)
        self.stats["rows_in"] += len(rows)
        ok = []
        for row in rows:
            missing = next((f for f in TEXT_FIELDS if not isinstance(row.get(f), str)), None)
            if missing is None and row.get("tail") is None:
                missing = "tail"
            if missing is not None:
                self._reject(row, MISSING_FIELD, field=missing)
            else:
                ok.append(row)
        toks = {f: self._tokenize([r[f] for r in ok]) for f in TEXT_FIELDS}
        queries, keys, lm, tails, known = [], [], [], [], []
        for i, row in enumerate(ok):
            if not toks["query_text"][i] or not toks["key_text"][i]:
                self._reject(row, EMPTY_VIEW)
                continue
            seq, n_ctx, reason, truncated = build_sequence(toks["prompt"][i], toks["completion"][i],
                                                          self.max_seq_len, self.bos_id)
            if reason is not None:
                self._reject(row, reason, completion_tokens=len(toks["completion"][i]), max_seq_len=self.max_seq_len)
                continue
            self.stats["prompt_truncated"] += int(truncated)
            queries.append(self._view(toks["query_text"][i], "query"))
            keys.append(self._view(toks["key_text"][i], "key"))
            lm.append((seq, n_ctx))
            tails.append(int(row["tail"]))
            kt = row.get("known_tails")
            known.append([] if kt is None else np.asarray(kt, dtype=np.int64).reshape(-1).tolist())
        self.stats["rows_out"] += len(lm)
        if not lm:
            return None
        batch = pad_views(lm, self.pad_id)
        batch["query_input_ids"], batch["query_attention_mask"] = _pad_right(queries, self.pad_id)
        batch["key_input_ids"], batch["key_attention_mask"] = _pad_right(keys, self.pad_id)
        batch["tail_ids"] = torch.tensor(tails, dtype=torch.long)
        width = max(1, max(len(k) for k in known))
        known_t = torch.full((len(known), width), -1, dtype=torch.long)
        for i, k in enumerate(known):
            known_t[i, : len(k)] = torch.tensor(k, dtype=torch.long)
        batch["known_tails"] = known_t
        return batch


def kalm_collator(tokenizer: Any, cfg: Any) -> KaLMCollator:
    return KaLMCollator(tokenizer, cfg.max_seq_len, cfg.kalm.max_embed_len)


def count_triples(batch: dict[str, Tensor]) -> int:
    """The loss's normaliser: triples (rows) in the micro-batch."""
    return int(batch["tail_ids"].shape[0])


# --------------------------------------------------------------------------- model side


def embed_views(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Both views in one forward pass: ``(e_hr (B, H), e_t (B, H))``, not normalised."""
    q_ids, q_mask = batch["query_input_ids"], batch["query_attention_mask"]  # (B, Tq)
    k_ids, k_mask = batch["key_input_ids"], batch["key_attention_mask"]  # (B, Tk)
    b, width = q_ids.shape[0], max(q_ids.shape[1], k_ids.shape[1])

    def widen(x: Tensor, fill: int) -> Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill)

    # Right padding: the extra positions come after each row's last real token and are masked,
    # so (causal attention) they change nothing that is read; their id does not matter.
    ids = torch.cat([widen(q_ids, 0), widen(k_ids, 0)])  # (2B, T)
    mask = torch.cat([widen(q_mask, 0), widen(k_mask, 0)])  # (2B, T)
    hidden = model(input_ids=ids, attention_mask=mask, output="hidden")  # (2B, T, H)
    pooled = last_token_pool(hidden, mask)  # (2B, H)
    return pooled[:b], pooled[b:]


def _all_gather_padded(x: Tensor, sizes: list[int], world: int) -> list[Tensor]:
    """Rows of ``x`` ``(B_r, ...)`` from every worker (sizes known), no gradient."""
    pad = max(sizes) - x.shape[0]
    padded = torch.nn.functional.pad(x.detach(), (0, 0) * (x.dim() - 1) + (0, pad)) if pad else x.detach()
    out = [torch.empty_like(padded) for _ in range(world)]
    tdist.all_gather(out, padded.contiguous())
    return [o[:n] for o, n in zip(out, sizes)]


def gather_batch(q: Tensor, k: Tensor, tail_ids: Tensor, known: Tensor, rank: int, world: int):
    """Every worker's embeddings and ids of this micro-batch index: ``(Q, K, tails, known, offset)``."""
    shape = torch.tensor([q.shape[0], known.shape[1]], dtype=torch.long, device=q.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    tdist.all_gather(shapes, shape)
    sizes = [int(s[0]) for s in shapes]
    k_width = max(int(s[1]) for s in shapes)
    known = torch.nn.functional.pad(known, (0, k_width - known.shape[1]), value=-1)
    q_all = torch.cat(_all_gather_padded(q, sizes, world))
    k_all = torch.cat(_all_gather_padded(k, sizes, world))
    tails_all = torch.cat(_all_gather_padded(tail_ids[:, None], sizes, world))[:, 0]
    known_all = torch.cat(_all_gather_padded(known, sizes, world))
    return q_all, k_all, tails_all, known_all, sum(sizes[:rank])


@register_loss("kalm", collator_factory=kalm_collator, count_fn=count_triples)
def kalm_compute(model, batch, cfg, dist: StepContext):
    """KaLM: dual-view InfoNCE over (h, r) / t embeddings + lm_weight * triple-completion CE."""
    kc = cfg.kalm
    b = int(batch["tail_ids"].shape[0])
    count = float(dist.global_count) if dist.global_count is not None else float(b)
    q, k = embed_views(model, batch)  # (B, H), (B, H)
    tails, known = batch["tail_ids"], batch["known_tails"]
    gather = kc.gather_negatives and dist.world_size > 1 and tdist.is_available() and tdist.is_initialized()
    if gather:
        q_all, k_all, tails_all, known_all, offset = gather_batch(q, k, tails, known, dist.rank, dist.world_size)
        mask = false_negative_mask(tails_all, known_all) if kc.mask_false_negatives else None
        exp = global_batch_share(q, k, q_all, k_all, offset, dist.world_size, mask, kc.tau, kc.margin,
                                 kc.symmetric, count)
        local_mask = None if mask is None else mask[offset: offset + b]  # (B, G)
        n_keys = q_all.shape[0]
    else:
        mask = false_negative_mask(tails, known) if kc.mask_false_negatives else None
        exp = exp_loss_sum(q, k, mask, kc.tau, kc.margin, kc.symmetric) / count
        local_mask, n_keys = mask, b
    with torch.no_grad():
        pos_cos = torch.nn.functional.cosine_similarity(q.float(), k.float(), dim=-1).sum() / count
        masked = 0 if local_mask is None else int(local_mask.sum()) - b  # off-diagonal false negatives
        negatives = (b * (n_keys - 1) - masked) / count
    metrics: dict[str, Any] = {"exp": exp.detach(), "pos_cos": pos_cos, "negatives": negatives}
    loss = exp
    if kc.lm_weight > 0:
        logits, targets = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                labels=batch["labels"])  # (N, V), (N,)
        rows = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero()[:, 0]  # (N,) row of each target
        lm = per_row_mean(token_cross_entropy(logits, targets), rows, b).sum() / count
        loss = loss + kc.lm_weight * lm
        metrics["lm"] = lm.detach()
    return loss, metrics
