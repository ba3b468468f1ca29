"""After each step, the learner's weights to the rollout servers: from disk (every rank writes
its part of a Hugging Face checkpoint, rank 0 tells the servers to load it), by broadcast
(every rank that owns tensors sends them through its own weight-update group) or, for colocated
servers, by handle (each rank that a server TP rank shares a GPU with hands it every bucket; on
a CPU, rank 0 hands them to all). A collective: every learner rank publishes.

Rank 0 owns the servers (run/server_keeper.py): a publish owns every server for its length, a
restart at the rollout client's call (`restart`) owns its one server, so the two never overlap.
A server found dead when the weights go out is restarted first and gets them with the others,
by either method; a server killed during a broadcast breaks its groups: the senders form them
again (the restarted and the stuck servers started again) and send the version again. After a
publish every server holds the new version, or the run stops (ServersLost). A server restarted
at the client's call loads the current weights at once from disk; by broadcast it cannot (a
group is formed by every learner rank that sends, and they are busy training), so it waits out
of the rollouts until the next publish, which forms the groups again with it."""

from __future__ import annotations

import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
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
    TensorWeightSync,
    begin_weight_update,
    begin_weight_update_each,
    end_weight_update,
    refusals,
    said,
)
from dppo_megatron.rollout.tensor_handles import BucketMemory, bucket_payload, in_buckets, shared_bucket
from dppo_megatron.run.server_keeper import RESTART_ATTEMPTS, ServerKeeper, ServersLost

log = logging.getLogger(__name__)

CLOSE_GRACE_SECONDS = 30.0  # for the servers to leave the weight-update groups at the end of a run


