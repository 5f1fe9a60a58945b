"""Pure loss functions for the four knowledge-aware post-training methods.

Torch only: this module must never import ray, vllm, deepspeed or transformers (a test
checks it), so trainers, tests and benchmarks can use it anywhere.

Conventions (after torchtune's ``modules/loss/kd_losses.py``):

* losses are small functions over plain tensors; shapes are written next to the code,
  e.g. ``# (N, V)``. ``B`` batch, ``T`` sequence, ``H`` hidden, ``V`` vocabulary,
  ``N`` selected (answer) tokens, ``D`` embedding dimension;
* softmaxes are computed in fp32 whatever the input dtype (fp64 inputs stay fp64);
* token-level losses return per-token values ``(N,)``; reduction is explicit via
  :func:`masked_mean`, which takes a ``global_count`` so that with data parallelism the
  per-shard losses add up to the loss of the whole batch (pass the all-reduced number of
  answer tokens);
* ``targets == IGNORE_INDEX`` (-100) contribute nothing and are not counted.

Methods and the loss each one uses:

* ``sft``      (KARD / KnowTuning fine-tuning):  :func:`sft_loss`
* ``kale``     (KALE knowledge-aware loss):      :func:`ka_loss`
* ``dpo``      (KnowTuning preference stage):    :func:`dpo_loss` (+ :func:`sequence_logprobs`)
* ``info_nce`` (KaLM explicit alignment):        :func:`info_nce`
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "dpo_loss",
    "info_nce",
    "ka_loss",
    "masked_mean",
    "masked_sum",
    "select_positions",
    "sequence_logprobs",
    "sft_loss",
    "token_cross_entropy",
    "token_kl",
]

IGNORE_INDEX = -100
KL_DIRECTIONS = ("forward", "reverse")
DPO_LOSS_TYPES = ("sigmoid", "ipo")


# --------------------------------------------------------------------------- helpers


def _upcast(x: Tensor) -> Tensor:
    """At least fp32: half/bfloat16 -> fp32; fp32/fp64 unchanged (so gradcheck works in fp64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _check_logits_targets(logits: Tensor, targets: Tensor, name: str = "logits") -> None:
    if logits.dim() != 2:
        raise ValueError(f"{name} must be (N, V), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(
            f"targets must be (N,) matching {name} (N, V): got {name} {tuple(logits.shape)} "
            f"and targets {tuple(targets.shape)}"
        )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_direction(direction: str) -> None:
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"unknown KL direction {direction!r}; expected one of {KL_DIRECTIONS}")


# --------------------------------------------------------------------------- reductions


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """``sum(values * mask)`` as a 0-d tensor.

    ``mask`` has the shape of ``values``. A bool mask *selects* (masked-out entries may be
    NaN/inf and still contribute exactly 0, and no NaN reaches the gradient); a float mask
    is a weight and is multiplied in.
    """
    _check_same_shape(values, mask, "values", "mask")
    if mask.dtype == torch.bool:
        return torch.where(mask, values, torch.zeros_like(values)).sum()
    return (values * mask.to(values.dtype)).sum()


def masked_mean(values: Tensor, mask: Tensor, global_count: Tensor | float | None = None) -> Tensor:
    """``sum(values * mask) / global_count`` as a 0-d tensor.

    ``global_count`` defaults to ``mask.sum()``. With data parallelism pass the all-reduced
    number of tokens: then ``sum over shards of masked_mean(shard, global_count=total)``
    equals ``masked_mean(whole batch)``, and so do the gradients.

    When the count is 0 the result is ``0.0`` and stays attached to the graph (its gradient
    is zero, never NaN). No host synchronisation: the zero case is handled with ``where``.
    """
    total = masked_sum(values, mask)  # ()
    if global_count is None:
        count = mask.sum().to(total.dtype)
    elif isinstance(global_count, Tensor):
        if global_count.numel() != 1:
            raise ValueError(f"global_count must be a scalar, got shape {tuple(global_count.shape)}")
        count = global_count.reshape(()).to(device=total.device, dtype=total.dtype)
    else:
        if global_count < 0:
            raise ValueError(f"global_count must be >= 0, got {global_count}")
        count = torch.tensor(float(global_count), device=total.device, dtype=total.dtype)
    positive = count > 0
    safe_count = torch.where(positive, count, torch.ones_like(count))
    # Double ``where``: the branch not taken never produces inf/NaN, so the gradient is clean.
    return torch.where(positive, total / safe_count, total * 0.0)


