"""Unit tests for kale_ray.core.losses: golden values (worked out by hand in the
docstrings), properties, sharding invariance, stability and argument checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kale_ray.core.losses import (
    dpo_loss,
    info_nce,
    ka_loss,
    masked_mean,
    masked_sum,
    select_positions,
    sequence_logprobs,
    sft_loss,
    token_cross_entropy,
    token_kl,
)

LN4 = math.log(4.0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(n: int, v: int, seed: int, scale: float = 3.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(n, v, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)


# =========================================================================== golden values


def test_token_kl_golden_two_class():
    """Teacher logits [0, 0] -> p_t = [1/2, 1/2]; student logits [ln 4, 0] -> p_s = [4/5, 1/5].

    forward KL(t||s) = 1/2 ln((1/2)/(4/5)) + 1/2 ln((1/2)/(1/5))
                     = 1/2 ln(5/8) + 1/2 ln(5/2) = 1/2 ln(25/16) = ln(5/4) = 0.2231435513
    reverse KL(s||t) = 4/5 ln((4/5)/(1/2)) + 1/5 ln((1/5)/(1/2))
                     = 0.8 ln 1.6 + 0.2 ln 0.4 = 0.3760033 - 0.1832581 = 0.1927447570
    """
    s = torch.tensor([[LN4, 0.0]])
    t = torch.tensor([[0.0, 0.0]])
    torch.testing.assert_close(token_kl(s, t), torch.tensor([0.2231435513]))
    torch.testing.assert_close(token_kl(s, t, direction="reverse"), torch.tensor([0.1927447570]))


def test_token_kl_golden_temperature_two():
    """At T = 2: student logits [2 ln 4, 0] / 2 = [ln 4, 0] and teacher [0, 0], i.e. the case
    above (ln(5/4)), times T**2 = 4: 4 ln(5/4) = 0.8925742052."""
    s = torch.tensor([[2 * LN4, 0.0]])
    t = torch.tensor([[0.0, 0.0]])
    torch.testing.assert_close(token_kl(s, t, temperature=2.0), torch.tensor([0.8925742052]))


def test_token_cross_entropy_golden():
    """logits [1, 2, 3], target 2: -log(e^3 / (e + e^2 + e^3)) = log(1 + e^-1 + e^-2)
    = log(1 + 0.3678794 + 0.1353353) = log(1.5032147) = 0.4076059644.
    Target -100 gives 0 (ignored)."""
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    out = token_cross_entropy(logits, torch.tensor([2, -100]))
    torch.testing.assert_close(out, torch.tensor([0.4076059644, 0.0]))


def test_kale_loss_golden():
    """Student [ln 4, 0] (p_s = [0.8, 0.2]), teacher [0, 0], target 0:
    CE = -ln 0.8 = ln(5/4) = 0.2231435513; forward KL = ln(5/4) (see the KL golden test).
    lam = 0.5: loss = ln(5/4) + 0.5 ln(5/4) = 1.5 ln(5/4) = 0.3347153270."""
    s = torch.tensor([[LN4, 0.0]])
    t = torch.tensor([[0.0, 0.0]])
    loss, parts = ka_loss(s, t, torch.tensor([0]), lam=0.5)
    torch.testing.assert_close(loss, torch.tensor(0.3347153270))
    torch.testing.assert_close(parts["ce"], torch.tensor(0.2231435513))
    torch.testing.assert_close(parts["kl"], torch.tensor(0.2231435513))


def test_sft_loss_golden():
    """Two tokens: logits [1, 2, 3] target 2 (CE 0.4076059644, see above) and logits [0, 0, 0]
    target 0 (CE ln 3 = 1.0986122887). Mean = (0.4076059644 + 1.0986122887) / 2 = 0.7531091266.
    With global_count = 4 the sum is divided by 4 instead: 1.5062182531 / 4 = 0.3765545633."""
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([2, 0])
    loss, parts = sft_loss(logits, targets)
    torch.testing.assert_close(loss, torch.tensor(0.7531091266))
    torch.testing.assert_close(parts["ce"], loss.detach())
    torch.testing.assert_close(sft_loss(logits, targets, global_count=4)[0], torch.tensor(0.3765545633))


def test_dpo_sigmoid_golden():
    """Policy-minus-reference chosen margins [0, 10, 20], rejected 0, beta = 0.1:
    beta * margin = [0, 1, 2]; -logsigmoid(x) = log(1 + e^-x):
    log 2 = 0.6931471806, log(1 + e^-1) = 0.3132616875, log(1 + e^-2) = 0.1269280110.
    Rewards: chosen beta * [0, 10, 20] = [0, 1, 2], rejected 0."""
    pc = torch.tensor([-5.0, 5.0, 10.0], requires_grad=True)
    rc = torch.tensor([-5.0, -5.0, -10.0])
    pr = torch.tensor([-7.0, -3.0, -1.0])
    rr = pr.clone()
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.6931471806, 0.3132616875, 0.1269280110]))
    torch.testing.assert_close(cr, torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(rj, torch.zeros(3))
    assert not cr.requires_grad and not rj.requires_grad and losses.requires_grad


def test_dpo_ipo_golden():
    """IPO, beta = 0.5 -> target margin 1 / (2 beta) = 1. Margins [0, 1, 3] ->
    (m - 1)^2 = [1, 0, 4]."""
    pc = torch.tensor([0.0, 1.0, 3.0])
    z = torch.zeros(3)
    losses, _, _ = dpo_loss(pc, z, z, z, beta=0.5, loss_type="ipo")
    torch.testing.assert_close(losses, torch.tensor([1.0, 0.0, 4.0]))


def test_dpo_label_smoothing_golden():
    """cDPO, eps = 0.1, beta * margin = 1:
    0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = 0.9 * 0.3132616875 + 0.1 * 1.3132616875
    = 0.2819355188 + 0.1313261688 = 0.4132616875."""
    z = torch.zeros(1)
    losses, _, _ = dpo_loss(torch.tensor([10.0]), z, z, z, beta=0.1, label_smoothing=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.4132616875]))


def test_info_nce_golden_3x3():
    """query = e1, e2, e3; keys = e1, (0.6, 0.8, 0), e3 (unit norm already); tau = 1, margin = 0.
    S = q @ k.T = [[1, 0.6, 0], [0, 0.8, 0], [0, 0, 1]].
    Rows (target i):    r0 = log(e + e^0.6 + 1) - 1 = 0.7120668138
                        r1 = log(2 + e^0.8) - 0.8   = 0.6411472830
                        r2 = log(2 + e) - 1         = 0.5514447139   mean 0.6348862703
    Columns (target i): c0 = [1, 0, 0] -> log(e + 2) - 1 = 0.5514447139
                        c1 = [0.6, 0.8, 0] -> log(e^0.6 + e^0.8 + 1) - 0.8 = 0.8189247159
                        c2 = [0, 0, 1] -> 0.5514447139                   mean 0.6406047146
    symmetric = (0.6348862703 + 0.6406047146) / 2 = 0.6377454924.
    Scaling the keys changes nothing (normalised inside)."""
    q = torch.eye(3)
    k = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(info_nce(q, k, tau=1.0, margin=0.0, symmetric=False), torch.tensor(0.6348862703))
    torch.testing.assert_close(info_nce(q, k, tau=1.0, margin=0.0), torch.tensor(0.6377454924))
    torch.testing.assert_close(info_nce(3 * q, 5 * k, tau=1.0, margin=0.0), torch.tensor(0.6377454924))


def test_info_nce_golden_margin_2x2():
    """q = k = I (2x2), margin 0.5, tau 0.5: S = (I - 0.5 I) / 0.5 = I.
    Each row/column: log(e + 1) - 1 = log(1 + e^-1) = 0.3132616875 (both directions equal)."""
    eye = torch.eye(2)
    torch.testing.assert_close(info_nce(eye, eye, tau=0.5, margin=0.5), torch.tensor(0.3132616875))


# =========================================================================== KL properties


def test_token_kl_self_is_zero():
    x = _logits(5, 11, seed=0)
    for direction in ("forward", "reverse"):
        torch.testing.assert_close(token_kl(x, x, direction=direction), torch.zeros(5), atol=1e-6, rtol=0)
        torch.testing.assert_close(token_kl(x, x, 3.0, direction), torch.zeros(5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_token_kl_nonnegative(seed):
    s, t = _logits(16, 9, seed), _logits(16, 9, seed + 100)
    for direction in ("forward", "reverse"):
        for temp in (0.5, 1.0, 4.0):
            assert (token_kl(s, t, temp, direction) >= -1e-6).all()


def test_token_kl_forward_and_reverse_differ():
    s, t = torch.tensor([[LN4, 0.0]]), torch.zeros(1, 2)
    fwd, rev = token_kl(s, t), token_kl(s, t, direction="reverse")
    assert abs(fwd.item() - rev.item()) > 0.02
    # reverse(s, t) is forward with the roles swapped
    torch.testing.assert_close(rev, token_kl(t, s))


def test_token_kl_temperature_scales_by_t_squared():
    s, t = _logits(4, 7, 1), _logits(4, 7, 2)
    for temp in (0.5, 2.0, 5.0):
        torch.testing.assert_close(token_kl(s, t, temp), temp**2 * token_kl(s / temp, t / temp))


def test_token_kl_large_temperature_limit():
    """Unscaled KL -> 0 as T grows; the T**2-scaled one tends to Var_uniform(z_s - z_t) / 2."""
    s, t = _logits(3, 50, 3, dtype=torch.float64), _logits(3, 50, 4, dtype=torch.float64)
    raw = [(token_kl(s, t, temp) / temp**2).max().item() for temp in (1.0, 10.0, 100.0, 1e3, 1e4)]
    assert raw == sorted(raw, reverse=True) and raw[-1] < 1e-6
    limit = 0.5 * (s - t).var(dim=-1, unbiased=False)
    torch.testing.assert_close(token_kl(s, t, 1e4), limit, rtol=1e-3, atol=0)


def test_token_kl_stable_with_inf_and_large_logits():
    ninf = float("-inf")
    s = torch.tensor([[0.0, 1.0, ninf], [1e4, -1e4, 0.0], [ninf, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.5, ninf, ninf], [-1e4, 1e4, 0.0], [ninf, 0.0, 0.0]], requires_grad=True)
    for direction in ("forward", "reverse"):
        kl = token_kl(s, t, direction=direction)
        # row 0 forward: p_t = [1, 0, 0] -> -log p_s(0); reverse: s has mass where t has none -> inf
        # row 1: finite and huge (2e4), row 2: identical distributions -> 0
        if direction == "forward":
            assert torch.isfinite(kl).all(), kl
            torch.testing.assert_close(kl[0], -F.log_softmax(s[0].detach(), -1)[0])
            assert kl[1].item() == pytest.approx(2e4, rel=1e-4)
            kl.sum().backward()
            assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
        else:
            assert math.isinf(kl[0].item()) and not torch.isnan(kl).any()
        assert kl[2].item() == pytest.approx(0.0, abs=1e-7)


def test_token_kl_low_precision_inputs_are_upcast():
    s, t = _logits(6, 13, 5), _logits(6, 13, 6)
    out = token_kl(s.bfloat16(), t.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, token_kl(s.bfloat16().float(), t.bfloat16().float()))


def test_token_kl_gradcheck():
    s = _logits(3, 5, 7, dtype=torch.float64).requires_grad_()
    t = _logits(3, 5, 8, dtype=torch.float64).requires_grad_()
    for direction in ("forward", "reverse"):
        assert torch.autograd.gradcheck(lambda a, b: token_kl(a, b, 1.7, direction), (s, t), fast_mode=True)


# =========================================================================== KALE (ka_loss)


def test_kale_lam_zero_equals_sft():
    s, t = _logits(6, 10, 9, dtype=torch.float64), _logits(6, 10, 10, dtype=torch.float64)
    targets = torch.tensor([1, 2, -100, 3, 9, 0])
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    loss, parts = ka_loss(s1, t, targets, lam=0.0)
    ref, ref_parts = sft_loss(s2, targets)
    assert loss.item() == ref.item()
    loss.backward()
    ref.backward()
    assert torch.equal(s1.grad, s2.grad)
    assert parts["ce"].item() == ref_parts["ce"].item() and parts["kl"].item() > 0


def test_kale_matches_ce_plus_lam_kl():
    s, t = _logits(7, 12, 11), _logits(7, 12, 12)
    targets = torch.randint(0, 12, (7,), generator=_gen(0))
    loss, parts = ka_loss(s, t, targets, lam=0.3, temperature=2.0, direction="reverse")
    ce = token_cross_entropy(s, targets).mean()
    kl = token_kl(s, t, 2.0, "reverse").mean()
    torch.testing.assert_close(loss, ce + 0.3 * kl)
    torch.testing.assert_close(parts["ce"], ce)
    torch.testing.assert_close(parts["kl"], kl)
    assert not parts["ce"].requires_grad and not parts["kl"].requires_grad


def test_kale_stop_gradient_teacher():
    s = _logits(4, 6, 13).requires_grad_()
    targets = torch.tensor([0, 1, 2, 3])
    t = _logits(4, 6, 14).requires_grad_()
    loss, _ = ka_loss(s, t, targets)
    loss.backward()
    assert t.grad is None and s.grad is not None

    t2 = _logits(4, 6, 14).requires_grad_()
    loss, _ = ka_loss(s, t2, targets, stop_gradient_teacher=False)
    loss.backward()
    assert t2.grad is not None and t2.grad.abs().sum() > 0


def test_kale_gradcheck():
    s = _logits(3, 4, 15, dtype=torch.float64).requires_grad_()
    t = _logits(3, 4, 16, dtype=torch.float64).requires_grad_()
    targets = torch.tensor([0, 3, 1])
    assert torch.autograd.gradcheck(
        lambda a, b: ka_loss(a, b, targets, lam=0.7, temperature=1.5, stop_gradient_teacher=False)[0], (s, t)
    )


# =========================================================================== sharding invariance


def _halves_vs_whole(fn, tensors, targets, split: int):
    """Loss and grads of the whole batch vs the sum over two shards with global_count = total."""
    total = (targets != -100).sum()
    whole = [x.detach().clone().requires_grad_() for x in tensors]
    loss_whole, parts_whole = fn(*whole, targets)
    loss_whole.backward()

    shards = [x.detach().clone().requires_grad_() for x in tensors]
    loss_sum, parts_sum = 0.0, {k: 0.0 for k in parts_whole}
    for sl in (slice(0, split), slice(split, None)):
        loss, parts = fn(*[x[sl] for x in shards], targets[sl], global_count=total)
        loss.backward()
        loss_sum = loss_sum + loss.detach()
        parts_sum = {k: parts_sum[k] + parts[k] for k in parts}
    return loss_whole.detach(), loss_sum, parts_whole, parts_sum, whole, shards


@pytest.mark.parametrize("split", [3, 7])
def test_kale_sharding_invariance(split):
    s, t = _logits(10, 17, 20), _logits(10, 17, 21)
    targets = torch.randint(0, 17, (10,), generator=_gen(1))
    targets[1] = -100  # an ignored token in the first shard: not counted anywhere

    def fn(s, t, y, global_count=None):
        return ka_loss(s, t, y, lam=0.5, temperature=2.0, global_count=global_count)

    lw, ls, pw, ps, whole, shards = _halves_vs_whole(fn, (s, t), targets, split)
    torch.testing.assert_close(ls, lw, atol=1e-6, rtol=0)
    for k in pw:
        torch.testing.assert_close(ps[k], pw[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(shards[0].grad, whole[0].grad, atol=1e-7, rtol=1e-6)
    # the test has teeth: averaging per-shard means is NOT the whole-batch loss
    m1 = fn(s[:split], t[:split], targets[:split])[0]
    m2 = fn(s[split:], t[split:], targets[split:])[0]
    assert abs(((m1 + m2) / 2 - lw).item()) > 1e-3


@pytest.mark.parametrize("split", [2, 5])
def test_sft_sharding_invariance(split):
    s = _logits(9, 13, 22)
    targets = torch.randint(0, 13, (9,), generator=_gen(2))
    targets[-1] = -100
    lw, ls, pw, ps, whole, shards = _halves_vs_whole(sft_loss, (s,), targets, split)
    torch.testing.assert_close(ls, lw, atol=1e-6, rtol=0)
    torch.testing.assert_close(ps["ce"], pw["ce"], atol=1e-6, rtol=0)
    torch.testing.assert_close(shards[0].grad, whole[0].grad, atol=1e-7, rtol=1e-6)


# =========================================================================== masked reductions


def test_masked_mean_all_zero_mask_is_zero_and_differentiable():
    for mask in (torch.zeros(4, dtype=torch.bool), torch.zeros(4)):
        v = torch.randn(4, requires_grad=True)
        out = masked_mean(v, mask)
        assert out.item() == 0.0 and out.requires_grad
        out.backward()
        assert torch.equal(v.grad, torch.zeros(4))
    v = torch.randn(4, requires_grad=True)
    out = masked_mean(v, torch.ones(4, dtype=torch.bool), global_count=torch.tensor(0))
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(v.grad).all()


def test_masked_mean_and_sum_basic():
    v = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    mask = torch.tensor([True, False, True, False])
    assert masked_sum(v, mask).item() == 4.0  # NaN under a bool mask is dropped, not multiplied
    assert masked_mean(v, mask).item() == 2.0
    assert masked_mean(v, mask, global_count=8).item() == 0.5
    assert masked_mean(v, mask, global_count=torch.tensor([8])).item() == 0.5
    w = torch.tensor([0.5, 0.0, 1.0, 0.0])
    assert masked_sum(v[:3], w[:3]).item() == 3.5


# =========================================================================== positions / sequences


def test_select_positions_hand_example():
    """hidden[b, t] = 10 b + t. Labels (next-token alignment: position t predicts labels[t+1]):
    row 0: [-100, -100, 5, 6] -> t = 1 (-> 5), t = 2 (-> 6)
    row 1: [-100, 7, -100, 8] -> t = 0 (-> 7), t = 2 (-> 8)
    so h_sel = [1, 2, 10, 12], targets = [5, 6, 7, 8]; labels[:, 0] is never a target."""
    hidden = (10 * torch.arange(2).view(2, 1) + torch.arange(4).view(1, 4)).float().unsqueeze(-1)  # (2, 4, 1)
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, 8]])
    h_sel, targets = select_positions(hidden, labels)
    assert h_sel.shape == (4, 1)
    assert h_sel.squeeze(-1).tolist() == [1.0, 2.0, 10.0, 12.0]
    assert targets.tolist() == [5, 6, 7, 8]
    labels[0, 0] = 3  # the first label has no predicting position
    assert select_positions(hidden, labels)[1].tolist() == [5, 6, 7, 8]
    h_sel, targets = select_positions(hidden, torch.full((2, 4), 1), ignore_index=1)
    assert h_sel.shape == (0, 1) and targets.shape == (0,)


def test_select_positions_then_head_matches_sequence_logprobs():
    """lm_head on the selected positions == full logits; summed -CE per row == sequence_logprobs."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 4)
    head = torch.nn.Linear(4, 9, bias=False)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    h_sel, targets = select_positions(hidden, labels)
    ce = token_cross_entropy(head(h_sel), targets)
    seq = sequence_logprobs(head(hidden), labels)
    torch.testing.assert_close(seq, -torch.stack([ce[:3].sum(), ce[3:].sum()]))


