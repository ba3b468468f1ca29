"""Rank program: servers killed at every point of a weight publish, and restarts at the rollout
client's call racing a publish, with the run's WeightPublisher on 2 ranks at EP=2 (two senders)
and 2 embedded servers that rank 0 runs (a ServerManager, as in a run).

Each version is one more learner step, then a rollout through the run's RolloutClient (whose
restarts go to the publisher, as in a run) and the publish of the new weights, with one server
(the victim, each in turn) SIGKILLed at one point of it:
- mid-rollout: after the rollout's third sample;
- before the publish: between the rollout and the publish (the dead server is found there);
- during begin (distributed, tensor): just before the session opens on the servers;
- mid-broadcast (distributed): as rank 0 sends its first bucket, the servers receiving;
- during end (distributed, tensor): every bucket sent, before the session closes;
- during the load (disk): as its /update_weights_from_disk goes out;
- mid-update (tensor): as the first bucket's /update_weights_from_tensor goes out to it;
- restart first: the client's restart of the victim under way when the publish starts;
- publish first: the client asks for the victim's restart while the publish owns the servers.
Rank 0 writes, per version, what each server serves afterwards (its /model_info
weight_version), how often each was restarted, the rollout's samples (rid, weight version) and
the racing restart's outcome (publisher.json; the publisher's log with it), then one seeded
sample from each server after the last version (served-<i>.json), and every rank the final
weights to OUT_DIR/reference. Last, one more publish with a server that cannot be restarted
(lost-rank<r>.json: what it raised on each rank).

argv: OUT_DIR HF_DIR METHOD ROUNDS PORT PORT (0: a free port, picked as the case starts)"""

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learner_train import stepped_learner, toy_micro_batches
from weight_sync_cases import record_served

import dppo_megatron.rollout.weight_sync as weight_sync
import dppo_megatron.run.publisher as publisher_module
from dppo_megatron.learner.weights import save_hf
from dppo_megatron.processes import free_port
from dppo_megatron.rollout.client import ClientConfig, Request, RolloutClient, ServerRejoinsLater
from dppo_megatron.rollout.protocol import SamplingParams
from dppo_megatron.rollout.servers import ServerManager, ServerSpec
from dppo_megatron.run.publisher import WeightPublisher

POINTS = {
    "distributed": ["mid-rollout", "before the publish", "during begin", "mid-broadcast", "during end",
                    "restart first", "publish first"],
    "disk": ["mid-rollout", "before the publish", "during the load", "restart first", "publish first"],
    "tensor": ["mid-rollout", "before the publish", "during begin", "mid-update", "during end", "restart first",
               "publish first"],
}


