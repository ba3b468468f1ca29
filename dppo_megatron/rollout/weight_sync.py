"""Publishing new weights to rollout servers.

- Disk: the learner writes each version as a Hugging Face checkpoint (atomically, see
  `learner.weights.save_hf`) into `root/v000012/`; `DiskWeightSync.publish` tells every server
  to load it (SGLang's /update_weights_from_disk, with the version as weight_version) and
  removes versions older than the last `keep`. The directory must be visible to the servers.
- Tensor (colocated runs): `TensorWeightSync` hands each bucket over by handle
  (/update_weights_from_tensor, rollout/tensor_handles.py), inside the weight-update session;
  `release_memory` / `resume_memory` free and take back the servers' memory around the learner's
  turn on the GPUs.
- Distributed: `DistributedWeightSync` forms a process group with the servers
  (/init_weights_update_group; the sender is rank 0) and broadcasts tensors in HF names, in
  buckets, each announced by /update_weights_from_distributed, inside SGLang's weight-update
  session (`begin_weight_update` ... `end_weight_update`): SGLang 0.5.23's scheduler refuses a
  distributed or tensor update outside one. Disk updates need none.
"""

from __future__ import annotations

import datetime
import shutil
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from dppo_megatron.rollout.protocol import OUTSIDE_SESSION, SESSION_ALREADY_OPEN
from dppo_megatron.rollout.servers import post_json
from dppo_megatron.rollout.tensor_handles import LOAD_FORMAT, aligned_order, in_buckets

log = logging.getLogger(__name__)

ANSWER_GRACE_SECONDS = 5.0  # for the servers' answers after a broadcast failed on the sender's side


class WeightSyncError(RuntimeError):
    """A server failed to load a published version."""


class WeightUpdateRefused(WeightSyncError):
    """A server answered that it will not take an update (SGLang's words in the message), as
    opposed to a server that broke off: sending the same again changes nothing."""


class DiskWeightSync:
    def __init__(self, root: str | Path, *, keep: int = 2, timeout: float = 600.0, key: str | None = None):
        """`key`: the servers' control key (keys.py)."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.timeout = timeout
        self.key = key

    def version_dir(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def publish(self, servers: list[str], version: int) -> None:
        """Make every server load `version_dir(version)`; raises WeightSyncError naming each
        server that failed. Then drop old versions."""
        failed = self.load(servers, version)
        if failed:
            raise WeightSyncError(f"weight version {version} from {self.version_dir(version)}: {said(failed)}")
        self.drop_older(version)

    def load(self, servers: list[str], version: int) -> dict[str, str]:
        """Make every server load `version_dir(version)`, all at once; returns the servers that
        did not, with why."""
        path = self.version_dir(version)
        if not (path / "config.json").is_file():
            raise WeightSyncError(f"version {version} has not been written: no {path / 'config.json'}")
        return _failures(servers, _answers(servers, "/update_weights_from_disk",
                                           [self.update_body(version)] * len(servers), self.timeout, key=self.key))

    def update_body(self, version: int) -> dict:
        """The /update_weights_from_disk body that loads `version`."""
        return {"model_path": str(self.version_dir(version).resolve()), "weight_version": str(version),
                "flush_cache": True, "abort_all_requests": False}

    def drop_older(self, newest: int) -> None:
        """Remove the versions older than the `keep` newest up to `newest`."""
        versions = sorted(p for p in self.root.glob("v[0-9]*") if p.is_dir() and p.name[1:].isdigit())
        for path in versions:
            if int(path.name[1:]) <= newest - self.keep:
                shutil.rmtree(path, ignore_errors=True)


def weight_update_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
                        *, backend: str = "gloo", timeout: float = 600.0):
    """A process group of its own (not torch.distributed's default one) between a weight
    sender (rank 0, which hosts the store) and rollout server ranks, formed exactly as SGLang's
    receiver forms it (`sglang.srt.utils.common.init_custom_process_group`): a TCP rendezvous,
    the store wrapped in PrefixStore(group_name), then torch's own group constructor, which adds
    its f"{group_name}/" prefix. A group built any other way waits on other store keys than the
    server does, and both sides time out. The sender's default group must not be bound to a
    device (torch would then split the new group from it); the learner does not bind it."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    if backend not in ("gloo", "nccl"):
        raise ValueError(f"unknown backend {backend!r}; choose gloo or nccl")
    wait = datetime.timedelta(seconds=timeout)
    # The store SGLang's tcp:// rendezvous makes (rank 0 hosts it), made here directly: under
    # torchrun (TORCHELASTIC_USE_AGENT_STORE) torch's rendezvous would expect the launcher's
    # agent to host it, and nobody would.
    store = dist.TCPStore(master_address, master_port, world_size, rank == 0, timeout=wait, multi_tenant=True)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), PrefixStore(group_name, store),
                                         group_name=group_name, timeout=wait)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}  # as SGLang does: group rank = rank
    return group


