"""A reward server: POST {"response", "answer"} -> {"reward": float}, with a timeout and retries
(connection errors, timeouts and 5xx are retried with backoff; a 4xx or an answer without a
number is an error)."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request

from dppo_megatron.keys import headers


class RewardServerError(RuntimeError):
    pass


class RewardServer:
    def __init__(self, url: str, *, timeout: float = 5.0, retries: int = 3, backoff: float = 0.2,
                 api_key: str | None = None):
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.headers = {"Content-Type": "application/json", **headers(api_key)}

    def __call__(self, response: str, answer: str) -> float:
        body = json.dumps({"response": response, "answer": answer}).encode()
        delay, last = self.backoff, ""
        for _attempt in range(1 + self.retries):
            request = urllib.request.Request(self.url, data=body, headers=self.headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    return _reward_of(reply.read(), self.url)
            except urllib.error.HTTPError as error:
                if error.code < 500:
                    raise RewardServerError(f"reward server {self.url}: HTTP {error.code}: "
                                            f"{error.read()[:300].decode(errors='replace')}") from None
                last = f"HTTP {error.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                last = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
            time.sleep(delay)
            delay *= 2
        raise RewardServerError(f"reward server {self.url} failed {1 + self.retries} times; last: {last}")


def _reward_of(payload: bytes, url: str) -> float:
    try:
        reward = float(json.loads(payload)["reward"])
    except (ValueError, KeyError, TypeError):
        raise RewardServerError(f"reward server {url} must answer {{\"reward\": <number>}}, got "
                                f"{payload[:200]!r}") from None
    if not math.isfinite(reward):
        raise RewardServerError(f"reward server {url} answered a non-finite reward {reward}")
    return reward
