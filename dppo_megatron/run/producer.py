"""Rank 0: the rollouts of the coming steps, made ahead of the learner.

With `max_staleness` N the rollouts of step k + N are generated on a background thread while
the learner trains step k, with the weights the servers hold then (those of step k): step k
trains on samples of the weights of step k - N, and the loss stays anchored to the engine's
own logprobs of each sample. The schedule is fixed (a step's rollouts always come from the
same weights), so a run is deterministic; N = 0 is the synchronous loop. The weights change
only between generations: `wait_idle` before every publish. The batches already made but not
yet trained are saved with each checkpoint, so a resumed run neither repeats nor loses one.

A batch that could not be made because no server was left (NoServerLeft: dead, or restarted
and waiting for the weights under distributed sync) is missing: `take` raises it, and once
every rank brought the servers back with the weights (run/loop.py) `start` makes it anew, with
the weights the servers hold then (ahead of the schedule by the steps it was made ahead).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dppo_megatron.learner.batches import TrainSample, pack_share, unpack_share
from dppo_megatron.rollout.client import NoServerLeft
from dppo_megatron.run.rollout_process import RolloutProcess

Batch = tuple[list[TrainSample], dict[str, float]]
PENDING_DIR = "rollouts"  # inside a checkpoint: the batches generated for the steps after it


class RolloutProducer:
    def __init__(self, rollouts: RolloutProcess, pending: dict[int, Batch] | None = None):
        """`pending`: batches already made (from the checkpoint a run resumes from)."""
        self.rollouts = rollouts
        self.ready: dict[int, Batch] = dict(pending or {})
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts")
        self._in_flight: tuple[int, Future] | None = None
        self.missing: dict[int, NoServerLeft] = {}  # batches no server was left to make
        self._finished_at: float | None = None  # when the last background generation ended
        self.servers_waited = 0.0  # seconds the servers sat idle between two generations, since the last take

    def fill(self, steps: range, version: int) -> None:
        """Make the batches of `steps` that are not there yet, now (the start of a run)."""
        for step in steps:
            if step not in self.ready:
                self.ready[step] = self.rollouts.step(step, version)

    def start(self, step: int, version: int) -> None:
        """Generate the batch of `step` in the background with the servers' weights `version`."""
        if step in self.ready or (self._in_flight and self._in_flight[0] == step):
            return
        self.wait_idle()
        self.missing.pop(step, None)
        if self._finished_at is not None:
            self.servers_waited += time.monotonic() - self._finished_at
        future = self._executor.submit(self.rollouts.step, step, version)
        future.add_done_callback(lambda _: setattr(self, "_finished_at", time.monotonic()))
        self._in_flight = (step, future)

    def take(self, step: int) -> tuple[list[TrainSample], dict[str, float]]:
        """The batch of `step` (waiting for it if it is being made), with the waits in its metrics."""
        waited = 0.0
        if step not in self.ready and self._in_flight and self._in_flight[0] == step:
            waited = self.wait_idle()
        if step in self.missing:
            raise self.missing.pop(step)
        if step not in self.ready:
            raise RuntimeError(f"the rollouts of step {step} were never started")
        samples, metrics = self.ready.pop(step)
        metrics = dict(metrics, **{"time/learner_waited_for_rollouts": waited,
                                   "time/servers_waited_for_learner": self.servers_waited})
        self.servers_waited = 0.0
        return samples, metrics

    def wait_idle(self) -> float:
        """Wait for the generation in flight (before the weights change); its errors raise here,
        but for NoServerLeft (the batch is then missing). Returns the seconds waited."""
        if self._in_flight is None:
            return 0.0
        step, future = self._in_flight
        started = time.monotonic()
        try:
            self.ready[step] = future.result()
        except NoServerLeft as error:
            self.missing[step] = error
        finally:
            self._in_flight = None
        return time.monotonic() - started

    def pending(self) -> dict[int, Batch]:
        """The batches made and not yet trained (call when idle)."""
        return dict(self.ready)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def save_pending(directory: Path, pending: dict[int, Batch]) -> None:
    """One compact buffer per batch (the samples as `pack_share` lays them out) and its metrics."""
    directory.mkdir(parents=True, exist_ok=True)
    for step, (samples, metrics) in pending.items():
        np.save(directory / f"step_{step:08d}.npy", pack_share([[samples]]))
        (directory / f"step_{step:08d}.json").write_text(json.dumps(metrics))


def load_pending(directory: Path) -> dict[int, Batch]:
    pending = {}
    for path in sorted(directory.glob("step_*.npy")) if directory.is_dir() else []:
        step = int(path.stem.split("_")[1])
        share = unpack_share(np.load(path))
        pending[step] = (share[0][0] if share else [], json.loads(path.with_suffix(".json").read_text()))
    return pending
