"""policy_loss: gradients, aggregations, micro-batch splitting, and metrics."""

import math

import pytest
import torch

from dppo_megatron.algo import AGGREGATIONS, LOSS_MODES, group_advantages, needs_old_logprob, policy_loss
from dppo_megatron.algo.policy_loss import masked_token_counts
from tests.loss_reference import reference_loss


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


def test_pg_is_weights_the_papers_rare_token_by_its_whole_ratio_and_pg_tis_truncates_it():
    """The paper's rare-token case: mu = 1e-5 risen to pi = 1e-3 has r = 100. PG-IS (the
    authors' run: truncation off) weights it 100; PG-TIS at cap 10 weights it 10."""
    lp, mu = torch.log(torch.tensor([[1e-3]], dtype=torch.float64)), torch.log(torch.tensor([[1e-5]], dtype=torch.float64))
    one = (torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool))
    for mode, cap, weight in [("pg_is", None, 100.0), ("pg_tis", 10.0, 10.0)]:
        lp_ = lp.clone().requires_grad_()
        loss, metrics = policy_loss(lp_, mu, *one, mode=mode, ratio_cap=cap)
        (grad,) = torch.autograd.grad(loss, lp_)
        assert grad.item() == pytest.approx(-weight), mode
        assert metrics["ratio_max"].item() == pytest.approx(100.0)
    with pytest.raises(ValueError, match="pg_tis.*ratio_cap"):
        policy_loss(lp, mu, *one, mode="pg_tis")


def test_cispo_truncates_the_weight_at_one_plus_high_and_keeps_every_token():
    """MiniMax-M1's CISPO: weight sg(min(r, 1 + eps_high)), no token masked."""
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


def test_masked_fraction_and_mismatch_by_rollout_probability_bucket_and_advantage_sign():
    """The paper's point, as a metric: ratio clipping masks the rare tokens (mu < 0.01, here
    risen 50x) and lets a likely token fall from 0.99 to 0.8; binary TV does the opposite."""
    mu = torch.tensor([[0.002, 0.004, 0.05, 0.3, 0.7, 0.95, 0.99]])
    pi = torch.tensor([[0.1, 0.2, 0.06, 0.3, 0.7, 0.96, 0.8]])
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 7, dtype=torch.bool)
    _, grpo = policy_loss(pi.log(), mu.log(), adv, mask, mode="grpo", low=0.2, high=0.28)
    _, tv = policy_loss(pi.log(), mu.log(), adv, mask, mode="dppo_binary_tv")
    assert grpo["masked_frac_by_mu/pos/0-0.01"].item() == 1.0 and tv["masked_frac_by_mu/pos/0-0.01"].item() == 0.5
    assert grpo["masked_frac_by_mu/neg/0.9-1"].item() == 0.0 and tv["masked_frac_by_mu/neg/0.9-1"].item() == 1.0
    assert grpo["tokens_by_mu/pos/0-0.01"] == 2 and grpo["tokens_by_mu/0.9-1"] == 2 and grpo["tokens_by_mu/neg/0.9-1"] == 1
    assert grpo["mismatch_tv_by_mu/0-0.01"].item() == pytest.approx((0.098 + 0.196) / 2)
    assert grpo["mismatch_tv_by_mu/0.1-0.5"].item() == pytest.approx(0.0, abs=1e-7)
    assert grpo["masked_frac_by_mu/neg/0.01-0.1"].item() == 0.0 and grpo["tokens_by_mu/neg/0.01-0.1"] == 0
    # Every token falls in exactly one bucket.
    assert sum(grpo[f"tokens_by_mu/{b}"] for b in ("0-0.01", "0.01-0.1", "0.1-0.5", "0.5-0.9", "0.9-1")) == 7


def test_masked_fraction_counts_only_tokens_with_a_gradient_to_lose():
    """A = 0 tokens carry no gradient: the authors' clip fraction leaves them out of the
    denominator, and so does masked_frac."""
    pi, mu = torch.tensor([[0.5, 0.3, 0.3, 0.3]]), torch.tensor([[0.2, 0.3, 0.3, 0.3]])
    adv = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    _, m = policy_loss(pi.log(), mu.log(), adv, torch.ones(1, 4, dtype=torch.bool), mode="dppo_binary_tv")
    assert m["masked_frac"].item() == pytest.approx(0.5) and m["tokens_signed"] == 2 and m["tokens"] == 4


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


# --- every mode against its formula, written here from the paper and the authors' code --------


