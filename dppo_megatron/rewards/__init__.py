"""Rewards: a function of (response text, reference answer) -> float, chosen by the recipe."""

from __future__ import annotations

from collections.abc import Callable

RewardFn = Callable[[str, str], float]


def reward_function(kind: str, *, timeout: float = 5.0) -> RewardFn:
    if kind == "math":
        from dppo_megatron.rewards.math import MathReward

        return MathReward(timeout=timeout)
    if kind == "reverse_digits":
        from dppo_megatron.rewards.toy import reverse_digits_reward

        return reverse_digits_reward
    raise ValueError(f"unknown reward kind {kind!r}; choose math or reverse_digits")


def overlong_penalty(length: int, max_new_tokens: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong penalty: 0 up to max_new_tokens - buffer, then falling linearly to
    -penalty at max_new_tokens."""
    start = max_new_tokens - buffer
    if length <= start:
        return 0.0
    return -penalty * min(1.0, (length - start) / buffer)
