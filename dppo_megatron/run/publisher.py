"""After each step, the learner's weights to the rollout servers: from disk (every rank writes
its part of a Hugging Face checkpoint, rank 0 tells the servers to load it) or by broadcast
(every rank that owns tensors sends them through its own weight-update group). A collective:
every learner rank publishes.

A server that dies is restarted when the rollout client asks (rank 0, `restart`). From disk it
loads the current weights at once. By broadcast it cannot: a group is formed by every learner
rank that sends, and they are busy training; so before each broadcast rank 0 checks the servers,
and when one died or was restarted, every sender forms its group again with the servers that
are alive, the restarted ones included, which then get the new weights with the others and take
requests from the next batch on."""

from __future__ import annotations

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from dppo_megatron.learner.learner import Learner
from dppo_megatron.learner.weights import iter_hf_tensors, save_hf, sends_weights
from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.processes import free_port
from dppo_megatron.rollout.client import ServerRejoinsLater
from dppo_megatron.rollout.job_layout import LOOPBACK
from dppo_megatron.rollout.servers import Servers, is_healthy
from dppo_megatron.rollout.weight_sync import (
    ANSWER_GRACE_SECONDS,
    DiskWeightSync,
    DistributedWeightSync,
    WeightSyncError,
    WeightUpdateRefused,
    begin_weight_update,
    end_weight_update,
)

log = logging.getLogger(__name__)


