"""KARD reranker training on the main trainer's conventions: the global sample mean (pure tensors, ms)
and the config keys for checkpoints / resume. The Ray Train run itself: tests/integration/test_kard_reranker.py."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kale_ray.methods.kard.losses import (rerank_ce_loss, rerank_ce_per_question, rerank_count, rerank_kl_loss,
                                          rerank_kl_per_question, rerank_loss)

KL_Q1 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)  # targets [0, ln 3] -> p = [1/4, 3/4] vs q = [1/2, 1/2]


def _golden_batch():
    """Three questions: q1 KL = KL_Q1 (CE = ln 2), q2 scores == targets (KL 0), q3 no real candidate."""
    scores = torch.tensor([[0.0, 0.0, 7.0], [1.0, 2.0, 3.0], [5.0, 1.0, 2.0]])
    targets = torch.tensor([[0.0, math.log(3.0), 9.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    return scores, targets, mask


def test_rerank_kl_global_sample_mean_golden():
    scores, targets, mask = _golden_batch()
    per_q = rerank_kl_per_question(scores, targets, mask)
    assert per_q.tolist() == pytest.approx([KL_Q1, 0.0, 0.0], abs=1e-6)
    assert rerank_count(mask) == 2  # the question without a candidate is not counted
    # this batch alone: (KL_Q1 + 0) / 2; as a share of a step of 5 questions over all workers: / 5
    assert rerank_kl_loss(scores, targets, mask).item() == pytest.approx(KL_Q1 / 2, abs=1e-6)
    assert rerank_kl_loss(scores, targets, mask, global_count=5).item() == pytest.approx(KL_Q1 / 5, abs=1e-6)
    assert rerank_loss("kl", scores, targets, mask, 1.0, 1.0, global_count=torch.tensor(5.0)).item() == \
        pytest.approx(KL_Q1 / 5, abs=1e-6)
    # a worker with no counted question in a step that has some: 0, attached to the graph, no NaN
    s = scores[2:].clone().requires_grad_()
    zero = rerank_kl_loss(s, targets[2:], mask[2:], global_count=3)
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_rerank_ce_global_sample_mean_golden():
    scores, targets, mask = _golden_batch()
    # q1: best target = candidate 1 (9.0 is padding), q = [1/2, 1/2] -> ln 2; q2: best = 2, softmax([1,2,3])[2]
    ce_q2 = -math.log(math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3)))
    assert rerank_ce_per_question(scores, targets, mask)[:2].tolist() == pytest.approx([math.log(2.0), ce_q2], abs=1e-6)
    assert rerank_ce_loss(scores, targets, mask).item() == pytest.approx((math.log(2.0) + ce_q2) / 2, abs=1e-6)
    assert rerank_ce_loss(scores, targets, mask, global_count=4).item() == \
        pytest.approx((math.log(2.0) + ce_q2) / 4, abs=1e-6)


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_rerank_loss_shards_sum_to_the_full_batch_mean_and_gradient(kind):
    """Two workers' shares (their sums / the step's global count) == the whole batch's mean, gradients too;
    per-worker means averaged (what plain DDP does) are not, with uneven counted questions."""
    torch.manual_seed(0)
    scores, targets = torch.randn(7, 5), torch.randn(7, 5) * 2
    mask = torch.ones(7, 5, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2] = 0  # shard A counts 2 of its 3 questions, shard B all 4
    full_s = scores.clone().requires_grad_()
    full = rerank_loss(kind, full_s, targets, mask, 0.7, 1.3)
    full.backward()

    parts, grads = [], []
    global_count = rerank_count(mask[:3]) + rerank_count(mask[3:])  # what the all-reduce gives
    assert global_count == 6
    for sl in (slice(0, 3), slice(3, 7)):
        s = scores[sl].clone().requires_grad_()
        share = rerank_loss(kind, s, targets[sl], mask[sl], 0.7, 1.3, global_count=global_count)
        share.backward()
        parts.append(share.item())
        grads.append(s.grad)
    assert sum(parts) == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat(grads), full_s.grad, rtol=1e-5, atol=1e-7)
    mean_of_means = (rerank_loss(kind, scores[:3], targets[:3], mask[:3], 0.7, 1.3).item()
                     + rerank_loss(kind, scores[3:], targets[3:], mask[3:], 0.7, 1.3).item()) / 2
    assert mean_of_means != pytest.approx(full.item(), rel=1e-4)


def test_reranker_checkpoint_keys_follow_the_train_config_names():
    from kale_ray.config import TrainConfig, range_of
    from kale_ray.methods.kard.config import RerankerConfig
    from kale_ray.methods.kard.rerank_train import NOT_OUTPUT_SETTINGS, RESUME_MUST_MATCH

    rr = {f.name: f for f in dataclasses.fields(RerankerConfig)}
    tc = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key in ("checkpoint_every", "keep_checkpoints", "max_failures"):
        assert range_of(rr[key]) == range_of(tc[key]) and rr[key].default == tc[key].default, key
    assert set(NOT_OUTPUT_SETTINGS) <= set(rr) and set(RESUME_MUST_MATCH) <= set(rr)