def destroy_weight_update_group(group) -> None:
    """Leave a group made by `weight_update_group` (its name can then be used again)."""
    dist.destroy_process_group(group)


def flatten_bucket(bucket: list[tuple[str, torch.Tensor]]) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor]:
    """The bucket in SGLang's "flattened_bucket" layout (`FlattenedTensorBucket`): the tensors'
    bytes back to back in one uint8 tensor, in the returned order (wider dtypes first, so that
    every tensor starts at a multiple of its own size, which the receiver requires)."""
    ordered = aligned_order(bucket)
    return ordered, torch.cat([tensor.contiguous().reshape(-1).view(torch.uint8) for _, tensor in ordered])


def broadcast_from_first(group, tensor: torch.Tensor, refused: threading.Event | None = None) -> None:
    """Broadcast `tensor` from the sender. `refused`: set once a server answered that it will not
    receive (SGLang refuses an update outside a session, or for a group it does not hold,
    before it joins the broadcast): the sender then stops waiting at once, where it would
    otherwise wait for the group's timeout."""
    options = dist.BroadcastOptions()
    options.rootRank = 0
    work = group.broadcast([tensor], options)
    if refused is not None:
        while not work.is_completed():
            if refused.wait(0.002):
                raise WeightSyncError("a server refused the update; the broadcast was abandoned")
    work.wait()


def _post_to_all(servers: list[str], path: str, bodies: list[dict], timeout: float, *, work=None,
                 refused: threading.Event | None = None, context: str | None = None, key: str | None = None) -> None:
    """POST `bodies[i]` to `servers[i]`, all at once in threads, while `work` (say, the
    broadcasts the servers wait for) runs here; raise naming every server that failed
    (WeightUpdateRefused where each of them answered SGLang's refusal of an update outside a
    session, which comes before any receiving, however small the buckets)."""
    answers = _answers(servers, path, bodies, timeout, work=work, refused=refused, key=key)
    refusal = OUTSIDE_SESSION.format(path.strip("/"))
    failed = [answer for answer in answers if not answer.get("success", False)]
    said_no = bool(failed) and all(answer.get("message") == refusal for answer in failed)
    _raise_failures(servers, answers, path + " refused" if said_no else context or path + " failed",
                    WeightUpdateRefused if said_no else WeightSyncError)


def _answers(servers: list[str], path: str, bodies: list[dict], timeout: float, *, work=None,
             refused: threading.Event | None = None, key: str | None = None) -> list[dict]:
    """Each server's answer to its POST, made at once in threads while `work` runs here.
    `refused` is set as soon as one server answers with a failure."""
    answers: list[dict] = [{}] * len(servers)

    def call(index: int) -> None:
        answers[index] = post_json(servers[index].rstrip("/") + path, bodies[index], timeout, key=key)
        if refused is not None and not answers[index].get("success", False):
            refused.set()

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(len(servers))]
    for thread in threads:
        thread.start()
    try:
        if work is not None:
            work()
    except BaseException:
        # A broadcast that failed here leaves the servers waiting on it until their group's
        # timeout: their answers are not waited for (their threads end when the servers do).
        for thread in threads:
            thread.join(timeout=ANSWER_GRACE_SECONDS)
        if refused is not None and refused.is_set():  # the servers' own words say more
            failed = [(server, answer) for server, answer in zip(servers, answers)
                      if answer and not answer.get("success", False)]  # ({}: no answer yet)
            said_no = all(not answer.get("unreachable") for _, answer in failed)  # answered, not gone
            _raise_failures([server for server, _ in failed], [answer for _, answer in failed],
                            path + (" refused" if said_no else " failed"),
                            WeightUpdateRefused if said_no else WeightSyncError)
        raise
    for thread in threads:
        thread.join()
    return answers


def _raise_failures(servers: list[str], answers: list[dict], context: str,
                    error: type[WeightSyncError] = WeightSyncError) -> None:
    if failures := _failures(servers, answers):
        raise error(f"{context}: {said(failures)}")


def _failures(servers: list[str], answers: list[dict]) -> dict[str, str]:
    """The servers whose answer is not a success, with its message."""
    return {server: str(answer.get("message", answer)) for server, answer in zip(servers, answers)
            if not answer.get("success", False)}


