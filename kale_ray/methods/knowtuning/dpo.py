"""KnowTuning's knowledge-comparison loss on the trainer's registry: ``loss: dpo``.

Per (better, worse) pair ``i`` (Lyu et al. 2024, Stage II; the official run is LLaMA-Factory's
DPO with ``dpo_ftx 0.2``)::

    l_i = dpo_loss(pc_i, pr_i, rc_i, rr_i; beta, loss_type) + gamma * sft_i
    sft_i = mean over the chosen answer's tokens of -log p(token)

``pc / pr`` are the policy's log-probabilities of the chosen / rejected answer given the
prompt (sums over the answer tokens; *means* for ``loss_type: ipo``, which is defined on
length-normalised log-probs), ``rc / rr`` the reference's. The step's loss is
``sum_i l_i / G`` with ``G`` = pairs of the step over all micro-batches and workers
(``count_fn`` = pairs, ``dist.global_count``): every term is per pair, so the loss and its
gradient do not depend on how the pairs are sharded or accumulated.

One forward per micro-batch: the collator puts the ``B`` chosen sequences and then the
``B`` rejected ones in one ``(2B, T)`` batch; :class:`~kale_ray.train.heads.AnswerLogits`
gives logits at the answer positions only ``(N, V)``, and per-sequence sums are gathered
from the per-token log-probs with ``index_add`` (equal to
:func:`kale_ray.core.losses.sequence_logprobs` on the full logits; a test checks it).

The reference (``cfg.dpo.reference``):

* ``"precomputed"`` (KnowTuning's recipe): :func:`add_reference_logps` scores every pair once
  with the base model in a batched pass (a Ray Data actor or this process) before
  training, and the rows carry ``ref_chosen_logp`` / ``ref_rejected_logp``; no second model
  and no second forward during training;
* ``"adapter_disabled"``: with LoRA, a no-grad forward of the same model under
  ``lm.disable_adapter()`` every micro-batch (no extra memory, one extra forward).

Logged per step (sums over the step's pairs / G, i.e. means over pairs): ``dpo``, ``sft``,
``reward_margin`` (``beta * (chosen log-ratio - rejected log-ratio)``), ``reward_accuracy``
(share of pairs with chosen reward > rejected reward), ``chosen_reward``, ``rejected_reward``.
In the trainer's history ``tokens`` is the step's normaliser, here its pairs, and ``samples``
counts sequences: two per pair.

Torch only at import (plus a tokenizer for the collator); the reference pass imports Ray
lazily when asked to use it.
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from kale_ray.core.losses import IGNORE_INDEX, dpo_loss, masked_mean, token_cross_entropy
from kale_ray.train.collators import (
    RowCollator,
    EMPTY_COMPLETION,
    MISSING_FIELD,
    build_sequence,
    pad_views,
    rows_from_columns,
)
from kale_ray.train.registry import StepContext, register_loss

REF_CHOSEN = "ref_chosen_logp"
REF_REJECTED = "ref_rejected_logp"
MISSING_REFERENCE = "missing_reference"
TEXT_FIELDS = ("prompt", "chosen", "rejected")


# --------------------------------------------------------------------------- collator


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class PairCollator(RowCollator):
    """Rows ``{id, prompt, chosen, rejected[, ref_chosen_logp, ref_rejected_logp]}`` -> one batch of 2B sequences.

    Batch (``B`` pairs kept, ``T`` the longest sequence, right padding)::

        input_ids / attention_mask / labels   (2B, T)  rows 0..B-1: prompt + chosen, B..2B-1: prompt + rejected;
                                                       labels on the answer tokens only
        ref_chosen_logps / ref_rejected_logps (B,)     float32, with ``with_reference``

    Both answers of a pair see the same prompt tokens: a prompt too long is cut from the
    left to fit the longer answer. A pair is rejected (counted per reason in ``rejects``,
    once per id) when a field is missing, an answer is empty or too long, or (with
    ``with_reference``) a reference log-prob is missing or not finite.
    """

    def __init__(self, tokenizer: Any, max_seq_len: int, with_reference: bool = False, keep_rejected: int = 1000):
        super().__init__(tokenizer, max_seq_len, keep_rejected)
        self.with_reference = with_reference

    def collate(self, rows: Iterable[Mapping[str, Any]] | Mapping[str, Any]
                ) -> tuple[dict[str, Tensor] | None, list[int]]:
        """``(batch or None, indices of the rows kept)``."""
        rows = rows_from_columns(rows) if isinstance(rows, Mapping) else list(rows)
        self.stats["rows_in"] += len(rows)
        ok: list[int] = []
        refs: list[tuple[float, float]] = []
        for i, row in enumerate(rows):
            missing = next((f for f in TEXT_FIELDS if not isinstance(row.get(f), str)), None)
            if missing is not None:
                self._reject(row, MISSING_FIELD, field=missing)
                continue
            if self.with_reference:
                rc, rr = _finite(row.get(REF_CHOSEN)), _finite(row.get(REF_REJECTED))
                if rc is None or rr is None:
                    self._reject(row, MISSING_REFERENCE)
                    continue
                refs.append((rc, rr))
            ok.append(i)
        toks = {f: self._tokenize([rows[i][f] for i in ok]) for f in TEXT_FIELDS}
        chosen, rejected, kept, kept_refs = [], [], [], []
        for j, i in enumerate(ok):
            p, c, r = toks["prompt"][j], toks["chosen"][j], toks["rejected"][j]
            if not c or not r:
                self._reject(rows[i], EMPTY_COMPLETION, which="chosen" if not c else "rejected")
                continue
            longer = c if len(c) >= len(r) else r
            seq, n_ctx, reason, truncated = build_sequence(p, longer, self.max_seq_len, self.bos_id)
            if reason is not None:
                self._reject(rows[i], reason, completion_tokens=len(longer), max_seq_len=self.max_seq_len)
                continue
            self.stats["prompt_truncated"] += int(truncated)
            ctx = seq[:n_ctx]
            chosen.append((ctx + c, n_ctx))
            rejected.append((ctx + r, n_ctx))
            kept.append(i)
            if self.with_reference:
                kept_refs.append(refs[j])
        self.stats["rows_out"] += len(kept)
        if not kept:
            return None, []
        batch = pad_views(chosen + rejected, self.pad_id)
        if self.with_reference:
            ref = torch.tensor(kept_refs, dtype=torch.float32)  # (B, 2)
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:, 0].contiguous(), ref[:, 1].contiguous()
        return batch, kept

    def __call__(self, rows: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, Tensor] | None:
        return self.collate(rows)[0]


def dpo_collator(tokenizer: Any, cfg: Any) -> PairCollator:
    return PairCollator(tokenizer, cfg.max_seq_len, with_reference=cfg.dpo.reference == "precomputed")


def count_pairs(batch: dict[str, Tensor]) -> int:
    """The loss's normaliser: pairs in the micro-batch (half its sequences)."""
    return int(batch["input_ids"].shape[0]) // 2