class WeightPublisher:
    def __init__(self, learner: Learner, arch: Qwen3Arch, urls: list[str], *, method: str, weights_dir: Path,
                 hf_config: dict, side_files_from: Path, server_tp: int, servers: Servers | None = None,
                 control_key: str | None = None, tensor_ranks: list[list[int]] | None = None):
        """`method`: disk | distributed | tensor. `tensor_ranks` (tensor): for each server, the
        learner ranks whose GPUs its TP ranks share, in TP order. `servers` (rank 0): to restart servers that are dead or
        fail to load a version, and to bring restarted ones up to date (None: a dead server fails
        the publish). `control_key`: the key of the servers' weight-update endpoints (keys.py)."""
        self.learner, self.arch, self.urls, self.hf_config = learner, arch, urls, hf_config
        self.control_key = control_key
        self.side_files_from = side_files_from
        self.keeper = ServerKeeper(servers) if servers is not None else None
        self.version = 0  # what the servers hold: 0 is the initial model they start from
        self.written: int | None = None  # the last version written to disk
        self.disk = DiskWeightSync(weights_dir, key=control_key) if method == "disk" else None
        self.tensors = TensorWeightSync(urls, key=control_key) if method == "tensor" else None
        self.bucket_memory = BucketMemory()  # tensor: where this rank makes its buckets
        self.tensor_ranks = dict(zip(urls, tensor_ranks or []))
        self.distributed, self.senders, self.server_tp = None, [], server_tp
        # Distributed: the servers in the weight-update groups, and how often the groups were
        # formed (each formation has group names of its own). Rank 0: each member's restart
        # count when they were formed (a restart since: its groups died with it), and the servers
        # restarted at the client's call that wait for the next publish to serve again.
        self.members, self.formation = list(urls), 0
        self._formed_at: dict[str, int] = {}
        self._waiting: set[str] = set()
        self._unclosed: set[str] = set()  # the members that did not close the last session (stuck on it)
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
        the servers must be done generating. Rank 0 owns every server meanwhile. Raises
        ServersLost (on every rank) where a server could not be brought back to take it."""
        with self.keeper.owning(self.urls) if self.keeper is not None else nullcontext():
            if self.disk is not None:
                self.write(version)
                self._load_from_disk(version)
            elif self.tensors is not None:
                self._hand_over(version)
            else:
                self._broadcast(version)
            if self.keeper is not None:
                self.keeper.holds.update(dict.fromkeys(self.urls, version))
            self.version = version  # inside: a restart waiting for its server reads the new version
        dist.barrier()

    def _load_from_disk(self, version: int) -> None:
        """Rank 0 has the servers load `version`, restarting the dead ones first and those that
        fail it then; every rank hears how it went."""
        failure = [None]
        if dist.get_rank() == 0:
            try:
                self._load_on_rank0(version)
            except WeightSyncError as error:
                failure[0] = (isinstance(error, ServersLost), str(error))
        dist.broadcast_object_list(failure, src=0)
        if failure[0]:
            lost, message = failure[0]
            raise (ServersLost if lost else WeightSyncError)(message)

    def _load_on_rank0(self, version: int) -> None:
        loading = list(self.urls)
        for _ in range(RESTART_ATTEMPTS):
            if self.keeper is not None:
                self.keeper.revive(loading)
            failed = self.disk.load(loading, version)
            if not failed:
                self.disk.drop_older(version)
                return
            why = said(failed)
            if self.keeper is None:
                raise WeightSyncError(f"weight version {version} from {self.disk.version_dir(version)}: {why}")
            log.warning("weight version %d did not load (%s); restarting the servers that are down and loading "
                        "it again", version, why)
            loading = list(failed)
        raise ServersLost(f"weight version {version} did not load in {RESTART_ATTEMPTS} attempts: {why}")

    def _hand_over(self, version: int) -> None:
        """The servers take `version` by handle, each inside a session of its own. A server that
        did not (it died, or is unreachable) is restarted and gets the whole version again, so
        none serves a mix of versions; one that answered a refusal fails the publish (it would
        refuse again)."""
        targets = list(self.urls)
        for _ in range(RESTART_ATTEMPTS):
            failed, restarts = self._hand_over_once(targets, version)
            if not failed:
                return
            refused = refusals(failed)
            if refused or not restarts:
                raise WeightSyncError(f"weight version {version} by handle: {said(refused or failed)}")
            if dist.get_rank() == 0:
                log.warning("weight version %d did not reach %s; restarting them and sending it again",
                            version, said(failed))
            targets = list(failed)
        raise ServersLost(f"weight version {version} did not reach the servers in {RESTART_ATTEMPTS} attempts: "
                          f"{said(failed)}")

    def _hand_over_once(self, targets: list[str], version: int) -> tuple[dict[str, str], bool]:
        """One attempt (a collective): rank 0 brings the dead targets back and opens their
        sessions, every rank runs through the tensors, rank 0 posts each bucket's payloads,
        then closes the sessions. Returns, the same on every rank, the targets that failed
        (with why) and whether rank 0 can restart servers (it holds their keeper)."""
        failed: dict[str, str] = {}
        lost = [None]
        if dist.get_rank() == 0:
            try:
                if self.keeper is not None:
                    self.keeper.revive(targets)
                failed.update(begin_weight_update_each(targets, self.tensors.timeout, key=self.control_key))
            except ServersLost as error:  # the dead could not be brought back: every rank stops
                lost[0] = str(error)
        dist.broadcast_object_list(lost, src=0)
        if lost[0]:
            raise ServersLost(lost[0])
        feeders = {url: self.tensor_ranks[url] for url in targets}
        everywhere = any(rank != 0 for ranks in feeders.values() for rank in ranks)
        named = iter_hf_tensors(self.learner.module, self.arch, everywhere=everywhere)
        for bucket in in_buckets(named, self.tensors.bucket_bytes):
            live = {url: ranks for url, ranks in feeders.items() if url not in failed or everywhere}
            flat, metadata = shared_bucket(bucket, self.bucket_memory)
            # One payload per receiving TP rank: each opens its own and lets it go.
            mine = [bucket_payload(flat, metadata) for _ in _slots(live, dist.get_rank())]
            payloads = [None] * dist.get_world_size() if everywhere else [mine]
            if everywhere:
                dist.all_gather_object(payloads, mine)
            if dist.get_rank() == 0:
                made = {rank: iter(payloads[rank] or []) for rank in range(len(payloads))}
                bodies = {url: [next(made[rank]) for rank in ranks] for url, ranks in live.items()}
                failed.update(self.tensors.send({url: body for url, body in bodies.items() if url not in failed},
                                                version))
            if everywhere:
                dist.barrier()  # each rank keeps its bucket until the servers have copied it
            del flat, bucket
        if dist.get_rank() == 0:  # every session closed that can be (a refusing server's too), the first failure kept
            answering = [url for url in targets if not failed.get(url, "").startswith("unreachable")]
            for url, why in end_weight_update(answering, self.tensors.timeout, key=self.control_key).items():
                failed.setdefault(url, why)
        answer = [(failed, self.keeper is not None)]
        dist.broadcast_object_list(answer, src=0)
        return answer[0]

    def _broadcast(self, version: int, attempts: int = 3) -> None:
        """Every sender sends `version` through its group, inside one weight-update session on
        every member server (rank 0 opens it before the first sender's turn and closes it after
        the last). A server that dies meanwhile breaks the groups it is in: rank 0 restarts it
        (and those stuck on the broken broadcast), the senders form the groups again and send the
        whole version again."""
        regroup = False
        for _ in range(attempts):
            self._regroup(force=regroup)
            errors = self._send_in_session(version)
            if not errors:
                return
            if all(refused for _, refused in errors):  # every server that failed said no: it would again
                raise WeightSyncError(f"weight version {version} was refused: {errors[0][0]}")
            if dist.get_rank() == 0:
                log.warning("sending weight version %d failed (%s); forming the groups again and sending it again",
                            version, errors[0][0])
            regroup = True
        raise ServersLost(f"weight version {version} could not be sent in {attempts} attempts: {errors[0][0]}")

    def _send_in_session(self, version: int) -> list[tuple[str, bool]]:
        """One attempt at sending `version` (a collective): rank 0 opens the session on the
        members, every sender sends, rank 0 closes it, also after a failure, on every member that
        answers within a few seconds (the others wait on the broken broadcast and are restarted
        when the groups are formed again: `_unclosed`). Returns what went wrong, and whether a server refused
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
            self._unclosed = set(not_closed)
            if not_closed and not errors:
                closed[0] = (f"closing the weight-update session of version {version}: {said(not_closed)}", False)
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
        current weights. Waits while a publish owns the servers; a server restarted since the
        call (by that publish) and healthy is not restarted again. From disk it loads the current
        weights now. By broadcast it gets them at the next publish, and until then raises
        ServerRejoinsLater (the client keeps it out of this batch and asks again with the next,
        when this returns at once)."""
        keeper = self.keeper
        asked = keeper.restarts[url]
        with keeper.owning([url]):
            back = keeper.restarts[url] > asked or url in self._waiting  # restarted since it failed
            if not (back and keeper.servers.healthy(url)):
                self._waiting.discard(url)
                keeper.restart(url)
            if keeper.holds[url] == self.version:
                self._waiting.discard(url)
                return
            if self.disk is not None:
                failed = self.disk.load([url], self.version)
                if failed:
                    raise WeightSyncError(f"{url} restarted, but did not load weight version {self.version}: "
                                          f"{failed[url]}")
                keeper.holds[url] = self.version
                return
            self._waiting.add(url)
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
        if self.keeper is not None:
            self._formed_at = {url: self.keeper.restarts[url] for url in self.members}

    def _regroup(self, force: bool = False) -> None:
        """Before a broadcast (a collective): where a member server died or was restarted (or,
        with `force`, after a failed broadcast), every sender leaves its group (the servers that
        still hold it leave too) and forms a new one with the servers, all of them alive now
        (rank 0 restarts the dead ones first)."""
        change = [None]
        if dist.get_rank() == 0:
            try:
                change[0] = self._membership_change(force)
            except ServersLost as error:
                change[0] = {"error": str(error), "lost": True}
            except Exception as error:  # noqa: BLE001 - every rank must hear of it, not wait for rank 0
                change[0] = {"error": f"checking the servers before weight version {self.version + 1}: "
                                      f"{type(error).__name__}: {error}"}
        dist.broadcast_object_list(change, src=0)
        if change[0] is None:
            return
        if "error" in change[0]:
            raise (ServersLost if change[0].get("lost") else WeightSyncError)(change[0]["error"])

        def leave() -> None:
            try:
                self.distributed.close(change[0]["holding"])
            except WeightSyncError as error:  # one that died just now: it holds nothing any more either
                log.warning("leaving the weight-update group: %s", error)

        self._in_turns(leave)
        self.members, self.formation = change[0]["members"], self.formation + 1
        self._form_groups()

    def _membership_change(self, force: bool) -> dict | None:
        """Rank 0, owning every server: the new members and the old members that still hold
        their groups; None when nothing changed (and nothing `force`s a new formation). With a
        keeper the dead servers are restarted first, so every server is a member."""
        if self.keeper is not None:
            self.keeper.revive(self.urls)
            if force:  # after a failed broadcast the servers that did not close its session wait on it
                stuck = [url for url in self.members if self._holds_groups(url) and url in self._unclosed]
                if stuck:
                    log.warning("restarting %s: they wait on the failed broadcast", ", ".join(stuck))
                    self.keeper.restart_all(stuck)
            members = list(self.urls)
        else:
            with ThreadPoolExecutor(max_workers=min(32, len(self.urls))) as pool:
                alive = dict(zip(self.urls, pool.map(is_healthy, self.urls)))
            members = [url for url in self.urls if alive[url]]
            if not members:
                return {"error": "no rollout server is alive to take the new weights: " + ", ".join(self.urls)}
            if force and (stuck := [url for url in self.members if alive[url] and url in self._unclosed]):
                return {"error": f"{', '.join(stuck)} wait on a failed broadcast, and this publisher cannot "
                                 "restart servers"}
        holding = [url for url in self.members if url in members and self._holds_groups(url)]
        if members == self.members == holding:
            return None
        joined = [url for url in members if url not in holding]
        left = [url for url in self.members if url not in members]
        log.warning("weight-update groups formed again: %s left, %s joined", ", ".join(left) or "none",
                    ", ".join(joined) or "none")
        return {"members": members, "holding": holding}

    def _holds_groups(self, url: str) -> bool:
        """Rank 0: whether a member still holds the groups it joined (it was not restarted since)."""
        return self.keeper is None or self.keeper.restarts[url] == self._formed_at.get(url)

    def _in_turns(self, action) -> None:
        """Each sending rank runs `action` in turn (a collective). A server takes one weight-group
        call at a time (SGLang's scheduler, and an exclusive lock around updates): two senders
        whose calls two servers took in opposite orders would wait for each other forever."""
        for sender in self.senders:
            if dist.get_rank() == sender:
                action()
            dist.barrier()

    def close(self) -> None:
        self.bucket_memory = BucketMemory()  # the shared segment goes
        if self.distributed is not None:
            try:  # the run is over: a server that does not answer soon is stopped anyway
                self.distributed.close(timeout=CLOSE_GRACE_SECONDS)
            except WeightSyncError as error:  # a server that died since the last step: the run is done anyway
                log.warning("leaving the weight-update group: %s", error)


def _slots(feeders: dict[str, list[int]], rank: int) -> list[tuple[str, int]]:
    """The (server, TP rank) slots that `rank` hands the weights to, in the servers' order."""
    return [(url, slot) for url, ranks in feeders.items() for slot, feeder in enumerate(ranks) if feeder == rank]


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
