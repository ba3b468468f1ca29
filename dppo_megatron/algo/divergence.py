"""Divergences between the rollout policy mu and the current policy pi at the sampled token."""

from __future__ import annotations

import math

import torch

from dppo_megatron.algo.token_stats import MIN_MASS

_LOG_MIN_MASS = math.log(MIN_MASS)


def binary_tv(logprob: torch.Tensor, rollout_logprob: torch.Tensor) -> torch.Tensor:
    """|pi(y_t) - mu(y_t)|: total variation between Bern(mu) and Bern(pi)."""
    return (logprob.exp() - rollout_logprob.exp()).abs()


def binary_kl(logprob: torch.Tensor, rollout_logprob: torch.Tensor) -> torch.Tensor:
    """KL(Bern(mu(y_t)) || Bern(pi(y_t))), masses clamped at 1e-12 before the logs."""
    mu = rollout_logprob.exp().clamp(min=MIN_MASS)
    log_mu, log_pi = rollout_logprob.clamp(min=_LOG_MIN_MASS), logprob.clamp(min=_LOG_MIN_MASS)
    mu_rest = (1.0 - mu).clamp(min=MIN_MASS)
    log_mu_rest, log_pi_rest = _log1mexp(rollout_logprob), _log1mexp(logprob)
    return mu * (log_mu - log_pi) + mu_rest * (log_mu_rest - log_pi_rest)


def _log1mexp(logprob: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(logprob)), accurate near 0 and near 1, clamped at log(1e-12)."""
    lp = logprob.clamp(max=0.0)
    near_one = lp > -math.log(2.0)
    value = torch.where(near_one, torch.log(-torch.expm1(lp)), torch.log1p(-lp.exp()))
    return value.clamp(min=_LOG_MIN_MASS)