# --------------------------------------------------------------------------- log-probs


def answer_logps(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per-sequence sum of the answer tokens' log-probs and their number: ``(S,), (S,)`` for ``S`` sequences.

    ``model`` is an :class:`~kale_ray.train.heads.AnswerLogits` (or its DeepSpeed engine):
    logits only at the answer positions ``(N, V)``; token ``k`` belongs to row
    ``(labels[:, 1:] != -100).nonzero()[k, 0]`` (the row-major order of ``select_positions``).
    Log-probs in fp32 (:func:`~kale_ray.core.losses.token_cross_entropy`).
    """
    labels = batch["labels"]  # (S, T)
    logits, targets = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    rows = (labels[:, 1:] != IGNORE_INDEX).nonzero()[:, 0]  # (N,)
    token_logp = -token_cross_entropy(logits, targets)  # (N,) fp32
    s = labels.shape[0]
    sums = torch.zeros(s, dtype=token_logp.dtype, device=token_logp.device).index_add(0, rows, token_logp)  # (S,)
    counts = torch.bincount(rows, minlength=s)  # (S,)
    return sums, counts


def _lm(model):
    """The (PEFT) causal LM inside an AnswerLogits or the DeepSpeed engine wrapping one."""
    return model.module.lm if hasattr(model, "module") else model.lm


def reference_logps(model, batch: dict[str, Tensor], cfg) -> Tensor:
    """The reference's per-sequence sums ``(2B,)``: precomputed columns, or the model with its adapter off."""
    if cfg.dpo.reference == "precomputed":
        if "ref_chosen_logps" not in batch:
            raise KeyError("dpo.reference=precomputed but the batch has no reference log-probs; "
                           "run kale_ray.methods.knowtuning.dpo.add_reference_logps on the rows first")
        return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).float()
    lm = _lm(model)
    if not hasattr(lm, "disable_adapter"):
        raise ValueError("dpo.reference=adapter_disabled needs LoRA (lora.enabled=true); "
                         "without an adapter use dpo.reference=precomputed")
    with torch.no_grad(), lm.disable_adapter():
        sums, _ = answer_logps(model, batch)
    return sums