def test_sequence_logprobs_manual_average_and_bf16():
    logits = torch.randn(3, 6, 8, generator=_gen(30))
    labels = torch.randint(0, 8, (3, 6), generator=_gen(31))
    labels[:, :2] = -100
    labels[2] = -100  # nothing kept: 0 for sum and mean
    logp = F.log_softmax(logits, dim=-1)
    manual = torch.zeros(3)
    for b in range(3):
        for t in range(5):
            if labels[b, t + 1] != -100:
                manual[b] += logp[b, t, labels[b, t + 1]]
    torch.testing.assert_close(sequence_logprobs(logits, labels), manual)
    counts = torch.tensor([4.0, 4.0, 1.0])
    torch.testing.assert_close(sequence_logprobs(logits, labels, average=True), manual / counts)
    low = sequence_logprobs(logits.bfloat16(), labels)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, sequence_logprobs(logits.bfloat16().float(), labels))


# =========================================================================== DPO properties


def test_dpo_gradient_direction_and_reference_invariance():
    pc = torch.tensor([-3.0, -4.0], requires_grad=True)
    pr = torch.tensor([-3.0, -2.0], requires_grad=True)
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    losses, _, _ = dpo_loss(pc, pr, rc, rr)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected
    # adding the same constant to policy and reference log-probs changes nothing
    shifted, _, _ = dpo_loss(pc + 7, pr - 2, rc + 7, rr - 2)
    torch.testing.assert_close(shifted, losses)