class WeightPublisher:
    def __init__(self, learner: Learner, arch: Qwen3Arch, urls: list[str], *, method: str, weights_dir: Path,
                 hf_config: dict, side_files_from: Path, server_tp: int, servers: Servers | None = None,
                 control_key: str | None = None):
        """`method`: disk | distributed. `servers` (rank 0): to restart servers that fail to load
        a version, and to bring restarted ones up to date. `control_key`: the key of the servers'
        weight-update endpoints (keys.py)."""
        self.learner, self.arch, self.urls, self.hf_config = learner, arch, urls, hf_config
        self.control_key = control_key
        self.side_files_from = side_files_from
        self.servers = servers
        self.version = 0  # what the servers hold: 0 is the initial model they start from
        self.written: int | None = None  # the last version written to disk
        self.disk = DiskWeightSync(weights_dir, key=control_key) if method == "disk" else None
        self.distributed, self.senders, self.server_tp = None, [], server_tp
        # Distributed: the servers in the weight-update groups, and how often the groups were
        # formed (each formation has group names of its own). Rank 0: the servers restarted since
        # the last broadcast (their groups died with them), and those that rejoined at it.
        self.members, self.formation = list(urls), 0
        self._restarting: set[str] = set()
        self._restarted: set[str] = set()
        self._rejoined: set[str] = set()
        self._lock = threading.Lock()  # for these three sets: the client's restarts run on threads
        if method == "distributed":
            sends = sends_weights(arch)
            sending = [None] * dist.get_world_size()
            dist.all_gather_object(sending, sends)
            self.senders = [rank for rank, sender in enumerate(sending) if sender]
            self._form_groups()

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
            self._broadcast(version)
        dist.barrier()
        self.version = version

    def _broadcast(self, version: int, attempts: int = 3) -> None:
        """Every sender sends `version` through its group, inside one weight-update session on
        every member server (rank 0 opens it before the first sender's turn and closes it after
        the last). A server that dies meanwhile breaks the groups it is in: the senders then
        form them again without it and send the whole version again."""
        regroup = False
        for _ in range(attempts):
            rejoining = self._regroup(force=regroup)
            errors = self._send_in_session(version)
            if not errors:
                with self._lock:
                    self._rejoined.update(rejoining)
                return
            if all(refused for _, refused in errors):  # every server that failed said no: it would again
                raise WeightSyncError(f"weight version {version} was refused: {errors[0][0]}")
            if dist.get_rank() == 0:
                log.warning("sending weight version %d failed (%s); forming the groups again and sending it again",
                            version, errors[0][0])
            regroup = True
        raise WeightSyncError(f"weight version {version} could not be sent in {attempts} attempts: {errors[0][0]}")

    def _send_in_session(self, version: int) -> list[tuple[str, bool]]:
        """One attempt at sending `version` (a collective): rank 0 opens the session on the
        members, every sender sends, rank 0 closes it, also after a failure, on every member that
        answers within a few seconds (the others wait on the broken broadcast and are restarted
        when the groups are formed again). Returns what went wrong, and whether a server refused
        it (rather than broke off), the same on every rank."""
        opened = [None]
        if dist.get_rank() == 0:
            try:
                begin_weight_update(self.members, self.distributed.timeout, key=self.control_key)
            except WeightSyncError as error:
                opened[0] = (str(error), False)
        dist.broadcast_object_list(opened, src=0)
        mine = (opened[0] if dist.get_rank() == 0 else None) if opened[0] else self._send(version)
        failed = [None] * dist.get_world_size()
        dist.all_gather_object(failed, mine)
        errors = [error for error in failed if error]
        closed = [None]
        if dist.get_rank() == 0:
            not_closed = end_weight_update(self.members, ANSWER_GRACE_SECONDS if errors else self.distributed.timeout,
                                           key=self.control_key)
            if not_closed and not errors:
                closed[0] = (f"closing the weight-update session of version {version}: " + "; ".join(not_closed),
                             False)
        dist.broadcast_object_list(closed, src=0)
        return errors or [error for error in closed if error]

    def _send(self, version: int) -> tuple[str, bool] | None:
        """This rank's part of a broadcast; returns what went wrong in its own sending, and
        whether a server refused it."""
        tensors = iter_hf_tensors(self.learner.module, self.arch, experts_from_owners=True)
        error = None

        def send(named_tensors) -> None:
            nonlocal error
            try:
                self.distributed.publish(named_tensors, version, session=False)  # rank 0 holds it
            except RuntimeError as failure:  # a server gone: gloo/NCCL errors, or its HTTP answer
                error = (f"rank {dist.get_rank()}: {failure}", isinstance(failure, WeightUpdateRefused))

        if len(self.senders) == 1:  # streamed, bucket by bucket, as the iterator makes them
            if self.distributed is not None:
                send(tensors)
            for _ in tensors:  # the iterator is a collective: every rank runs it through
                pass
        else:  # each sender keeps what it sends (owned experts are views) until its turn
            mine = list(tensors)
            self._in_turns(lambda: send(mine))
            del mine
        return error

    def restart(self, url: str) -> None:
        """Rank 0, the rollout client's call for a server that died: start it again, with the
        current weights. From disk it loads them now. By broadcast it rejoins the groups at the
        next publish, and until then raises ServerRejoinsLater (the client keeps it out of this
        batch and asks again with the next, when this returns at once). A restart can take
        minutes (SGLang loads the model): the check before a broadcast does not wait for it,
        it leaves the server out until it is back."""
        with self._lock:
            if url in self._rejoined:
                self._rejoined.discard(url)
                if is_healthy(url):  # restarted, and given the weights at the last publish
                    return
            if url in self._restarting or (url in self._restarted and is_healthy(url)):  # asked again
                raise ServerRejoinsLater("it rejoins at the next weight update")
            self._restarting.add(url)
        try:
            self.servers.restart(url)
        finally:
            with self._lock:
                self._restarting.discard(url)
        if self.disk is not None:
            if self.version:
                self.disk.publish([url], self.version)
            with self._lock:  # up to date: asked again (its batch ended before this returned), it is back
                self._rejoined.add(url)
            return
        with self._lock:
            self._restarted.add(url)
        if self.version:  # 0: it holds the initial weights, as the others do
            raise ServerRejoinsLater(f"it gets the weights of version {self.version + 1} with the other servers at "
                                     "the next weight update, and serves from the batch after it")

    def _form_groups(self) -> None:
        """Every sending rank forms its weight-update group with the member servers, in turns
        (a collective). Each picks its store's port in its turn: picked at once, two ranks of a
        node could both get the port the first then listens on."""
        def connect() -> None:
            self.distributed = DistributedWeightSync(
                self.members, master_address=_address_for(self.members), master_port=free_port(),
                group_name=f"dppo-weights-r{dist.get_rank()}-{self.formation}",
                backend="nccl" if torch.cuda.is_available() else "gloo", server_tp=[self.server_tp] * len(self.members),
                key=self.control_key)
            self.distributed.connect()

        self._in_turns(connect)

    def _regroup(self, force: bool = False) -> list[str]:
        """Before a broadcast (a collective): where a member server died or one was restarted
        (or, with `force`, after a failed broadcast), every sender leaves its group (the servers
        that still hold it leave too) and forms a new one with the servers that are alive.
        Returns the servers that rejoined after the client asked for their restart."""
        change = [None]
        if dist.get_rank() == 0:
            try:
                change[0] = self._membership_change(force)
            except Exception as error:  # noqa: BLE001 - every rank must hear of it, not wait for rank 0
                change[0] = {"error": f"checking the servers before weight version {self.version + 1}: "
                                      f"{type(error).__name__}: {error}"}
        dist.broadcast_object_list(change, src=0)
        if change[0] is None:
            return []
        if "error" in change[0]:
            raise WeightSyncError(change[0]["error"])

        def leave() -> None:
            try:
                self.distributed.close(change[0]["holding"])
            except WeightSyncError as error:  # one that died just now: it holds nothing any more either
                log.warning("leaving the weight-update group: %s", error)

        self._in_turns(leave)
        self.members, self.formation = change[0]["members"], self.formation + 1
        self._form_groups()
        return change[0]["rejoined"]

    def _membership_change(self, force: bool) -> dict | None:
        """Rank 0: the new members, the old members that still hold their groups, and the
        servers that join; None when nothing changed (and nothing `force`s a new formation)."""
        with self._lock:  # a server being restarted is not alive yet: it joins once it is back
            with ThreadPoolExecutor(max_workers=min(32, len(self.urls))) as pool:
                alive = dict(zip(self.urls, pool.map(is_healthy, self.urls)))
            alive.update({url: False for url in self._restarting})
            restarted, self._restarted = self._restarted, set()
        members = [url for url in self.urls if alive[url]]
        if members == self.members and not restarted and not force:
            return None
        if not members:
            return {"error": "no rollout server is alive to take the new weights: " + ", ".join(self.urls)}
        asked = set(restarted)  # restarted at the client's call: it asks again, and is told to go on
        if force:  # after a failed broadcast the servers of the broken groups wait on it: start them again
            stuck = [url for url in self.members if alive[url] and url not in restarted]
            if stuck and self.servers is None:
                return {"error": f"{', '.join(stuck)} wait on a failed broadcast, and this publisher cannot "
                                 "restart servers"}
            log.warning("restarting %s: they wait on the failed broadcast", ", ".join(stuck) or "no server")
            with ThreadPoolExecutor(max_workers=max(1, min(32, len(stuck)))) as pool:
                list(pool.map(self.servers.restart, stuck))
            restarted |= set(stuck)
        holding = [url for url in self.members if alive[url] and url not in restarted]
        joined = [url for url in members if url not in holding]
        left = [url for url in self.members if url not in members]
        log.warning("weight-update groups formed again: %s left, %s joined", ", ".join(left) or "none",
                    ", ".join(joined) or "none")
        return {"members": members, "holding": holding, "rejoined": [url for url in joined if url in asked]}

    def _in_turns(self, action) -> None:
        """Each sending rank runs `action` in turn (a collective). A server takes one weight-group
        call at a time (SGLang's scheduler, and an exclusive lock around updates): two senders
        whose calls two servers took in opposite orders would wait for each other forever."""
        for sender in self.senders:
            if dist.get_rank() == sender:
                action()
            dist.barrier()

    def close(self) -> None:
        if self.distributed is not None:
            try:
                self.distributed.close()
            except WeightSyncError as error:  # a server that died since the last step: the run is done anyway
                log.warning("leaving the weight-update group: %s", error)


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
