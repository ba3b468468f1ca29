"""Rank 0: the one owner of the rollout servers' lives and of the weights each one holds.

A server is restarted from two places: at the rollout client's call for one that died while
generating (on a thread of rank 0, run/rollout_process.py), and by the weight publisher, which
finds one dead, or stuck on a broken broadcast, when it publishes (rank 0's main thread). Either
may come while the other is under way: a restart under a publish leaves the server on the
initial weights while the publisher counts it current, a publish under a restart fails on a
server that is about to come back. So both own the server first (`owning`, a lock per server):
restarts of a server and publishes to it exclude each other, and `holds` says which version
every server has."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

from dppo_megatron.rollout.servers import Servers, ServerStartError
from dppo_megatron.rollout.weight_sync import WeightSyncError

log = logging.getLogger(__name__)

RESTART_ATTEMPTS = 3  # a server that fails to start this many times in a row is lost


class ServersLost(WeightSyncError):
    """A server could not be brought back (its restarts kept failing), or the weights could not
    reach it: the run stops, after a checkpoint of the step it finished."""


class ServerKeeper:
    def __init__(self, servers: Servers, *, attempts: int = RESTART_ATTEMPTS):
        self.servers, self.attempts = servers, attempts
        self.urls = list(servers.urls)
        self.holds = dict.fromkeys(self.urls, 0)  # the weight version each serves; 0 is the initial model
        self.restarts = dict.fromkeys(self.urls, 0)  # how often each was restarted (by whichever caller)
        self._locks = {url: threading.Lock() for url in self.urls}

    @contextmanager
    def owning(self, urls: list[str]) -> Iterator[None]:
        """Own `urls`: no restart of them, no publish to them, by anyone else meanwhile. Locks
        are taken in one order, so two owners never wait for each other."""
        with ExitStack() as stack:
            for url in sorted(set(urls), key=self.urls.index):
                stack.enter_context(self._locks[url])
            yield

    def restart(self, url: str) -> None:
        """Start the server at `url` again (the caller owns it): it then serves the initial
        weights. A start that fails is tried again, `attempts` times in all; then ServersLost."""
        failures = []
        for attempt in range(1, self.attempts + 1):
            self.holds[url] = 0  # whatever it held dies with it
            try:
                self.servers.restart(url)
            except ServerStartError as error:
                failures.append(str(error).splitlines()[0])
                log.warning("restarting %s failed (attempt %d of %d): %s", url, attempt, self.attempts, failures[-1])
                continue
            self.restarts[url] += 1
            return
        raise ServersLost(f"{url} could not be restarted ({self.attempts} attempts; last: {failures[-1]})")

    def restart_all(self, urls: list[str]) -> None:
        """Restart `urls` (owned by the caller) side by side."""
        if urls:
            with ThreadPoolExecutor(max_workers=min(32, len(urls))) as pool:
                list(pool.map(self.restart, urls))

    def revive(self, urls: list[str]) -> list[str]:
        """Restart those of `urls` (owned by the caller) that do not answer /health; returns them."""
        with ThreadPoolExecutor(max_workers=max(1, min(32, len(urls)))) as pool:
            alive = dict(zip(urls, pool.map(self.servers.healthy, urls)))
        dead = [url for url in urls if not alive[url]]
        if dead:
            log.warning("%s did not answer /health: restarting %s", ", ".join(dead), "them" if len(dead) > 1 else "it")
            self.restart_all(dead)
        return dead