# --------------------------------------------------------------------------- token losses


def select_positions(hidden: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Pick the hidden states that predict a kept label (next-token alignment).

    ``hidden`` ``(B, T, H)``, ``labels`` ``(B, T)``; position ``t`` predicts ``labels[:, t+1]``.
    Returns ``(h_sel (N, H), targets (N,))`` for the ``N`` positions whose *next* label is
    not ``ignore_index``, in row-major (batch, then time) order.

    Use it to apply ``lm_head`` to the answer positions only, instead of materialising
    ``(B, T, V)`` logits for the prompt tokens too.

    >>> h = torch.arange(6.).reshape(1, 3, 2)
    >>> h_sel, t = select_positions(h, torch.tensor([[-100, -100, 7]]))
    >>> h_sel.tolist(), t.tolist()
    ([[2.0, 3.0]], [7])
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, H), got shape {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"labels must be (B, T) matching hidden (B, T, H): got hidden {tuple(hidden.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    next_labels = labels[:, 1:]  # (B, T-1)
    keep = next_labels != ignore_index  # (B, T-1)
    h_sel = hidden[:, :-1][keep]  # (N, H), row-major
    targets = next_labels[keep]  # (N,)
    return h_sel, targets


def token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token cross-entropy in fp32: ``(N, V), (N,) -> (N,)``.

    ``-log softmax(logits)[i, targets[i]]``; entries with ``targets == -100`` give 0.
    """
    _check_logits_targets(logits, targets)
    return F.cross_entropy(_upcast(logits), targets, reduction="none", ignore_index=IGNORE_INDEX)  # (N,)


def _kl_from_logprobs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q) = sum_v p (log p - log q)`` per row, ``0 * anything = 0`` (stable).

    ``where`` before the product: entries with ``p == 0`` (``-inf`` logits or underflow)
    contribute exactly 0 and no NaN reaches the gradient even if ``log q`` is ``-inf`` there.
    """
    p = log_p.exp()  # (N, V)
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))  # (N, V)
    return (p * diff).sum(dim=-1)  # (N,)


def token_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    direction: str = "forward",
) -> Tensor:
    """Per-token KL divergence in fp32: ``(N, V), (N, V) -> (N,)``.

    * ``"forward"``: ``KL(teacher || student) = sum_v p_t (log p_t - log p_s)``
      (mean-seeking; the usual distillation loss);
    * ``"reverse"``: ``KL(student || teacher) = sum_v p_s (log p_s - log p_t)`` (mode-seeking).

    Both distributions are softmaxes at ``temperature`` and the result is multiplied by
    ``temperature ** 2`` (Hinton et al.) so the gradient scale does not shrink with ``T``.
    Stable for ``-inf`` and very large logits (log-softmax, no ``log(0)``).
    """
    _check_temperature(temperature)
    _check_direction(direction)
    _check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    if student_logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(student_logits.shape)}")
    s = _upcast(student_logits)  # (N, V)
    t = _upcast(teacher_logits)  # (N, V)
    if temperature != 1.0:
        s = s / temperature
        t = t / temperature
    log_ps = F.log_softmax(s, dim=-1)  # (N, V)
    log_pt = F.log_softmax(t, dim=-1)  # (N, V)
    if direction == "forward":
        kl = _kl_from_logprobs(log_pt, log_ps)  # (N,)
    else:
        kl = _kl_from_logprobs(log_ps, log_pt)  # (N,)
    return kl * (temperature**2)