def main(out_dir, hf_dir, method, rounds, *ports) -> None:
    from megatron.core import parallel_state as ps

    learner, arch = stepped_learner(hf_dir, "1", "2")
    batches = toy_micro_batches(hf_dir, arch, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    ports = [int(port) for port in ports]
    if 0 in ports:  # picked now, not when the case was planned minutes before (someone may have it by now)
        picked = [[free_port() if port == 0 else port for port in ports]]
        dist.broadcast_object_list(picked, src=0)
        ports = picked[0]
    specs = [ServerSpec(hf_dir, port, engine="embedded", routed_experts=True) for port in ports]
    urls = [spec.url for spec in specs]
    rank0 = dist.get_rank() == 0
    servers = ServerManager(specs, Path(out_dir) / "logs") if rank0 else None
    if servers is not None:
        servers.start()
    dist.barrier()
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    for name in ("dppo_megatron.run.publisher", "dppo_megatron.run.server_keeper"):
        logging.getLogger(name).addHandler(handler)
    publisher = WeightPublisher(learner, arch, urls, method=method, weights_dir=Path(out_dir) / "weights",
                                hf_config=config, side_files_from=Path(hf_dir), server_tp=1, servers=servers,
                                tensor_ranks=[[0]] * len(urls))  # tensor: rank 0's memory for both
    if publisher.tensors is not None:
        publisher.tensors.bucket_bytes = 64 * 1024  # several buckets: a kill can fall between them
    client = RolloutClient(urls, ClientConfig(request_timeout=60, max_in_flight_per_server=2, requests_per_call=1,
                                              topk_b64=True, backoff_seconds=0.05), restart=publisher.restart)
    cases = [(point, index % 2) for index, point in enumerate(POINTS[method] * int(rounds))]
    versions = []
    for version, (point, victim) in enumerate(cases, start=1):
        learner.train_step(batches)
        record = {"version": version, "point": point, "victim": urls[victim]}
        if rank0:
            record["samples"] = rollout(client, version, kill_after=3 if point == "mid-rollout" else None,
                                        kill=lambda: kill(servers, urls[victim]))
            if point == "before the publish":
                kill(servers, urls[victim])
        with killing_at(point, publisher, servers, urls[victim]) as race:
            publisher.publish(version)
        if rank0:
            record["race"] = race.outcome()
            record["serving"] = [weight_version(url) for url in urls]
            record["restarts"] = [servers.restarts[url] for url in urls]
            versions.append(record)
    save_hf(learner.module, arch, Path(out_dir) / "reference", config=config, dtype=torch.float32)
    if rank0:
        Path(out_dir, "publisher.json").write_text(json.dumps({"urls": urls, "versions": versions, "log": records}))
        record_served(out_dir, urls)
    lost_publish(publisher, servers, urls[0], len(cases) + 1, out_dir)
    publisher.close()
    if rank0:
        servers.stop()
    dist.barrier()


def lost_publish(publisher: WeightPublisher, servers: ServerManager | None, victim: str, version: int,
                 out_dir: str) -> None:
    """The victim killed and its port taken by a stranger: every restart fails. What the
    publish raised on this rank goes to OUT_DIR/lost-rank<r>.json."""
    with socket.socket() as stranger:
        if servers is not None:
            kill(servers, victim)
            stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            stranger.bind(("127.0.0.1", int(victim.rsplit(":", 1)[1])))
            stranger.listen()
        try:
            publisher.publish(version)
            raised = None
        except Exception as error:  # noqa: BLE001 - recorded for the test
            raised = [type(error).__name__, str(error)]
        Path(out_dir, f"lost-rank{dist.get_rank()}.json").write_text(json.dumps(raised))
        dist.barrier()


def rollout(client: RolloutClient, version: int, *, kill_after: int | None, kill) -> list[list]:
    """16 requests of the version's rollout; with `kill_after` N the victim dies once N
    samples are in. Each sample's rid and weight version."""
    requests = [Request(f"v{version}-r{i}", [5, 17, 42, 99 - i], SamplingParams(max_new_tokens=4, sampling_seed=i))
                for i in range(16)]
    arrived = []

    def on_sample(index, sample) -> None:
        arrived.append(index)
        if len(arrived) == kill_after:
            kill()

    return [[sample.rid, sample.weight_version] for sample in client.generate_sync(requests, on_sample)]


def kill(servers: ServerManager, url: str) -> None:
    process = servers.processes[url]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def weight_version(url: str) -> str:
    with urllib.request.urlopen(url + "/model_info", timeout=30) as response:
        return json.loads(response.read())["weight_version"]


class Race:
    """The client's restart of the victim on a thread of its own, as the rollout process asks
    for it; its outcome: None (back with the current weights) or what it raised."""

    def __init__(self, publisher: WeightPublisher, url: str):
        self.publisher, self.url, self.answer = publisher, url, "not asked"
        self.thread = threading.Thread(target=self._restart, daemon=True)

    def _restart(self) -> None:
        try:
            self.publisher.restart(self.url)
            self.answer = None
        except ServerRejoinsLater as later:
            self.answer = f"later: {later}"
        except Exception as error:  # noqa: BLE001 - recorded for the test
            self.answer = f"{type(error).__name__}: {error}"

    def outcome(self):
        if self.thread.ident is not None:
            self.thread.join(timeout=120)
        return self.answer


@contextmanager
def killing_at(point: str, publisher: WeightPublisher, servers: ServerManager | None, victim: str):
    """Rank 0 kills `victim` at `point` of the publish in the block (once), or races the
    client's restart of it against the publish."""
    race = Race(publisher, victim)
    if servers is None:
        yield race
        return
    patches = []  # (module or object, attribute, what it was: None for an object's own)
    done = set()

    def once(action=lambda: kill(servers, victim), name="kill") -> None:
        if name not in done:
            done.add(name)
            action()

    def before(owner, name, action, own=False):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            action(*args, **kwargs)
            return original(*args, **kwargs)

        patches.append((owner, name, None if own else original))
        setattr(owner, name, wrapped)

    if point == "during begin":
        begin = "begin_weight_update_each" if publisher.tensors is not None else "begin_weight_update"
        before(publisher_module, begin, lambda *a, **k: once())
    elif point == "mid-update":
        before(weight_sync, "post_json", lambda url, *a, **k: once() if url.startswith(victim)
               and url.endswith("/update_weights_from_tensor") else None)
    elif point == "mid-broadcast":
        before(weight_sync, "broadcast_from_first", lambda *a, **k: (time.sleep(0.2), once()))
    elif point == "during end":
        before(publisher_module, "end_weight_update", lambda *a, **k: once())
    elif point == "during the load":
        before(weight_sync, "post_json", lambda url, *a, **k: once() if url.startswith(victim)
               and url.endswith("/update_weights_from_disk") else None)
    elif point in ("restart first", "publish first"):
        in_restart = threading.Event()
        before(servers, "restart", lambda url: (in_restart.set(), time.sleep(0.5)), own=True)
        kill(servers, victim)
        if point == "restart first":  # the publish starts while the client's restart is under way
            race.thread.start()
            in_restart.wait(timeout=60)
        else:  # the client asks while the publish owns the servers (and restarts the victim itself)
            before(publisher.keeper, "revive", lambda *a, **k: once(race.thread.start, "race") or time.sleep(0.3), own=True)
    try:
        yield race
    finally:
        for owner, name, original in patches:
            if original is None:
                delattr(owner, name)  # the object's own attribute: its class's method again
            else:
                setattr(owner, name, original)


if __name__ == "__main__":
    main(*sys.argv[1:])