@register_loss("dpo", collator_factory=dpo_collator, count_fn=count_pairs)
def dpo_compute(model, batch, cfg, dist: StepContext):
    """KnowTuning DPO: dpo_loss(policy vs reference) + gamma x SFT on the chosen answer, per pair."""
    d = cfg.dpo
    sums, counts = answer_logps(model, batch)  # (2B,), (2B,)
    b = counts.shape[0] // 2
    ref = reference_logps(model, batch, cfg).to(sums)  # (2B,)
    n_tok = counts.clamp(min=1).to(sums.dtype)  # (2B,)
    if d.loss_type == "ipo":  # IPO is defined on length-normalised log-probs
        pol, ref = sums / n_tok, ref / n_tok
    else:
        pol = sums
    losses, chosen_r, rejected_r = dpo_loss(pol[:b], pol[b:], ref[:b], ref[b:], beta=d.beta,
                                            loss_type=d.loss_type, label_smoothing=d.label_smoothing)  # (B,) x3
    sft = -sums[:b] / n_tok[:b]  # (B,) mean CE of each chosen answer
    per_pair = losses + d.gamma * sft if d.gamma > 0 else losses
    every = torch.ones_like(losses, dtype=torch.bool)
    g = dist.global_count

    def share(x: Tensor) -> Tensor:
        return masked_mean(x, every, g)

    loss = share(per_pair)
    with torch.no_grad():
        margin = chosen_r - rejected_r
        metrics = {"dpo": share(losses.detach()), "sft": share(sft.detach()), "reward_margin": share(margin),
                   "reward_accuracy": share((margin > 0).to(margin.dtype)), "chosen_reward": share(chosen_r),
                   "rejected_reward": share(rejected_r)}
    return loss, metrics


# --------------------------------------------------------------------------- reference pass


