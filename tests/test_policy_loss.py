"""policy_loss: gradients, aggregations, micro-batch splitting, and metrics."""

import math

import pytest
import torch

from dppo_megatron.algo import AGGREGATIONS, group_advantages, policy_loss


def batch(seed=0, b=4, length=6):
    gen = torch.Generator().manual_seed(seed)
    rollout = torch.log(torch.rand(b, length, generator=gen) * 0.9 + 0.05)
    logprob = (rollout + 0.3 * torch.randn(b, length, generator=gen)).clamp(max=-1e-3)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.0])[:b]
    return logprob, rollout, advantages, mask


def test_gradient_is_minus_advantage_times_capped_ratio_on_kept_tokens():
    logprob, rollout, adv, mask = batch()
    logprob.requires_grad_()
    loss, _ = policy_loss(logprob, rollout, adv, mask, mode="pg_is", ratio_cap=1.2)
    (grad,) = torch.autograd.grad(loss, logprob)
    ratio = (logprob.detach() - rollout).exp().clamp(max=1.2)
    expected = -adv[:, None] * ratio * mask / mask.sum()
    torch.testing.assert_close(grad, expected)


def test_dropped_tokens_get_no_gradient():
    logprob, rollout, adv, mask = batch()
    logprob = logprob.clone().requires_grad_()
    loss, metrics = policy_loss(logprob, rollout, adv, mask, mode="dppo_binary_tv", low=0.05, high=0.05)
    (grad,) = torch.autograd.grad(loss, logprob)
    shift = logprob.detach().exp() - rollout.exp()
    a = adv[:, None].expand_as(shift)
    dropped = mask & (((a > 0) & (shift > 0.05)) | ((a < 0) & (shift < -0.05)))
    assert dropped.any() and (~dropped & mask).any()
    assert torch.all(grad[dropped] == 0) and torch.all(grad[~dropped & mask] != 0)
    assert metrics["tokens_masked"] == dropped.sum()


def test_aggregations_match_hand_computation():
    logprob, rollout, adv, mask = batch()
    per_token = -adv[:, None] * (logprob - rollout).exp() * logprob * mask
    expected = {
        "token-mean": per_token.sum() / mask.sum(),
        "seq-mean-token-mean": (per_token.sum(1) / mask.sum(1)).mean(),
        "seq-mean-token-sum-norm": (per_token.sum(1) / 8).mean(),
    }
    for aggregation in AGGREGATIONS:
        loss, _ = policy_loss(logprob, rollout, adv, mask, mode="pg_is", ratio_cap=None,
                              aggregation=aggregation, max_response_len=8)
        torch.testing.assert_close(loss, expected[aggregation], msg=aggregation)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_with_the_global_denominator_sum_to_the_full_batch_gradient(aggregation):
    logprob, rollout, adv, mask = batch()
    kwargs = dict(mode="dppo_binary_tv", aggregation=aggregation, max_response_len=8)
    full = logprob.clone().requires_grad_()
    loss, _ = policy_loss(full, rollout, adv, mask, **kwargs)
    loss.backward()
    split = logprob.clone().requires_grad_()
    denominator = mask.sum() if aggregation == "token-mean" else mask.shape[0]
    for rows in (slice(0, 1), slice(1, 4)):
        part, _ = policy_loss(split[rows], rollout[rows], adv[rows], mask[rows], denominator=denominator, **kwargs)
        part.backward()
    torch.testing.assert_close(split.grad, full.grad)


def test_padding_with_infinite_logprobs_does_not_poison_the_loss():
    logprob, rollout, adv, mask = batch()
    logprob = logprob.masked_fill(~mask, -math.inf).requires_grad_()
    rollout = rollout.masked_fill(~mask, 0.0)
    loss, metrics = policy_loss(logprob, rollout, adv, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprob.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_ratio_cap_bounds_the_importance_weight():
    lp, mu = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.01]]))
    lp.requires_grad_()
    loss, metrics = policy_loss(lp, mu, torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool), mode="pg_is", ratio_cap=10.0)
    (grad,) = torch.autograd.grad(loss, lp)
    assert grad.item() == pytest.approx(-10.0)
    assert metrics["ratio_max"].item() == pytest.approx(50.0)


def test_cispo_truncates_the_weight_at_one_plus_high_and_keeps_every_token():
    lp = torch.log(torch.tensor([[0.9, 0.1]])).requires_grad_()
    mu = torch.log(torch.tensor([[0.3, 0.3]]))
    loss, metrics = policy_loss(lp, mu, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), mode="cispo", high=0.28)
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, torch.tensor([[-1.28 / 2, -(1 / 3) / 2]]))
    assert metrics["masked_frac"] == 0


def test_metrics_on_a_constructed_batch():
    pi = torch.tensor([[0.5, 0.3, 0.05, 0.9]])
    mu = torch.tensor([[0.2, 0.3, 0.05, 0.95]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    _, m = policy_loss(pi.log(), mu.log(), adv, mask, mode="dppo_binary_tv", low=0.03, high=0.15)
    # Token 0 (up by 0.3, A>0) and token 3 (down by 0.05, A<0) are dropped.
    assert m["masked_frac"].item() == pytest.approx(0.5)
    assert m["masked_frac_pos"].item() == pytest.approx(0.5)
    assert m["masked_frac_neg"].item() == pytest.approx(0.5)
    assert m["mismatch_tv"].item() == pytest.approx((0.3 + 0 + 0 + 0.05) / 4)
    ratio = pi / mu
    assert m["ratio_mean"].item() == pytest.approx(ratio.mean().item())
    assert m["ratio_max"].item() == pytest.approx(2.5)
    assert m["kl_k3"].item() == pytest.approx((ratio - 1 - ratio.log()).mean().item())
    assert m["masked_low_prob_frac"].item() == pytest.approx(0.0)
    assert m["tokens"] == 4 and m["tokens_pos"] == 2 and m["tokens_neg"] == 2 and m["tokens_masked"] == 2


def test_masked_low_probability_fraction_counts_rare_rollout_tokens():
    pi = torch.tensor([[0.5, 0.6]])
    mu = torch.tensor([[0.05, 0.3]])
    _, m = policy_loss(pi.log(), mu.log(), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool),
                       mode="dppo_binary_tv", high=0.15)
    assert m["tokens_masked"] == 2 and m["masked_low_prob_frac"].item() == pytest.approx(0.5)


def test_bad_arguments_are_named():
    logprob, rollout, adv, mask = batch()
    with pytest.raises(ValueError, match="max_response_len"):
        policy_loss(logprob, rollout, adv, mask, aggregation="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(logprob, rollout, adv, mask, aggregation="mean")
    with pytest.raises(ValueError, match="same shape"):
        policy_loss(logprob, rollout[:, :3], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logprob, rollout, torch.ones(3), mask)


def test_group_advantages_subtract_the_group_mean():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 3)
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))


def test_group_advantages_normalize_by_the_group_std_when_asked():
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0])
    adv = group_advantages(rewards, 2, normalize_std=True)
    std = torch.tensor([1.0, 0.0]).std()
    torch.testing.assert_close(adv, torch.tensor([0.5 / (std + 1e-6), -0.5 / (std + 1e-6), 0.0, 0.0]))


def test_group_advantages_refuse_ragged_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.zeros(3), 1, normalize_std=True)
