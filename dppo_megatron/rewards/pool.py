"""Scoring responses in a pool of worker processes, as they arrive.

Each worker loads the tokenizer and the reward function once, then decodes and scores one
response at a time. A response that keeps its worker past the time limit (a reward function
stuck in a regex or a dead reward server) scores 0, and its worker is killed and replaced: no
other response is lost or delayed beyond the limit. Submitting never blocks; a `Future` per
response resolves when it is scored."""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import wait

from dppo_megatron.rewards import RewardSpec

log = logging.getLogger(__name__)
GRACE_SECONDS = 1.0  # beyond the reward's own timeout, before its worker is killed


def default_workers() -> int:
    """One worker per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class PoolCounts:
    scored: int = 0
    timeouts: int = 0  # workers killed past the time limit
    errors: int = 0  # the reward function raised (the response scores 0)
    first_error: str = ""

    def take(self) -> PoolCounts:
        """The counts so far, and start again from zero."""
        counts = PoolCounts(self.scored, self.timeouts, self.errors, self.first_error)
        self.scored = self.timeouts = self.errors = 0
        self.first_error = ""
        return counts


@dataclass
class _Worker:
    process: multiprocessing.Process
    conn: object
    ready: bool = False
    task: tuple | None = None  # (task id, future, deadline)


class RewardPool:
    def __init__(self, spec: RewardSpec, tokenizer_dir: str, *, workers: int = 0, time_limit: float | None = None):
        """`workers`: 0 = one per core. `time_limit`: seconds one response may take (default:
        the reward's timeout plus a grace second)."""
        self.spec, self.tokenizer_dir = spec, str(tokenizer_dir)
        self.size = workers or default_workers()
        self.time_limit = time_limit if time_limit is not None else spec.timeout + GRACE_SECONDS
        self.counts = PoolCounts()
        self._context = multiprocessing.get_context("spawn")  # never fork a process with torch threads
        self._pending: deque = deque()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake_reader, self._wake_writer = self._context.Pipe(duplex=False)
        self._closed = False
        self._broken: str | None = None
        self._workers = [self._start_worker() for _ in range(self.size)]
        self._thread = threading.Thread(target=self._manage, name="reward-pool", daemon=True)
        self._thread.start()

    # --- the caller's side ----------------------------------------------------------------

    def submit(self, response_ids, answer: str) -> Future:
        """Score one response (token ids) against its reference answer; returns a Future of
        the float reward."""
        future: Future = Future()
        with self._lock:
            if self._broken:
                future.set_exception(RuntimeError(self._broken))
                return future
            self._pending.append((next(self._ids), future, list(map(int, response_ids)), answer))
        self._wake_writer.send_bytes(b"")
        return future

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake_writer.send_bytes(b"")
        self._thread.join(timeout=10)
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 2
        for worker in self._workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the manager thread ---------------------------------------------------------------

    def _start_worker(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_worker_main, args=(child, self.spec, self.tokenizer_dir),
                                        name="reward-worker", daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent)

    def _manage(self) -> None:
        while not self._closed:
            self._dispatch()
            busy = [w for w in self._workers if w.task is not None or not w.ready]
            deadlines = [w.task[2] for w in self._workers if w.task is not None]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            ready = wait([self._wake_reader] + [w.conn for w in busy], timeout=timeout)
            for conn in ready:
                if conn is self._wake_reader:
                    while self._wake_reader.poll():
                        self._wake_reader.recv_bytes()
                    continue
                self._receive(next(w for w in self._workers if w.conn is conn))
            now = time.monotonic()
            for index, worker in enumerate(self._workers):
                if worker.task is not None and now > worker.task[2]:
                    log.warning("reward worker %d took more than %.1f s on one response: it scores 0 and the "
                                "worker is replaced", worker.process.pid, self.time_limit)
                    self.counts.timeouts += 1
                    worker.task[1].set_result(0.0)
                    worker.task = None
                    self._replace(index)
        with self._lock:
            for _task_id, future, _ids, _answer in self._pending:
                future.cancel()
            self._pending.clear()

    def _dispatch(self) -> None:
        with self._lock:
            for worker in self._workers:
                if not self._pending:
                    return
                if worker.ready and worker.task is None:
                    task_id, future, response_ids, answer = self._pending.popleft()
                    worker.conn.send((task_id, response_ids, answer))
                    worker.task = (task_id, future, time.monotonic() + self.time_limit)

    def _receive(self, worker: _Worker) -> None:
        index = self._workers.index(worker)
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):  # the worker died (a crash inside the reward function)
            if worker.task is not None:
                self.counts.errors += 1
                self.counts.first_error = self.counts.first_error or f"reward worker exited with {worker.process.exitcode}"
                worker.task[1].set_result(0.0)
            elif not worker.ready:  # it died while starting: the spec itself is broken
                worker.process.join(timeout=5)
                self._fail(f"a reward worker exited while starting (exit code {worker.process.exitcode}); "
                           "its stderr is in the trainer's log")
                return
            self._replace(index)
            return
        kind = message[0]
        if kind == "ready":
            worker.ready = True
        elif kind == "broken":
            self._fail(message[1])
        elif kind == "scored":
            _, task_id, reward, error = message
            task = worker.task
            worker.task = None
            if task is None or task[0] != task_id:
                return  # the answer of a task already given up on
            if error:
                self.counts.errors += 1
                self.counts.first_error = self.counts.first_error or error
            self.counts.scored += 1
            task[1].set_result(reward)

    def _replace(self, index: int) -> None:
        old = self._workers[index]
        if old.process.is_alive():
            old.process.kill()
        old.process.join(timeout=5)
        old.conn.close()
        self._workers[index] = self._start_worker()

    def _fail(self, reason: str) -> None:
        """The reward cannot be built: every waiting response fails with the reason."""
        with self._lock:
            self._broken = reason
            waiting = [task[1] for task in self._pending] + [w.task[1] for w in self._workers if w.task]
            self._pending.clear()
        for worker in self._workers:
            worker.task = None
        for future in waiting:
            if not future.done():
                future.set_exception(RuntimeError(reason))
        self._closed = True