# =========================================================================== InfoNCE properties


def _random_fn_mask(b: int, seed: int) -> torch.Tensor:
    m = torch.rand(b, b, generator=_gen(seed)) < 0.25
    return (m | m.T) & ~torch.eye(b, dtype=torch.bool)


@pytest.mark.parametrize("symmetric", [True, False])
def test_info_nce_permutation_invariant(symmetric):
    b, d = 6, 5
    q, k = torch.randn(b, d, generator=_gen(40)), torch.randn(b, d, generator=_gen(41))
    mask = _random_fn_mask(b, 42)
    assert mask.any()
    perm = torch.randperm(b, generator=_gen(43))
    ref = info_nce(q, k, tau=0.1, margin=0.05, false_negative_mask=mask, symmetric=symmetric)
    out = info_nce(q[perm], k[perm], tau=0.1, margin=0.05, false_negative_mask=mask[perm][:, perm], symmetric=symmetric)
    torch.testing.assert_close(out, ref)


def test_info_nce_false_negative_mask_removes_exactly_that_pair():
    """Manual: row i's denominator sums exp(S[i, j]) over unmasked j; column j's over unmasked i.
    Masking (0, 2) changes only row 0 and column 2 of the loss; the diagonal of a mask is ignored."""
    b, tau, margin = 4, 0.2, 0.1
    q, k = torch.randn(b, 3, generator=_gen(50)), torch.randn(b, 3, generator=_gen(51))
    mask = torch.zeros(b, b, dtype=torch.bool)
    mask[0, 2] = True
    s = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T - margin * torch.eye(b)) / tau
    rows = [-s[i, i] + torch.logsumexp(s[i, [j for j in range(b) if not mask[i, j]]], 0) for i in range(b)]
    cols = [-s[j, j] + torch.logsumexp(s[[i for i in range(b) if not mask[i, j]], j], 0) for j in range(b)]
    row_mean, col_mean = torch.stack(rows).mean(), torch.stack(cols).mean()
    got_rows = info_nce(q, k, tau, margin, false_negative_mask=mask, symmetric=False)
    got = info_nce(q, k, tau, margin, false_negative_mask=mask)
    torch.testing.assert_close(got_rows, row_mean)
    torch.testing.assert_close(got, (row_mean + col_mean) / 2)
    # only row 0's term differs from the unmasked row loss, and it got smaller
    unmasked_rows = [-s[i, i] + torch.logsumexp(s[i], 0) for i in range(b)]
    diffs = torch.stack(unmasked_rows) - torch.stack(rows)
    assert diffs[0] > 0 and torch.allclose(diffs[1:], torch.zeros(b - 1))
    # a True diagonal is ignored
    with_diag = mask | torch.eye(b, dtype=torch.bool)
    torch.testing.assert_close(info_nce(q, k, tau, margin, false_negative_mask=with_diag), got)


