"""After each step, the learner's weights to the rollout servers: from disk (every rank writes
its part of a Hugging Face checkpoint, rank 0 tells the servers to load it) or by broadcast
(every rank that owns tensors sends them through its own weight-update group). A collective:
every learner rank publishes."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from dppo_megatron.learner.learner import Learner
from dppo_megatron.learner.weights import iter_hf_tensors, save_hf, sends_weights
from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.processes import free_port
from dppo_megatron.rollout.job_layout import LOOPBACK
from dppo_megatron.rollout.servers import Servers
from dppo_megatron.rollout.weight_sync import DiskWeightSync, DistributedWeightSync, WeightSyncError

log = logging.getLogger(__name__)


class WeightPublisher:
    def __init__(self, learner: Learner, arch: Qwen3Arch, urls: list[str], *, method: str, weights_dir: Path,
                 hf_config: dict, side_files_from: Path, server_tp: int, servers: Servers | None = None):
        """`method`: disk | distributed. `servers` (rank 0): to restart servers that fail to load
        a version, and to bring restarted ones up to date."""
        self.learner, self.arch, self.urls, self.hf_config = learner, arch, urls, hf_config
        self.side_files_from = side_files_from
        self.servers = servers
        self.version = 0  # what the servers hold: 0 is the initial model they start from
        self.written: int | None = None  # the last version written to disk
        self.disk = DiskWeightSync(weights_dir) if method == "disk" else None
        self.distributed, self.senders = None, []
        if method == "distributed":
            sends = sends_weights(arch)
            sending = [None] * dist.get_world_size()
            dist.all_gather_object(sending, sends)
            self.senders = [rank for rank, sender in enumerate(sending) if sender]
            if sends:
                self.distributed = DistributedWeightSync(
                    urls, master_address=_address_for(urls), master_port=free_port(),
                    group_name=f"dppo-weights-r{dist.get_rank()}",
                    backend="nccl" if torch.cuda.is_available() else "gloo", server_tp=[server_tp] * len(urls))
            self._in_turns(lambda: self.distributed.connect())

    def write(self, version: int) -> None:
        """Disk: every rank writes its part of `version` (a collective). The servers may still be
        generating with the weights they hold: they load it only in `publish`."""
        if self.disk is not None and self.written != version:
            save_hf(self.learner.module, self.arch, self.disk.version_dir(version), config=self.hf_config,
                    dtype=self.learner.module.config.params_dtype, side_files_from=self.side_files_from)
            self.written = version

    def publish(self, version: int) -> None:
        """The servers take `version` (written first if `write` was not called). A collective;
        the servers must be done generating."""
        if self.disk is not None:
            self.write(version)
            if dist.get_rank() == 0:
                try:
                    self.disk.publish(self.urls, version)
                except WeightSyncError as error:
                    if self.servers is None:
                        raise
                    log.warning("%s; restarting the servers that failed and loading again", error)
                    for url in self.urls:
                        if not self.servers.healthy(url):
                            self.servers.restart(url)
                    self.disk.publish(self.urls, version)
        else:
            tensors = iter_hf_tensors(self.learner.module, self.arch, experts_from_owners=True)
            if len(self.senders) == 1:  # streamed, bucket by bucket, as the iterator makes them
                if self.distributed is not None:
                    self.distributed.publish(tensors, version)
                else:
                    for _ in tensors:  # the iterator is a collective: every rank runs it through
                        pass
            else:  # each sender keeps what it sends (owned experts are views) until its turn
                mine = list(tensors)
                self._in_turns(lambda: self.distributed.publish(mine, version))
                del mine
        dist.barrier()
        self.version = version

    def _in_turns(self, action) -> None:
        """Each sending rank runs `action` in turn (a collective). A server takes one weight-group
        call at a time (SGLang's scheduler, and an exclusive lock around updates): two senders
        whose calls two servers took in opposite orders would wait for each other forever."""
        for sender in self.senders:
            if dist.get_rank() == sender:
                action()
            dist.barrier()

    def bring_up_to_date(self, url: str) -> None:
        """Rank 0, after a server was restarted (it starts from the initial model): give it the
        current weights before it serves again."""
        if self.version == 0:
            return
        if self.disk is None:
            raise WeightSyncError(
                f"{url} was restarted, and a server cannot rejoin the distributed weight-update group in the middle "
                "of a run: stopping; the run resumes from its last checkpoint (or use rollout.weight_sync: disk)")
        self.disk.publish([url], self.version)

    def close(self) -> None:
        if self.distributed is not None:
            self.distributed.close()


def _address_for(urls: list[str]) -> str:
    """The address of this rank's host as the servers reach it: a sending rank hosts the store
    of its own weight-update group, on whichever node it runs. That is the local address of the
    route to a server (a UDP connect sends nothing), not the host's name: on many machines the
    name resolves to 127.0.1.1 (Debian's /etc/hosts), which a server on another node would take
    for itself, and wait there for a store that never answers."""
    remote = [urlparse(url) for url in urls if urlparse(url).hostname not in LOOPBACK]
    if not remote:
        return "127.0.0.1"
    family, kind, _, _, address = socket.getaddrinfo(remote[0].hostname, remote[0].port or 80,
                                                     type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind) as probe:
        probe.connect(address)
        return probe.getsockname()[0]
