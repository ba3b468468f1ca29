"""Spreading /generate requests over many SGLang servers (or embedded engines).

Requests travel in batches of up to `requests_per_call` (consecutive requests that want the
same extras), one /generate call each. Each call goes to the live server with the fewest requests in flight, under a per-server
concurrency bound and a timeout. Connection errors, timeouts, 5xx, malformed JSON and aborted
requests are retried with backoff (the whole call, under fresh rids: SGLang refuses a rid
still in flight), on another server when there is one; a server that fails
`failures_before_dead` times in a row is marked dead and handed to `restart` (the server
manager), and takes requests again once that returns (or, where it raises ServerRejoinsLater,
from the next `generate` call, when it is asked again; ServersAwaitWeights where no other
server is left to serve meanwhile; NoServerLeft where every restart failed). A 4xx is the
request's fault and a well-formed answer that breaks the protocol (say, no routes under R3)
stops the run: neither is retried. Every request yields exactly one sample, in the order given.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from dppo_megatron.keys import headers
from dppo_megatron.rollout.protocol import (
    ProtocolError, RequestAborted, RoutingShape, Sample, SamplingParams, error_message, generate_request,
    parse_generate_response,
)

log = logging.getLogger(__name__)
RETRIED_4XX = (408, 429)  # timeouts and throttling: the server's state, not the request's fault


class ServerRejoinsLater(RuntimeError):
    """A restart's answer: the server runs again but takes requests only from the next
    `generate` call (it gets the current weights at the next weight update, with the others)."""


class RolloutError(RuntimeError):
    """Rollouts cannot go on: a request was refused, or no server could serve it."""


class NoServerLeft(RolloutError):
    """Every server is dead, and no restart is under way: the batch can be made once the
    trainer brought them back."""


class ServersAwaitWeights(NoServerLeft):
    """Every server is dead or restarted and waiting for the current weights (ServerRejoinsLater):
    the batch can be made once the weights are sent to them (by the trainer's every rank)."""


@dataclass(frozen=True)
class ClientConfig:
    """The recipe's settings (rollout.*; built by run/configs.py: client_config, their one
    default is in config/schema.py), then the client's own retry policy."""

    request_timeout: float  # seconds for one /generate answer (long responses take long)
    max_in_flight_per_server: int
    requests_per_call: int  # requests batched into one /generate call
    topk_b64: bool  # top-K as SGLang's flat base64 arrays, not JSON triples
    max_attempts: int = 6
    backoff_seconds: float = 0.5  # doubled after each failed attempt of a request
    max_backoff_seconds: float = 15.0
    failures_before_dead: int = 3
    wait_for_servers_seconds: float = 600.0  # with every server dead, how long to wait for restarts


@dataclass(frozen=True)
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    topk: int = 0
    routing: RoutingShape | None = None  # R3: routes of this shape are required


def chunk_request(chunk: list[Request], *, topk_b64: bool, attempt: int = 1) -> dict:
    """The /generate body for a chunk of requests (one request, or a batch) with the same top-K
    and routing wishes. A retry (attempt > 1) gets fresh rids: SGLang refuses a rid still in
    flight ("Duplicate request ID"), and the first attempt may still be."""
    first = chunk[0]
    rids = [r.rid if attempt == 1 else f"{r.rid}~{attempt}" for r in chunk]
    if len(chunk) == 1:
        return generate_request(rids[0], first.prompt_ids, first.params, topk=first.topk,
                                return_routed_experts=first.routing is not None, topk_b64=topk_b64)
    return generate_request(rids, [r.prompt_ids for r in chunk], [r.params for r in chunk], topk=first.topk,
                            return_routed_experts=first.routing is not None, topk_b64=topk_b64)


@dataclass
class _Server:
    url: str
    semaphore: asyncio.Semaphore
    in_flight: int = 0
    failures: int = 0
    dead: bool = False
    reviving: asyncio.Task | None = field(default=None, repr=False)
    waits_for: str = ""  # why a restarted server takes no requests yet (ServerRejoinsLater)


class RolloutClient:
    def __init__(self, servers: list[str], config: ClientConfig, *,
                 restart: Callable[[str], None] | None = None, api_key: str | None = None):
        """`api_key`: the servers' generation key (keys.py), sent as a Bearer token."""
        if not servers:
            raise ValueError("no rollout servers given")
        self.urls = [url.rstrip("/") for url in servers]
        self.config = config
        self.restart = restart
        self.headers = headers(api_key)
        self._servers: list[_Server] | None = None

    def dead_servers(self) -> list[str]:
        return [s.url for s in self._servers or [] if s.dead]

    def generate_sync(self, requests: list[Request], on_sample: Callable[[int, Sample], None] | None = None
                      ) -> list[Sample]:
        return asyncio.run(self.generate(requests, on_sample))

    async def generate(self, requests: list[Request], on_sample: Callable[[int, Sample], None] | None = None
                       ) -> list[Sample]:
        """One sample per request, in order. `on_sample(index, sample)` is called as each one
        arrives (in the event loop: it must not block), so that scoring overlaps generation."""
        import aiohttp

        if self._servers is None:
            self._servers = [_Server(url, asyncio.Semaphore(1)) for url in self.urls]
        # Each call may run in a new event loop (generate_sync): the semaphores and restart
        # tasks of the last one are gone. Dead servers stay dead, and get a new restart.
        for server in self._servers:
            server.semaphore = asyncio.Semaphore(self.config.max_in_flight_per_server)
            server.in_flight = 0
            server.reviving = None
            if server.dead and self.restart is not None:
                server.reviving = asyncio.create_task(self._revive(server))
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers=self.headers) as session:
            tasks, offset = [], 0
            for chunk in self._chunks(requests):
                tasks.append(asyncio.create_task(self._serve_and_report(session, chunk, offset, on_sample)))
                offset += len(chunk)
            try:
                samples = [sample for chunk in await asyncio.gather(*tasks) for sample in chunk]
            except BaseException:
                for task in tasks:
                    task.cancel()
                raise
            # A restart still under way when the last sample came in: its answer says whether the
            # server is back (a restart's thread cannot be cancelled; the loop would wait for it
            # anyway, and a cancelled task would forget the answer and ask for another restart).
            await asyncio.gather(*(s.reviving for s in self._servers if s.reviving is not None))
            return samples

    def _chunks(self, requests: list[Request]) -> list[list[Request]]:
        """Consecutive requests with the same top-K and routing wishes, at most
        requests_per_call per chunk: the order of the samples stays the order of the requests."""
        chunks: list[list[Request]] = []
        size = max(1, self.config.requests_per_call)
        for request in requests:
            last = chunks[-1] if chunks else None
            if last and len(last) < size and (last[0].topk, last[0].routing) == (request.topk, request.routing):
                last.append(request)
            else:
                chunks.append([request])
        return chunks

    async def _serve_and_report(self, session, chunk: list[Request], offset: int, on_sample) -> list[Sample]:
        samples = await self._serve(session, chunk)
        if on_sample is not None:
            for index, sample in enumerate(samples, start=offset):
                on_sample(index, sample)
        return samples

    async def _serve(self, session, chunk: list[Request]) -> list[Sample]:
        first = chunk[0]
        body = chunk_request(chunk, topk_b64=self.config.topk_b64)
        name = first.rid if len(chunk) == 1 else f"{first.rid} (+{len(chunk) - 1} batched)"
        backoff = self.config.backoff_seconds
        last_failure, last_server = "", None
        for attempt in range(1, self.config.max_attempts + 1):
            server = await self._pick(exclude=last_server)
            last_server = server
            if attempt > 1:
                body = chunk_request(chunk, topk_b64=self.config.topk_b64, attempt=attempt)
            failure = await self._attempt(session, server, body, chunk)
            if isinstance(failure, list):
                return failure
            last_failure = f"{server.url}: {failure}"
            log.warning("request %s attempt %d failed on %s", name, attempt, last_failure)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, self.config.max_backoff_seconds)
        raise RolloutError(f"request {name} failed {self.config.max_attempts} times; last: {last_failure}")

    async def _attempt(self, session, server: _Server, body: dict, chunk: list[Request]) -> list[Sample] | str:
        """One try: the samples, or why it failed in a way worth retrying."""
        import aiohttp

        async with server.semaphore:
            server.in_flight += 1
            try:
                async with session.post(server.url + "/generate", json=body) as response:
                    status, text = response.status, await response.text()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
                return self._failed(server, f"connection error: {type(error).__name__}: {error}")
            finally:
                server.in_flight -= 1
        if status != 200:
            message = error_message(status, text)
            if 400 <= status < 500 and status not in RETRIED_4XX:
                raise RolloutError(f"{server.url} refused request {chunk[0].rid}: {message}")
            return self._failed(server, message)
        try:
            answer = json.loads(text)
        except ValueError:
            return self._failed(server, f"malformed JSON: {text[:200]!r}")
        answers = [answer] if len(chunk) == 1 else answer
        if not isinstance(answers, list) or len(answers) != len(chunk):
            raise RolloutError(f"{server.url}: a batch of {len(chunk)} requests got {type(answer).__name__} back")
        samples = []
        try:
            for request, item in zip(chunk, answers):
                samples.append(parse_generate_response(item, rid=request.rid, prompt_ids=request.prompt_ids,
                                                       server=server.url, topk=request.topk, routing=request.routing))
        except RequestAborted as aborted:
            return self._failed(server, str(aborted), counts=False)
        except ProtocolError as error:
            raise RolloutError(str(error)) from None
        server.failures = 0
        return samples

    def _failed(self, server: _Server, reason: str, counts: bool = True) -> str:
        if counts:
            server.failures += 1
            if server.failures >= self.config.failures_before_dead and not server.dead:
                server.dead = True
                log.error("rollout server %s marked dead after %d failures: %s", server.url, server.failures, reason)
                if self.restart is not None:
                    server.reviving = asyncio.create_task(self._revive(server))
        return reason

    async def _revive(self, server: _Server) -> None:
        try:
            await asyncio.to_thread(self.restart, server.url)
        except ServerRejoinsLater as later:
            server.waits_for = str(later)
            log.warning("rollout server %s restarted: %s", server.url, later)
            return
        except Exception as error:  # noqa: BLE001 - a failed restart leaves the server dead
            log.error("restarting %s failed: %s", server.url, error)
            return
        server.failures, server.dead, server.waits_for = 0, False, ""
        log.warning("rollout server %s restarted", server.url)

    async def _pick(self, exclude: _Server | None) -> _Server:
        """The live server with the fewest requests in flight (another one than `exclude` when
        possible); waits for a restart when every server is dead."""
        waited = 0.0
        while True:
            alive = [s for s in self._servers if not s.dead]
            if alive:
                others = [s for s in alive if s is not exclude] or alive
                return min(others, key=lambda s: s.in_flight)
            restarting = any(s.reviving is not None and not s.reviving.done() for s in self._servers)
            if waited >= self.config.wait_for_servers_seconds or not restarting:
                waiting = [f"{s.url} was restarted: {s.waits_for}" for s in self._servers if s.waits_for]
                raise (ServersAwaitWeights if waiting and not restarting else NoServerLeft)(
                    "every rollout server is dead: " + ", ".join(s.url for s in self._servers)
                    + "".join(f"; {line}" for line in waiting))
            await asyncio.sleep(0.2)
            waited += 0.2