def response_text(tokenizer, response_ids: list[int]) -> str:
    """What the reward reads: the response as the model wrote it, up to the end-of-sequence
    token that ended it (not shown). Other special tokens stay in the text: a model that pads
    its answer with them has not answered cleanly, and must not be rewarded as if it had."""
    if response_ids and response_ids[-1] == tokenizer.eos_token_id:
        response_ids = response_ids[:-1]
    return tokenizer.decode(response_ids, skip_special_tokens=False)


def _worker_main(conn, spec: RewardSpec, tokenizer_dir: str) -> None:
    import signal

    from dppo_megatron.processes import die_with_parent

    die_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # the trainer decides when the pool stops
        signal.signal(sig, signal.SIG_IGN)
    try:
        from transformers import AutoTokenizer

        from dppo_megatron.rewards import reward_function

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        reward = reward_function(spec)
    except Exception as error:  # noqa: BLE001 - reported to the pool, which fails the run with it
        conn.send(("broken", f"the reward ({spec.kind}) cannot be loaded: {type(error).__name__}: {error}"))
        return
    conn.send(("ready",))
    while True:
        task = conn.recv()
        if task is None:
            return
        task_id, response_ids, answer = task
        try:
            text = response_text(tokenizer, response_ids)
            value = float(reward(text, answer))
            if not math.isfinite(value):
                raise ValueError(f"the reward is {value}")
            conn.send(("scored", task_id, value, ""))
        except Exception as error:  # noqa: BLE001 - a reward that raises scores 0, and is counted
            conn.send(("scored", task_id, 0.0, f"{type(error).__name__}: {error}"))
