"""Which tokens each loss mode keeps: the paper's two cases and every mode's rule."""

import math

import pytest
import torch

from dppo_megatron.algo import (
    LOSS_MODES,
    binary_kl,
    binary_tv,
    needs_old_logprob,
    needs_ratio_cap,
    needs_relax_below,
    needs_topk,
    trust_region_mask,
)


def logp(p: float) -> torch.Tensor:
    return torch.tensor([math.log(p)])


def kept(mode, pi, mu, advantage, **kwargs) -> bool:
    return bool(trust_region_mask(mode, logp(pi), logp(mu), torch.tensor([advantage]), **kwargs)[0])


def test_rare_token_rising_is_dropped_by_grpo_but_kept_by_dppo_binary_tv():
    # mu = 1e-5 -> pi = 1e-3: ratio 100, yet the probability moved by only 0.001.
    assert not kept("grpo", 1e-3, 1e-5, 1.0, low=0.2, high=0.2)
    assert kept("dppo_binary_tv", 1e-3, 1e-5, 1.0, low=0.15, high=0.15)


def test_likely_token_collapsing_is_kept_by_grpo_but_dropped_by_dppo_binary_tv():
    # mu = 0.99 -> pi = 0.80 with A < 0: ratio 0.81 is inside PPO's clip, yet 0.19 of mass moved.
    assert kept("grpo", 0.80, 0.99, -1.0, low=0.2, high=0.2)
    assert not kept("dppo_binary_tv", 0.80, 0.99, -1.0, low=0.15, high=0.15)


@pytest.mark.parametrize(
    "pi, mu, advantage, expected",
    [
        (0.50, 0.30, +1.0, False),  # pushed up past high
        (0.40, 0.30, +1.0, True),  # up, within high
        (0.10, 0.30, +1.0, True),  # A > 0 but pi fell: the update does not push it out
        (0.10, 0.30, -1.0, False),  # pushed down past low
        (0.50, 0.30, -1.0, True),  # A < 0 but pi rose
        (0.90, 0.10, 0.0, True),  # A == 0 is always kept
    ],
)
def test_dppo_binary_tv_drops_only_moves_in_the_advantage_direction(pi, mu, advantage, expected):
    assert kept("dppo_binary_tv", pi, mu, advantage, low=0.15, high=0.15) is expected


def test_binary_tv_uses_separate_low_and_high_thresholds():
    assert kept("dppo_binary_tv", 0.50, 0.30, +1.0, low=0.1, high=0.25)
    assert not kept("dppo_binary_tv", 0.15, 0.30, -1.0, low=0.1, high=0.25)


@pytest.mark.parametrize(
    "pi, mu, advantage, expected",
    [
        (0.60, 0.30, +1.0, False),  # KL(Bern(.3)||Bern(.6)) = 0.19 > 0.05, pi rose
        (0.32, 0.30, +1.0, True),  # tiny KL
        (0.10, 0.30, +1.0, True),  # large KL but pi fell
        (0.10, 0.30, -1.0, False),
        (0.60, 0.30, -1.0, True),
        (0.60, 0.30, 0.0, True),
    ],
)
def test_dppo_binary_kl_rule(pi, mu, advantage, expected):
    assert kept("dppo_binary_kl", pi, mu, advantage, low=0.05, high=0.05) is expected


@pytest.mark.parametrize("mode, field", [("dppo_topk_tv", "topk_tv"), ("dppo_topk_kl", "topk_kl")])
def test_topk_modes_use_the_reduced_divergence_with_the_direction_of_the_sampled_token(mode, field):
    lp, mu = torch.log(torch.tensor([0.5, 0.5, 0.1, 0.1])), torch.log(torch.tensor([0.3, 0.3, 0.3, 0.3]))
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    divergence = torch.tensor([0.2, 0.01, 0.2, 0.2])
    mask = trust_region_mask(mode, lp, mu, adv, low=0.1, high=0.1, **{field: divergence})
    assert mask.tolist() == [False, True, False, True]


@pytest.mark.parametrize("mode", ["dppo_topk_tv", "dppo_topk_kl"])
def test_topk_modes_without_topk_divergence_are_refused(mode):
    with pytest.raises(ValueError, match="top-K"):
        trust_region_mask(mode, logp(0.5), logp(0.5), torch.tensor([1.0]), low=0.1, high=0.1)


def test_grpo_clips_the_ratio_on_the_advantage_side():
    assert not kept("grpo", 0.40, 0.30, +1.0, low=0.2, high=0.28)  # ratio 1.33 > 1.28
    assert kept("grpo", 0.38, 0.30, +1.0, low=0.2, high=0.28)  # ratio 1.27
    assert not kept("grpo", 0.20, 0.30, -1.0, low=0.2, high=0.28)  # ratio 0.67 < 0.8
    assert kept("grpo", 0.20, 0.30, +1.0, low=0.2, high=0.28)