class PairScorer:
    """Log-probs of both answers of every pair under one model: a Ray Data callable class, or local.

    ``model_path`` is an HF folder (the base model); ``adapter`` an optional PEFT adapter
    folder on top of it (to score a trained policy). Rows are collated exactly as in
    training (:class:`PairCollator`, same ``max_seq_len``), so a precomputed reference is the
    number the ``adapter_disabled`` reference would give, up to float noise from padding.
    """

    def __init__(self, model_path: str, max_seq_len: int, batch_size: int = 8, use_gpu: bool = False,
                 adapter: str | None = None, threads: int = 0, trust_remote_code: bool = False):
        from kale_ray.models import load_causal_lm, load_tokenizer
        from kale_ray.train.heads import AnswerLogits

        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        dtype = "bfloat16" if use_gpu else "float32"  # as the trainer loads the policy
        lm = load_causal_lm(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        if adapter:
            from peft import PeftModel

            lm = PeftModel.from_pretrained(lm, adapter)
        self.model = AnswerLogits(lm).to(self.device).eval()
        self.collator = PairCollator(load_tokenizer(model_path, trust_remote_code), max_seq_len)
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """``(chosen (n,), rejected (n,))`` float64 sums over the answer tokens; NaN for a rejected row."""
        n = len(rows)
        chosen, rejected = np.full(n, np.nan), np.full(n, np.nan)
        for start in range(0, n, self.batch_size):
            chunk = list(rows[start: start + self.batch_size])
            batch, kept = self.collator.collate(chunk)
            if batch is None:
                continue
            sums, _ = answer_logps(self.model, {k: v.to(self.device) for k, v in batch.items()})
            sums = sums.double().cpu().numpy()
            idx = np.asarray(kept) + start
            chosen[idx], rejected[idx] = sums[: len(kept)], sums[len(kept):]
        return chosen, rejected

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chosen, rejected = self.score(rows_from_columns(batch))
        batch[REF_CHOSEN], batch[REF_REJECTED] = chosen, rejected
        return batch


def pair_logps(rows: Sequence[Mapping[str, Any]], model_path: str, max_seq_len: int, batch_size: int = 8,
               mode: str = "auto", use_gpu: bool = False, adapter: str | None = None, threads: int = 0,
               trust_remote_code: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(chosen, rejected)`` log-prob sums of every row, in order (NaN where the collator rejects the row).

    ``mode="ray"`` (``"auto"`` with Ray initialised): one Ray Data ``map_batches`` actor loads
    the model once and scores the rows in batches; ``"local"``: the same in this process.
    """
    kwargs = {"model_path": model_path, "max_seq_len": max_seq_len, "batch_size": batch_size, "use_gpu": use_gpu,
              "adapter": adapter, "threads": threads, "trust_remote_code": trust_remote_code}
    from kale_ray.runtime.generate import map_in_order, use_ray

    if not use_ray(mode):
        return PairScorer(**kwargs).score(rows)
    got = map_in_order([{f: str(r.get(f, "")) for f in ("id", *TEXT_FIELDS)} for r in rows], PairScorer, batch_size,
                       what="the reference pass", fn_constructor_kwargs=kwargs, num_gpus=1 if use_gpu else 0)
    return (np.array([float(r[REF_CHOSEN]) for r in got]), np.array([float(r[REF_REJECTED]) for r in got]))


def add_reference_logps(rows: Sequence[Mapping[str, Any]], model_path: str, cfg, batch_size: int = 8,
                        mode: str = "auto", threads: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows with ``ref_chosen_logp`` / ``ref_rejected_logp`` from ``model_path`` (the base), and a summary.

    ``cfg`` is the :class:`~kale_ray.config.TrainConfig` of the DPO run (its ``max_seq_len``,
    ``use_gpu`` and model options). Run it once before ``run_training`` with
    ``dpo.reference: precomputed``. A row the collator would reject gets NaN (and is then
    rejected in training with the collator's reason).
    """
    t0 = time.perf_counter()
    chosen, rejected = pair_logps(rows, model_path, cfg.max_seq_len, batch_size, mode, cfg.use_gpu,
                                  threads=threads, trust_remote_code=cfg.model.trust_remote_code)
    out = [{**r, REF_CHOSEN: float(c), REF_REJECTED: float(j)} for r, c, j in zip(rows, chosen, rejected)]
    summary = {"rows": len(out), "scored": int(np.isfinite(chosen).sum()), "model": model_path,
               "seconds": round(time.perf_counter() - t0, 2)}
    return out, summary


def reward_stats(policy_chosen: np.ndarray, policy_rejected: np.ndarray, ref_chosen: np.ndarray,
                 ref_rejected: np.ndarray, beta: float) -> dict[str, float]:
    """Implicit-reward accuracy and mean margin over the pairs scored by both models (NaN rows left out)."""
    margin = beta * ((np.asarray(policy_chosen) - ref_chosen) - (np.asarray(policy_rejected) - ref_rejected))
    margin = margin[np.isfinite(margin)]
    return {"pairs": int(margin.size), "reward_accuracy": float((margin > 0).mean()) if margin.size else float("nan"),
            "reward_margin": float(margin.mean()) if margin.size else float("nan")}