def ka_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    lam: float = 1.0,
    temperature: float = 1.0,
    direction: str = "forward",
    global_count: Tensor | float | None = None,
    stop_gradient_teacher: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KALE's knowledge-aware loss over the ``N`` answer tokens.

    ``loss = mean CE(student_logits, targets) + lam * mean KL(teacher || student)``
    (``direction="reverse"`` swaps the KL), both token means over the same ``global_count``
    (default: the number of targets ``!= -100``).

    * ``student_logits`` ``(N, V)``: the model's prediction of the answer *without* the
      rationale in its input;
    * ``teacher_logits`` ``(N, V)``: the same model *with* the rationale, aligned token for
      token with the student (same answer tokens). Detached when ``stop_gradient_teacher``;
    * ``targets`` ``(N,)``: the answer token ids.

    Returns ``(loss, {"ce": ..., "kl": ...})``; the parts are detached 0-d tensors
    (``kl`` without the ``lam`` factor). With ``lam == 0`` the loss is exactly
    :func:`sft_loss` and the KL is computed for logging only.
    """
    _check_logits_targets(student_logits, targets, "student_logits")
    _check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    _check_temperature(temperature)
    _check_direction(direction)
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if stop_gradient_teacher:
        teacher_logits = teacher_logits.detach()
    mask = targets != IGNORE_INDEX  # (N,)
    ce_tok = token_cross_entropy(student_logits, targets)  # (N,)
    ce = masked_mean(ce_tok, mask, global_count)  # ()
    if lam == 0:
        with torch.no_grad():
            kl = masked_mean(token_kl(student_logits, teacher_logits, temperature, direction), mask, global_count)
        loss = ce
    else:
        kl_tok = token_kl(student_logits, teacher_logits, temperature, direction)  # (N,)
        kl = masked_mean(kl_tok, mask, global_count)  # ()
        loss = ce + lam * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach()}


def sft_loss(
    logits: Tensor, targets: Tensor, global_count: Tensor | float | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-mean cross-entropy over the answer tokens: ``(N, V), (N,) -> ()``.

    ``global_count`` as in :func:`masked_mean` (default: number of targets ``!= -100``).
    Returns ``(loss, {"ce": loss.detach()})``.
    """
    _check_logits_targets(logits, targets)
    mask = targets != IGNORE_INDEX  # (N,)
    loss = masked_mean(token_cross_entropy(logits, targets), mask, global_count)
    return loss, {"ce": loss.detach()}


# --------------------------------------------------------------------------- sequence losses


