"""The toy task's reward: partial credit per position, so a tiny model gets a gradient long
before it gets whole answers right."""

from __future__ import annotations


def reverse_digits_reward(response: str, answer: str) -> float:
    """Fraction of positions where the response has the answer's word; extra or missing words
    count as wrong positions (so the model must also learn to stop)."""
    expected, produced = answer.split(), response.split()
    if not expected:
        return 0.0
    right = sum(e == p for e, p in zip(expected, produced))
    return right / max(len(expected), len(produced))
