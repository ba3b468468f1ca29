"""Rank 0's rollouts in a process of their own.

The client's parsing, the packing of each response and the reward pool's traffic are Python
work that grows with the batch (thousands of responses a step at the recipes' shapes). In
rank 0's learner process they would hold its interpreter lock while the learner trains (with
`trainer.max_staleness` the next batch is made during the step), and every rank waits for
rank 0 at the next collective. So `Rollouts` runs in a child process, and rank 0 gets each
response's compact block through a pipe as it arrives (nothing left to copy after the last
one), then the advantages and metrics.

The child asks rank 0 to restart a server that died (rank 0 owns the servers and the
weights); it ignores the stop signals (rank 0 decides when the run stops) and dies with it.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import queue
import signal
import threading
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from dppo_megatron.config.schema import Recipe
from dppo_megatron.learner.batches import TrainSample, unpack_sample
from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.rollout.client import NoServerLeft, ServerRejoinsLater
from dppo_megatron.run.rollouts import Rollouts

log = logging.getLogger(__name__)


class RolloutProcessError(RuntimeError):
    """The rollout process died, or failed in a way that cannot be passed on as it was."""


def run_rollouts(recipe: Recipe, run_dir: Path, arch: Qwen3Arch, urls: list[str]) -> Callable[..., object]:
    """What the child makes: the run's `Rollouts` (a picklable recipe for it)."""
    return partial(Rollouts, recipe, run_dir, arch, urls)


class RolloutProcess:
    def __init__(self, make_rollouts: Callable[..., object], restart: Callable[[str], None] | None = None):
        """Start the child and wait until `make_rollouts(restart=...)` made its rollouts there (a
        `Rollouts`: the datasets, tokenizer and reward pool loaded; their errors are raised
        here). It must pickle (`run_rollouts`). `restart(url)`: rank 0's call for a server that
        died (None: the run fails instead)."""
        context = multiprocessing.get_context("spawn")  # never fork a process with torch threads
        self._events, child_events = context.Pipe(duplex=False)
        child_commands, self._commands = context.Pipe(duplex=False)
        self._restart = restart
        self._send_lock, self._call_lock = threading.Lock(), threading.Lock()
        # Not a daemon: it starts the reward pool's workers. It dies with rank 0 (die_with_parent).
        self._process = context.Process(target=_child_main, name="rollouts",
                                        args=(make_rollouts, restart is not None, child_commands, child_events))
        self._process.start()
        child_events.close()
        child_commands.close()
        self._wait_result(blocks=None)

    def step(self, step: int, version: int) -> tuple[list[TrainSample], dict[str, float]]:
        """The step's samples kept for training (with their advantages), and its metrics."""
        with self._call_lock:
            blocks: dict[int, np.ndarray] = {}
            self._send(("step", step, version))
            kept, metrics = self._wait_result(blocks)
        return [unpack_sample(blocks[index], advantage) for index, advantage in kept], metrics

    def evaluate(self) -> dict[str, float]:
        with self._call_lock:
            self._send(("evaluate",))
            return self._wait_result(blocks=None)

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._send(("close",))
            except OSError:
                pass
            self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._commands.send(message)

    def _wait_result(self, blocks: dict[int, np.ndarray] | None):
        """Read the child's events until its answer: blocks as they arrive, restart requests
        (served on a thread of their own, so that the blocks keep flowing)."""
        while True:
            try:
                event = self._events.recv()
                if event[0] == "block":
                    _, index, size = event
                    block = bytearray(size)  # writable: the learner's tensors are views of it
                    self._events.recv_bytes_into(block)
                    blocks[index] = np.frombuffer(block, dtype=np.uint8)
                    continue
            except (EOFError, OSError):
                self._process.join(timeout=5)
                raise RolloutProcessError(f"the rollout process died (exit code {self._process.exitcode}); "
                                          "see the log above for its last words") from None
            if event[0] == "restart":
                threading.Thread(target=self._serve_restart, args=(event[1],), name="restart", daemon=True).start()
            elif event[0] == "result":
                return event[1]
            elif event[0] == "error":
                _, pickled, message, formatted = event
                try:
                    error = pickle.loads(pickled)
                except Exception:  # noqa: BLE001 - an error that cannot be rebuilt here goes as its text
                    error = RolloutProcessError(message)
                if not isinstance(error, NoServerLeft):  # that one the loop handles: its message says it all
                    log.error("the rollout process failed:\n%s", formatted)
                raise error

    def _serve_restart(self, url: str) -> None:
        try:
            self._restart(url)
            answer = None
        except ServerRejoinsLater as later:
            answer = ("later", str(later))
        except Exception as error:  # noqa: BLE001 - the child's client reports it and goes on without the server
            answer = ("failed", f"{type(error).__name__}: {error}")
        try:
            self._send(("restarted", url, answer))
        except OSError:
            pass  # the child is gone; the call waiting for it says so


# --- the child ---------------------------------------------------------------------------------

def _child_main(make_rollouts: Callable[..., object], can_restart: bool, commands, events) -> None:
    from dppo_megatron.processes import die_with_parent

    die_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # the trainer decides when rollouts stop
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    child = _Child(commands, events)
    threading.Thread(target=child.read_commands, name="commands", daemon=True).start()
    try:
        rollouts = make_rollouts(restart=child.restart if can_restart else None)
    except BaseException as error:  # noqa: BLE001 - passed on to rank 0, which fails the run with it
        child.send_error(error)
        return
    child.send(("result", None))
    try:
        while True:
            command = child.work.get()
            try:
                if command[0] == "close":
                    return
                if command[0] == "step":
                    _, step, version = command
                    child.send(("result", rollouts.step(step, version, child.send_block)))
                elif command[0] == "evaluate":
                    child.send(("result", rollouts.evaluate()))
            except Exception as error:  # noqa: BLE001 - passed on; rank 0 decides
                child.send_error(error)
    finally:
        rollouts.close()


class _Child:
    def __init__(self, commands, events):
        self.commands, self.events = commands, events
        self.work: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._restarts: dict[str, tuple[threading.Event, list]] = {}

    def read_commands(self) -> None:
        """Commands go to the main loop; restart answers to the thread waiting for them."""
        while True:
            try:
                message = self.commands.recv()
            except (EOFError, OSError):
                self.work.put(("close",))  # rank 0 is gone
                return
            if message[0] == "restarted":
                _, url, answer = message
                done, box = self._restarts.pop(url)
                box.append(answer)
                done.set()
            else:
                self.work.put(message)

    def send(self, message: tuple) -> None:
        with self._lock:
            self.events.send(message)

    def send_block(self, index: int, sample: TrainSample) -> None:
        with self._lock:
            self.events.send(("block", index, sample.block.nbytes))
            self.events.send_bytes(sample.block)

    def send_error(self, error: BaseException) -> None:
        """The error as it was where it pickles (rank 0 raises it), and always as its text."""
        try:
            pickled = pickle.dumps(error)
        except Exception:  # noqa: BLE001
            pickled = b""
        self.send(("error", pickled, f"{type(error).__name__}: {error}", traceback.format_exc()))

    def restart(self, url: str) -> None:
        """The client's call for a dead server (on a thread of its own): rank 0 restarts it."""
        done, box = threading.Event(), []
        self._restarts[url] = (done, box)
        self.send(("restart", url))
        done.wait()
        if box[0] is not None:
            outcome, message = box[0]
            if outcome == "later":
                raise ServerRejoinsLater(message)
            raise RuntimeError(f"rank 0 could not restart {url}: {message}")