def _token_logprobs(logits: Tensor, index: Tensor) -> Tensor:
    """``log_softmax(logits)[..., index]`` in fp32 without keeping a full log-softmax copy.

    ``(B, T, V), (B, T) -> (B, T)``. fp32/fp64: one ``gather - logsumexp`` (``logsumexp``
    only saves its input and a ``(B, T)`` result). Lower precision: one row at a time so
    the fp32 up-cast temporaries are ``(T, V)``, not ``(B, T, V)`` (as TRL's
    ``selective_log_softmax``).
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # (B, T)
        return picked - torch.logsumexp(logits, dim=-1)  # (B, T)
    rows = []
    for row_logits, row_index in zip(logits, index):  # (T, V), (T,)
        row_logp = F.log_softmax(row_logits.float(), dim=-1)  # (T, V)
        rows.append(row_logp.gather(-1, row_index.unsqueeze(-1)).squeeze(-1))  # (T,)
    return torch.stack(rows)  # (B, T)


def sequence_logprobs(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, average: bool = False
) -> Tensor:
    """Log-likelihood of each sequence's kept labels: ``(B, T, V), (B, T) -> (B,)``.

    Sum over ``t`` of ``log p(labels[:, t+1] | x_{<=t})`` for the next labels that are not
    ``ignore_index`` (next-token alignment, as :func:`select_positions`). With
    ``average=True`` the mean over those tokens instead (IPO-style length normalisation);
    a sequence with no kept label gives 0. Computed in fp32.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must be (B, T) matching logits (B, T, V): got logits {tuple(logits.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    next_labels = labels[:, 1:]  # (B, T-1)
    mask = next_labels != ignore_index  # (B, T-1)
    index = torch.where(mask, next_labels, torch.zeros_like(next_labels))  # (B, T-1)
    logp = _token_logprobs(logits[:, :-1], index)  # (B, T-1)
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    total = logp.sum(dim=-1)  # (B,)
    if not average:
        return total
    count = mask.sum(dim=-1).to(total.dtype)  # (B,)
    return total / count.clamp(min=1)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation per pair: four ``(B,)`` -> ``(losses, chosen_rewards, rejected_rewards)``.

    ``margin = (pc - rc) - (pr - rr)`` (policy minus reference log-ratios).

    * ``"sigmoid"`` (DPO, Rafailov et al.): ``-logsigmoid(beta * margin)``; with
      ``label_smoothing = eps`` the conservative cDPO variant
      ``-(1 - eps) logsigmoid(beta m) - eps logsigmoid(-beta m)``;
    * ``"ipo"`` (Azar et al.): ``(margin - 1 / (2 beta)) ** 2``. IPO expects
      *length-averaged* log-probabilities: compute the inputs with
      ``sequence_logprobs(..., average=True)``.

    Rewards are ``beta * (policy - reference)``, detached. The SFT term of KnowTuning
    (``gamma * SFT``) is added by the trainer, not here.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing != 0.0:
        raise ValueError("label_smoothing applies to loss_type='sigmoid' only")
    named = {
        "policy_rejected_logps": policy_rejected_logps,
        "reference_chosen_logps": reference_chosen_logps,
        "reference_rejected_logps": reference_rejected_logps,
    }
    if policy_chosen_logps.dim() != 1:
        raise ValueError(f"log-probabilities must be (B,), got policy_chosen_logps {tuple(policy_chosen_logps.shape)}")
    for name, t in named.items():
        _check_same_shape(policy_chosen_logps, t, "policy_chosen_logps", name)

    chosen_ratio = _upcast(policy_chosen_logps) - _upcast(reference_chosen_logps)  # (B,)
    rejected_ratio = _upcast(policy_rejected_logps) - _upcast(reference_rejected_logps)  # (B,)
    margin = chosen_ratio - rejected_ratio  # (B,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
        if label_smoothing > 0:
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * margin)
    else:
        losses = (margin - 1.0 / (2.0 * beta)) ** 2
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


# --------------------------------------------------------------------------- contrastive


def info_nce(
    query: Tensor,
    keys: Tensor,
    tau: float = 0.05,
    margin: float = 0.02,
    false_negative_mask: Tensor | None = None,
    symmetric: bool = True,
) -> Tensor:
    """KaLM's explicit knowledge alignment: in-batch InfoNCE with an additive margin.

    ``query`` ``(B, D)`` and ``keys`` ``(B, D)`` (row ``i`` of each is a positive pair) are
    L2-normalised here, then ``S = (q @ k.T - margin * I) / tau`` ``(B, B)``.

    ``false_negative_mask`` ``(B, B)`` bool: ``True`` at ``(i, j)`` when ``j != i`` is also a
    positive for ``i`` (e.g. the same KG triple twice in a batch); that pair is set to
    ``-inf`` and so left out of both the row-``i`` and the column-``j`` denominators. The
    diagonal of the mask is ignored (so ``labels[:, None] == labels[None, :]`` can be passed
    as is).

    Loss: ``(CE(S, arange(B)) + CE(S.T, arange(B))) / 2`` if ``symmetric`` else the row CE;
    mean over the batch; fp32.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if query.dim() != 2:
        raise ValueError(f"query must be (B, D), got shape {tuple(query.shape)}")
    _check_same_shape(query, keys, "query", "keys")
    b = query.shape[0]
    q = F.normalize(_upcast(query), dim=-1)  # (B, D)
    k = F.normalize(_upcast(keys), dim=-1)  # (B, D)
    eye = torch.eye(b, dtype=torch.bool, device=q.device)  # (B, B)
    sim = q @ k.T  # (B, B)
    scores = (sim - margin * eye.to(sim.dtype)) / tau  # (B, B)
    if false_negative_mask is not None:
        if false_negative_mask.shape != (b, b):
            raise ValueError(
                f"false_negative_mask must be (B, B) = {(b, b)} for query {tuple(query.shape)}, "
                f"got {tuple(false_negative_mask.shape)}"
            )
        drop = false_negative_mask.to(device=q.device, dtype=torch.bool) & ~eye  # (B, B)
        scores = scores.masked_fill(drop, float("-inf"))
    target = torch.arange(b, device=q.device)  # (B,)
    loss = F.cross_entropy(scores, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(scores.T, target))
    return loss

