"""Who holds the GPUs when: the run's placement, chosen once at build time, behind the two calls
the loop makes each step, between the rollout and the learner.

- `Disaggregated`: servers and learner on GPUs of their own. The learner trains as soon as it
  has its batch; afterwards the new weights are written while the servers may still generate
  batches made ahead (trainer.max_staleness), and reach them once they are idle.
- `Colocated`: the servers run on the learner's GPUs and take turns with it. After the rollout
  the servers release their weights and KV cache and the learner takes its optimizer state and
  gradient buffers back; after the step the learner hands those to host memory, the servers
  resume and take the new weights (by handle). A server that died while released, or dies during
  resume, is restarted by the publish and gets the new weights with the others before it
  generates again.
"""

from __future__ import annotations

import logging
import time

import torch.distributed as dist

from dppo_megatron.learner.learner import Learner
from dppo_megatron.rollout.weight_sync import WeightSyncError, refusals, release_memory, resume_memory, said
from dppo_megatron.run.producer import RolloutProducer
from dppo_megatron.run.publisher import WeightPublisher

log = logging.getLogger(__name__)


class Disaggregated:
    def __init__(self, learner: Learner):
        self.learner = learner
        self.publisher: WeightPublisher | None = None
        self.producer: RolloutProducer | None = None  # rank 0's

    def before_servers_start(self) -> None:
        """Before the servers start: nothing to hand over."""

    def start(self, publisher: WeightPublisher, producer: RolloutProducer | None) -> None:
        """The servers are up: how the weights reach them, and rank 0's batches."""
        self.publisher, self.producer = publisher, producer

    def to_learner(self, metrics: dict) -> None:
        """After the rollout: the learner has its GPUs already."""

    def to_servers(self, version: int, metrics: dict) -> None:
        """The new weights to the servers, once they are done with the batches made ahead (rank
        0 logs how long the learner waited for them). Raises ServersLost on every rank."""
        self.publisher.write(version)
        if self.producer is not None:
            metrics["time/learner_waited_for_rollouts"] += self.producer.wait_idle()
        self.publisher.publish(version)


class Colocated(Disaggregated):
    def __init__(self, learner: Learner, *, offload: bool):
        """`offload`: the learner's optimizer state and gradient buffers leave the GPUs while the
        servers hold them (learner.offload_while_generating)."""
        super().__init__(learner)
        self.offload = offload
        self.released: list[str] = []  # rank 0: the servers whose memory is released

    def before_servers_start(self) -> None:
        """The servers take their memory as they start, and generate first: the learner steps
        aside."""
        self._learner_steps_aside()

    def to_learner(self, metrics: dict) -> None:
        """The servers, idle, release their memory; the learner takes its own back."""
        started = time.monotonic()
        self._on_rank0(self._release)
        if self.offload:
            self.learner.restore()
        metrics["time/servers_released"] = time.monotonic() - started

    def to_servers(self, version: int, metrics: dict) -> None:
        """The learner steps aside, the servers take their memory back and the new weights."""
        started = time.monotonic()
        self._learner_steps_aside()
        self._on_rank0(self._resume)
        self.publisher.write(version)  # disk: written now; tensors go in the publish
        self.publisher.publish(version)
        metrics["time/servers_resumed"] = time.monotonic() - started

    def _learner_steps_aside(self) -> None:
        if self.offload:
            self.learner.offload()
        dist.barrier()  # every rank's memory is free before a server takes it

    def _release(self) -> None:
        """Rank 0, the batch done: every server releases. A dead one holds nothing (it is
        restarted at the publish); a live one that refuses would leave the learner no room."""
        self.producer.wait_idle()
        urls = self.publisher.urls
        with self.publisher.keeper.owning(urls):
            failed = release_memory(urls, key=self.publisher.control_key)
        refused = refusals(failed)
        if refused:
            raise WeightSyncError(f"servers did not release their memory for the learner: {said(refused)}")
        if failed:
            log.warning("%s: down while the learner trains; restarted with the next weights", said(failed))
        self.released = [url for url in urls if url not in failed]

    def _resume(self) -> None:
        """Rank 0: the released servers take their memory back. One that died meanwhile (or
        dies now) is left to the publish, which restarts it; a fresh server holds its memory."""
        with self.publisher.keeper.owning(self.released):
            failed = resume_memory(self.released, key=self.publisher.control_key)
        refused = refusals(failed)
        if refused:
            raise WeightSyncError(f"servers did not take their memory back: {said(refused)}")
        if failed:
            log.warning("%s: down at resume; restarted by the weight update", said(failed))
        self.released = []

    @staticmethod
    def _on_rank0(action) -> None:
        """Rank 0 runs `action`; its error is raised on every rank (a collective)."""
        failure = [None]
        if dist.get_rank() == 0:
            try:
                action()
            except WeightSyncError as error:
                failure[0] = str(error)
            except Exception as error:  # noqa: BLE001 - every rank must hear of it, not wait for rank 0
                failure[0] = f"{type(error).__name__}: {error}"
        dist.broadcast_object_list(failure, src=0)
        if failure[0]:
            raise WeightSyncError(failure[0])