def mode_inputs(mode, seed=0, b=6, length=7):
    """Random float64 tokens with shifts big enough that every rule drops some and keeps some."""
    gen = torch.Generator().manual_seed(seed)
    rollout = torch.log(torch.rand(b, length, generator=gen, dtype=torch.float64) * 0.98 + 0.01)
    logprob = (rollout + 0.8 * torch.randn(b, length, generator=gen, dtype=torch.float64)).clamp(max=-1e-4)
    mask = torch.rand(b, length, generator=gen) > 0.15
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.0, 0.0, 0.7], dtype=torch.float64)[:b]
    extra = dict(low=0.2, high=0.28) if mode.startswith("grpo") or mode == "cispo" else dict(low=0.15, high=0.15)
    extra.update(topk_tv=torch.rand(b, length, generator=gen, dtype=torch.float64) * 0.3,
                 topk_kl=torch.rand(b, length, generator=gen, dtype=torch.float64) * 0.3)
    if needs_old_logprob(mode):
        noise = 0.2 * torch.randn(b, length, generator=gen, dtype=torch.float64)
        extra["old_logprob"] = (rollout + noise).clamp(max=-1e-4)
    if mode.startswith("grpo_relax"):
        extra["relax_below"] = 0.3
    if mode == "pg_tis":
        extra["ratio_cap"] = 2.0
    return logprob, rollout, advantages, mask, extra


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_every_mode_gives_the_loss_and_gradient_of_its_formula(mode):
    logprob, rollout, adv, mask, extra = mode_inputs(mode)
    expected_loss, expected_grad = reference_loss(mode, logprob, rollout, adv, mask, **extra)
    lp = logprob.clone().requires_grad_()
    token_ids = torch.randint(0, 5, logprob.shape, generator=torch.Generator().manual_seed(1))
    loss, metrics = policy_loss(lp, rollout, adv, mask, mode=mode, token_ids=token_ids, vocab_size=5, **extra)
    (grad,) = torch.autograd.grad(loss, lp)
    # The weight is computed in float32 (as in training): agreement to float32 precision.
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6, abs=1e-9)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)
    # The inputs exercise the rule: some tokens with A != 0 kept, and (where there is a mask) some dropped.
    signed = mask & (adv[:, None] != 0)
    dropped = signed & (expected_grad == 0)
    assert (signed & (expected_grad != 0)).any(), mode
    assert dropped.any() == (mode not in ("cispo", "pg_is", "pg_tis")), mode
    assert metrics["tokens_masked"].item() == dropped.sum().item()
    assert metrics["masked_frac"].item() == pytest.approx(dropped.sum().item() / signed.sum().item())
    # Which ids were dropped, by advantage sign: the reference's dropped tokens, counted per id.
    for row, side in enumerate((adv[:, None] > 0, adv[:, None] < 0)):
        expected = torch.bincount(token_ids[dropped & side], minlength=5).double()
        torch.testing.assert_close(metrics["masked_token_counts"][row], expected, msg=mode)


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_every_mode_stays_finite_at_the_edges(mode):
    """pi = mu, mu = 1, log(pi/mu) = 100 (pi = 1, mu = e^-100: the ratio is e^100 unclamped)
    and A = 0, with and without a ratio cap: loss, gradient and every metric are finite."""
    logprob = torch.tensor([[-0.5, -1e-6, 0.0, -0.7], [-2.0, 0.0, -100.0, -0.1]], dtype=torch.float64)
    rollout = torch.tensor([[-0.5, 0.0, -100.0, -0.7], [-2.0, -100.0, 0.0, -0.1]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    _, _, _, _, extra = mode_inputs(mode, b=2, length=4)
    for advantages in (adv, torch.zeros(2, dtype=torch.float64)):
        for cap in ({"ratio_cap": None} if mode != "pg_tis" else {}, {"ratio_cap": 10.0}):
            lp = logprob.clone().requires_grad_()
            loss, metrics = policy_loss(lp, rollout, advantages, mask, mode=mode, **{**extra, **cap})
            (grad,) = torch.autograd.grad(loss, lp)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), (mode, cap)
            assert all(torch.isfinite(v) for v in metrics.values()), (mode, cap, metrics)
            assert metrics["ratio_max"].item() == pytest.approx(math.exp(20.0))  # the clamp, not inf
            # |pi - mu| from pi and mu themselves: the three tokens that moved all the mass count 1.
            assert metrics["mismatch_tv"].item() == pytest.approx(3 / 8, abs=1e-5)


def test_masked_token_counts_count_each_dropped_token_id_by_advantage_sign():
    token_ids = torch.tensor([[5, 7, 5, 9], [5, 2, 2, 0]])
    dropped = torch.tensor([[True, False, True, True], [True, True, True, False]])
    counts = masked_token_counts(token_ids, dropped, torch.tensor([1.0, -2.0]), vocab_size=10)
    assert counts.shape == (2, 10) and counts.dtype == torch.float64
    assert counts[0].tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 0, 1]  # A > 0: 5 twice, 9 once
    assert counts[1].tolist() == [0, 0, 2, 0, 0, 1, 0, 0, 0, 0]  # A < 0: 2 twice, 5 once
    # A = 0 tokens are never counted, even if a caller marks them.
    assert masked_token_counts(token_ids, dropped, torch.zeros(2), vocab_size=10).sum() == 0