@pytest.mark.parametrize("mode", ["cispo", "pg_is"])
def test_modes_without_trust_region_keep_every_token(mode):
    lp = torch.log(torch.tensor([0.9, 0.01, 0.5]))
    mu = torch.log(torch.tensor([0.01, 0.9, 0.5]))
    assert trust_region_mask(mode, lp, mu, torch.tensor([1.0, -1.0, 1.0]), low=0.1, high=0.1).all()


@pytest.mark.parametrize("mode", ["dppo_binary_tv_recompute", "dppo_binary_kl_recompute", "grpo_recompute"])
def test_recompute_ablations_anchor_to_the_old_policy(mode):
    base = mode.removesuffix("_recompute")
    pi, mu, old = logp(0.6), logp(0.3), logp(0.59)
    adv = torch.tensor([1.0])
    # Far from mu (the base mode drops it), next to the recomputed old policy (kept).
    assert not trust_region_mask(base, pi, mu, adv, low=0.05, high=0.05)[0]
    assert trust_region_mask(mode, pi, mu, adv, low=0.05, high=0.05, old_logprob=old)[0]
    with pytest.raises(ValueError, match="old_logprob"):
        trust_region_mask(mode, pi, mu, adv, low=0.05, high=0.05)


def test_mode_capabilities():
    assert {m for m in LOSS_MODES if needs_topk(m)} == {"dppo_topk_tv", "dppo_topk_kl"}
    assert {m for m in LOSS_MODES if needs_old_logprob(m)} == {
        "dppo_binary_tv_recompute", "dppo_binary_kl_recompute", "grpo_recompute"}
    assert {m for m in LOSS_MODES if needs_relax_below(m)} == {"grpo_relax_high", "grpo_relax_low", "grpo_relax_both"}
    assert {m for m in LOSS_MODES if needs_ratio_cap(m)} == {"pg_tis"}


def test_relax_ablations_keep_only_the_rare_ratio_clipped_tokens_on_their_side():
    """GRPO drops a token that rose from mu = 0.05 to 0.1 (r = 2) with A > 0, and one that fell
    from 0.05 to 0.02 (r = 0.4) with A < 0; the relax modes keep them on their side (mu < 0.1),
    and still drop such moves of a likely token (mu = 0.5 -> 0.9 up, 0.5 -> 0.2 down)."""
    rare_up, rare_down = (0.1, 0.05, 1.0), (0.02, 0.05, -1.0)
    likely_up, likely_down = (0.9, 0.5, 1.0), (0.2, 0.5, -1.0)
    expected = {"grpo": (False, False), "grpo_relax_high": (True, False), "grpo_relax_low": (False, True),
                "grpo_relax_both": (True, True)}
    for mode, (up, down) in expected.items():
        extra = {"low": 0.2, "high": 0.28, "relax_below": 0.1}
        assert kept(mode, *rare_up, **extra) is up, mode
        assert kept(mode, *rare_down, **extra) is down, mode
        assert not kept(mode, *likely_up, **extra) and not kept(mode, *likely_down, **extra), mode


def test_unknown_mode_lists_the_known_ones():
    with pytest.raises(ValueError, match="dppo_binary_tv"):
        trust_region_mask("ppo2", logp(0.5), logp(0.5), torch.tensor([1.0]), low=0.1, high=0.1)


def test_per_response_advantages_broadcast_over_tokens():
    lp = torch.log(torch.tensor([[0.9, 0.3], [0.1, 0.3]]))
    mu = torch.log(torch.full((2, 2), 0.3))
    mask = trust_region_mask("dppo_binary_tv", lp, mu, torch.tensor([1.0, -1.0]), low=0.15, high=0.15)
    assert mask.tolist() == [[False, True], [False, True]]


def test_binary_divergences_match_their_float64_formulas():
    pi = torch.tensor([1e-6, 0.01, 0.3, 0.5, 0.99, 1.0 - 1e-6], dtype=torch.float64)
    mu = torch.tensor([1e-3, 0.02, 0.6, 0.5, 0.8, 0.9], dtype=torch.float64)
    expected_kl = mu * (mu / pi).log() + (1 - mu) * ((1 - mu) / (1 - pi)).log()
    got_kl = binary_kl(pi.log().float(), mu.log().float()).double()
    torch.testing.assert_close(got_kl, expected_kl, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(binary_tv(pi.log().float(), mu.log().float()).double(), (pi - mu).abs(), atol=1e-6, rtol=0)


def test_binary_kl_stays_finite_at_certain_tokens():
    lp = torch.tensor([0.0, -1e-9, -50.0])
    mu = torch.tensor([-1e-3, 0.0, 0.0])
    assert torch.isfinite(binary_kl(lp, mu)).all()