def begin_weight_update(servers: list[str], timeout: float = 600.0, *, key: str | None = None) -> None:
    """Open SGLang's weight-update session on every server (`/begin_weight_update`, all of the
    server's model runners): distributed and tensor updates are refused outside one. A session
    left open on a reused server (a trainer that stopped mid-update) is ended first, and the
    weights it half loaded are overwritten by the version sent in this one."""
    if failures := begin_weight_update_each(servers, timeout, key=key):
        raise WeightSyncError(f"opening the weight-update session: {said(failures)}")


def begin_weight_update_each(servers: list[str], timeout: float = 600.0, *, key: str | None = None) -> dict[str, str]:
    """Open the session on every server that answers; returns those that did not, with why (one
    left open by a stopped trainer is ended and opened again)."""
    answers = _answers(servers, "/begin_weight_update", [{"selector": "all"}] * len(servers), timeout, key=key)
    stale = [server for server, answer in zip(servers, answers)
             if not answer.get("success") and answer.get("message") == SESSION_ALREADY_OPEN]
    if stale:
        log.warning("a weight-update session was left open on %s (by a trainer that stopped during an update): "
                    "ending it before this one", ", ".join(stale))
        end_weight_update(stale, timeout, key=key)
        again = dict(zip(stale, _answers(stale, "/begin_weight_update", [{"selector": "all"}] * len(stale), timeout,
                                         key=key)))
        answers = [again.get(server, answer) for server, answer in zip(servers, answers)]
    return _failures(servers, answers)


def end_weight_update(servers: list[str], timeout: float = 600.0, *, key: str | None = None) -> dict[str, str]:
    """Close the session on every server (`/end_weight_update`: SGLang finalises the loaded
    weights). Returns the servers that did not close it, with why (unreachable, busy past
    `timeout`: still waiting on a broken broadcast, or holding no session)."""
    return _failures(servers, _answers(servers, "/end_weight_update", [{}] * len(servers), timeout, key=key))


MEMORY_TAGS = ["weights", "kv_cache"]  # what colocated servers free for the learner (SGLang's tags)


def memory_body() -> dict:
    """The /release_memory_occupation and /resume_memory_occupation body."""
    return {"tags": list(MEMORY_TAGS)}


def release_memory(servers: list[str], timeout: float = 600.0, *, key: str | None = None) -> dict[str, str]:
    """Free the servers' weights and KV cache (/release_memory_occupation; they must be idle).
    Returns the servers that did not, with why."""
    return _failures(servers, _answers(servers, "/release_memory_occupation", [memory_body()] * len(servers),
                                       timeout, key=key))


def resume_memory(servers: list[str], timeout: float = 600.0, *, key: str | None = None) -> dict[str, str]:
    """Take the released memory back (/resume_memory_occupation): the weights come back empty,
    for the update that follows. Returns the servers that did not, with why."""
    return _failures(servers, _answers(servers, "/resume_memory_occupation", [memory_body()] * len(servers),
                                       timeout, key=key))


class TensorWeightSync:
    """Buckets handed to servers by handle: each server gets, per TP rank, the payload made where
    that rank runs (rollout/tensor_handles.py). Inside a session (`begin_weight_update`)."""

    def __init__(self, servers: list[str], *, bucket_bytes: int = 512 * 1024**2, timeout: float = 600.0,
                 key: str | None = None):
        self.servers, self.bucket_bytes, self.timeout, self.key = servers, bucket_bytes, timeout, key

    @staticmethod
    def update_body(payloads: list[str], version: int) -> dict:
        """The /update_weights_from_tensor body of one bucket: a payload per server TP rank."""
        return {"serialized_named_tensors": payloads, "load_format": LOAD_FORMAT, "flush_cache": True,
                "weight_version": str(version)}

    def send(self, payloads: dict[str, list[str]], version: int) -> dict[str, str]:
        """Post each server its payloads, all at once; returns the servers that failed, with why.
        The senders keep the bucket until this returns."""
        servers = [server for server in self.servers if server in payloads]
        bodies = [self.update_body(payloads[server], version) for server in servers]
        return _failures(servers, _answers(servers, "/update_weights_from_tensor", bodies, self.timeout, key=self.key))


def refusals(failures: dict[str, str]) -> dict[str, str]:
    """Of the failures, those of servers that answered (refused), not of unreachable ones."""
    return {server: why for server, why in failures.items() if not why.startswith("unreachable")}


def said(failures: dict[str, str]) -> str:
    """Each server's failure, in one line."""
    return "; ".join(f"{server}: {why}" for server, why in failures.items())