def test_info_nce_margin_raises_loss_and_gradcheck():
    q, k = torch.randn(5, 4, generator=_gen(60)), torch.randn(5, 4, generator=_gen(61))
    assert info_nce(q, k, margin=0.1) > info_nce(q, k, margin=0.0)
    qd = q.double().requires_grad_()
    kd = k.double().requires_grad_()
    mask = _random_fn_mask(5, 62)
    assert torch.autograd.gradcheck(lambda a, c: info_nce(a, c, 0.3, 0.05, mask), (qd, kd), fast_mode=True)


# =========================================================================== argument checks


def test_argument_validation_messages():
    s, t = torch.zeros(3, 5), torch.zeros(3, 5)
    y = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="direction"):
        token_kl(s, t, direction="sideways")
    with pytest.raises(ValueError, match="temperature"):
        token_kl(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        ka_loss(s, t, y, temperature=-1.0)
    with pytest.raises(ValueError, match=r"\(3, 5\) and \(3, 4\)"):
        ka_loss(s, torch.zeros(3, 4), y)
    with pytest.raises(ValueError, match=r"\(3, 5\).*\(2,\)"):
        sft_loss(s, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(y.float(), y.float(), y.float(), y.float(), loss_type="hinge-ish")
    with pytest.raises(ValueError, match=r"\(3,\) and \(2,\)"):
        dpo_loss(y.float(), torch.zeros(2), y.float(), y.float())
    with pytest.raises(ValueError, match=r"\(2, 5, 8\) and labels \(2, 4\)"):
        select_positions(torch.zeros(2, 5, 8), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(3, 5\) and \(3, 4\)"):
        info_nce(s, torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(2, 2\)"):
        info_nce(s, t, false_negative_mask=torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="tau"):
        info_nce(s, t, tau=0.0)
    with pytest.raises(ValueError, match="values and mask"):
        masked_mean(torch.zeros(3), torch.ones(4))


# =========================================================================== meta / hygiene
