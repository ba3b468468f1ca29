"""Rewards: a function of (response text, reference answer) -> float, chosen by the recipe: a
built-in (math-verify, the toy task), any Python function named `module:function`, or a
reward server reached over HTTP. `RewardPool` (rewards/pool.py) scores them in worker
processes as the responses arrive."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

RewardFn = Callable[[str, str], float]
BUILTIN = ("math", "reverse_digits")


@dataclass(frozen=True)
class RewardSpec:
    """What scores a response. kind: math | reverse_digits | python (`function` is
    "module:function", called as f(response, answer) -> float) | http (`url` answers a POST of
    {"response", "answer"} with {"reward": float})."""

    kind: str = "math"
    timeout: float = 5.0  # seconds for one response (math-verify's own limit, the HTTP timeout)
    function: str | None = None
    url: str | None = None
    retries: int = 3  # http: attempts after a connection error, timeout or 5xx
    api_key_file: str | None = None  # http: its key (keys.py), read where the reward runs


def reward_function(spec: RewardSpec | str, *, timeout: float = 5.0) -> RewardFn:
    """The callable a spec names (a bare kind is a built-in)."""
    if isinstance(spec, str):
        spec = RewardSpec(kind=spec, timeout=timeout)
    if spec.kind == "math":
        from dppo_megatron.rewards.math import MathReward

        return MathReward(timeout=spec.timeout)
    if spec.kind == "reverse_digits":
        from dppo_megatron.rewards.toy import reverse_digits_reward

        return reverse_digits_reward
    if spec.kind == "python":
        return import_function(spec.function)
    if spec.kind == "http":
        from dppo_megatron.keys import keys_of
        from dppo_megatron.rewards.remote import RewardServer

        return RewardServer(spec.url, timeout=spec.timeout, retries=spec.retries,
                            api_key=keys_of(spec.api_key_file).api_key)
    raise ValueError(f"unknown reward kind {spec.kind!r}; choose {', '.join(BUILTIN)}, python or http")


def import_function(name: str | None) -> RewardFn:
    """`module:function` -> the function (the module is imported from sys.path, which includes
    the directory the run was started from)."""
    module_name, _, attribute = (name or "").partition(":")
    if not module_name or not attribute:
        raise ValueError(f"reward.function must be 'module:function', got {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward.function {name!r}: cannot import {module_name!r}: {error}") from None
    function = module
    for part in attribute.split("."):
        function = getattr(function, part, None)
        if function is None:
            raise ValueError(f"reward.function {name!r}: {module_name} has no {attribute!r}")
    if not callable(function):
        raise ValueError(f"reward.function {name!r} is not callable")
    return function


def overlong_penalty(length: int, max_new_tokens: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong penalty: 0 up to max_new_tokens - buffer, then falling linearly to
    -penalty at max_new_tokens."""
    start = max_new_tokens - buffer
    if length <= start:
        return 0.0
    return -penalty * min(1.0, (length - start) / buffer)