class DistributedWeightSync:
    """Broadcast weights to servers through a process group, the sender as rank 0. Each
    server takes `tp` ranks (its TP workers), from rank 1 on, in the order given."""

    def __init__(self, servers: list[str], *, master_address: str, master_port: int,
                 group_name: str = "dppo-weights", backend: str = "gloo", server_tp: list[int] | None = None,
                 bucket_bytes: int = 512 * 1024**2, timeout: float = 600.0, flattened: bool = True,
                 key: str | None = None):
        """`flattened`: one broadcast per bucket (SGLang's load_format "flattened_bucket"), not one
        per tensor. `key`: the servers' control key (keys.py)."""
        self.servers, self.key = servers, key
        self.master_address, self.master_port = master_address, master_port
        self.group_name, self.backend = group_name, backend
        self.server_tp = server_tp or [1] * len(servers)
        self.bucket_bytes, self.timeout, self.flattened = bucket_bytes, timeout, flattened
        self.group = None

    @property
    def world_size(self) -> int:
        """The sender and every server's TP ranks."""
        return 1 + sum(self.server_tp)

    def init_bodies(self) -> list[dict]:
        """The /init_weights_update_group body of each server."""
        offsets = [1 + sum(self.server_tp[:i]) for i in range(len(self.servers))]
        return [{"master_address": self.master_address, "master_port": self.master_port, "rank_offset": offset,
                 "world_size": self.world_size, "group_name": self.group_name, "backend": self.backend}
                for offset in offsets]

    def update_body(self, bucket: list[tuple[str, torch.Tensor]], version: int) -> dict:
        """The /update_weights_from_distributed body announcing `bucket` (in its send order)."""
        body = {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                "weight_version": str(version), "flush_cache": True}
        if self.flattened:
            body["load_format"] = "flattened_bucket"
        return body

    def destroy_body(self) -> dict:
        return {"group_name": self.group_name}

    def connect(self) -> None:
        def join() -> None:
            self.group = weight_update_group(self.master_address, self.master_port, 0, self.world_size,
                                             self.group_name, backend=self.backend, timeout=self.timeout)

        _post_to_all(self.servers, "/init_weights_update_group", self.init_bodies(), self.timeout, work=join,
                     key=self.key)

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, *,
                session: bool = True) -> int:
        """Send every (HF name, tensor), bucket by bucket. Returns the bytes sent. `session`:
        inside a weight-update session of its own on every server (begin, the buckets, end);
        False where the caller holds one around several senders' turns (run/publisher.py)."""
        if self.group is None:
            raise WeightSyncError("connect() first")
        if not session:
            return self._send_all(named_tensors, version)
        begin_weight_update(self.servers, self.timeout, key=self.key)
        try:
            sent = self._send_all(named_tensors, version)
        except BaseException:
            # The servers not stuck on the broadcast.
            end_weight_update(self.servers, ANSWER_GRACE_SECONDS, key=self.key)
            raise
        not_closed = end_weight_update(self.servers, self.timeout, key=self.key)
        if not_closed:
            raise WeightSyncError(f"closing the weight-update session of version {version}: {said(not_closed)}")
        return sent

    def _send_all(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        sent, self.sent_names = 0, []
        for bucket in in_buckets(named_tensors, self.bucket_bytes):
            self.sent_names += [name for name, _ in bucket]
            sent += self._send([(name, tensor.detach().contiguous()) for name, tensor in bucket], version)
        return sent

    def _send(self, bucket: list[tuple[str, torch.Tensor]], version: int) -> int:
        flat = None
        if self.flattened:
            bucket, flat = flatten_bucket(bucket)
        body = self.update_body(bucket, version)
        refused = threading.Event()

        def broadcast() -> None:
            for tensor in [flat] if flat is not None else [tensor for _, tensor in bucket]:
                broadcast_from_first(self.group, tensor, refused)

        _post_to_all(self.servers, "/update_weights_from_distributed", [body] * len(self.servers), self.timeout,
                     work=broadcast, refused=refused, key=self.key)
        return sum(t.numel() * t.element_size() for _, t in bucket)

    def close(self, servers: list[str] | None = None, timeout: float | None = None) -> None:
        """Leave the group, telling `servers` (default: all of them) to leave it too: a server
        that died or was restarted since no longer holds it. `timeout`: for their answers
        (default: the sync's own)."""
        if self.group is not None:
            told = self.servers if servers is None else servers
            try:
                _post_to_all(told, "/destroy_weights_update_group", [self.destroy_body()] * len(told),
                             self.timeout if timeout is None else timeout, key=self.key)
            finally:
                destroy_weight_update_group(self.group)
                self.group = None
