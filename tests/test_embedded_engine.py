"""`dppo-megatron serve-embedded` over HTTP: SGLang's protocol, answers that agree with
transformers, weight updates from disk, and clear 400s."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from dppo_megatron.processes import free_port
from dppo_megatron.rollout.protocol import RoutingShape, SamplingParams, generate_request, parse_generate_response
from tests.generate_bodies import BODIES, STRICTER, UNSERVED
from tests.recording_proxy import RecordingProxy
from tests.tiny_models import make_moe, teacher_forced

ROUTING = RoutingShape(num_layers=2, experts_per_token=2, num_experts=4)
PROMPT = [5, 17, 42, 99]


def post(url: str, path: str, body, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(url: str, path: str, headers: dict | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers or {}), timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return make_moe(root / "v0", seed=0), make_moe(root / "v1", seed=1)


@pytest.fixture(scope="module")
def server(models):
    with running_server(models[0]) as url:
        yield url


@contextlib.contextmanager
def running_server(model_dir, *extra: str):
    port = free_port()
    exe = shutil.which("dppo-megatron")
    command = ([exe] if exe else [sys.executable, "-m", "dppo_megatron"]) + [
        "serve-embedded", "--model-path", str(model_dir), "--port", str(port), "--enable-return-routed-experts",
        *extra]
    log = Path(model_dir).parent / f"server-{port}.log"  # a file: a pipe nobody reads would block the server
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            try:
                if get(url, "/health")[0] == 200:
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"server did not start: {log.read_text()[-3000:]}") from None
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def generate(url, rid="r", prompt=PROMPT, **params):
    body = generate_request(rid, prompt, SamplingParams(**params), topk=5, return_routed_experts=True)
    status, answer = post(url, "/generate", body)
    assert status == 200, answer
    return parse_generate_response(answer, rid=rid, prompt_ids=prompt, server=url, topk=5, routing=ROUTING)


def test_answers_agree_with_transformers_on_the_same_weights(server, models):
    sample = generate(server, max_new_tokens=10, temperature=0.8, sampling_seed=3)
    expected, routes = teacher_forced(models[0], PROMPT, sample.response_ids, 0.8)
    assert (expected - torch.tensor(sample.logprobs)).abs().max() < 1e-5
    assert sample.routed_experts.shape == (len(PROMPT) + len(sample.response_ids) - 1, 2, 2)
    for layer, chosen in routes.items():
        np.testing.assert_array_equal(sample.routed_experts[:, layer], chosen)
    assert not sample.routed_experts[:, 1].any()  # layer 1 is dense: its rows stay zero


def test_the_same_seed_gives_the_same_sample(server):
    first = generate(server, max_new_tokens=8, sampling_seed=11)
    second = generate(server, max_new_tokens=8, sampling_seed=11)
    assert first.response_ids == second.response_ids and first.logprobs.tolist() == second.logprobs.tolist()


def test_stop_token_ends_generation(server):
    sample = generate(server, max_new_tokens=8, temperature=0.0)
    stop = sample.response_ids[2]
    stopped = generate(server, max_new_tokens=8, temperature=0.0, stop_token_ids=(stop,))
    assert stopped.finish_reason == "stop" and stopped.response_ids[-1] == stop
    assert len(stopped.response_ids) == sample.response_ids.index(stop) + 1


def test_a_batch_returns_one_answer_per_prompt(server):
    body = {"rid": ["a", "b"], "input_ids": [PROMPT, PROMPT[:2]], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 3}}
    status, answers = post(server, "/generate", body)
    assert status == 200 and [a["meta_info"]["id"] for a in answers] == ["a", "b"]
    assert [a["meta_info"]["prompt_tokens"] for a in answers] == [4, 2]


@pytest.mark.parametrize("name", list(BODIES) + list(UNSERVED) + list(STRICTER))
def test_every_generate_body_is_served_or_refused_with_a_400_naming_the_field(server, name):
    body, message = {**BODIES, **UNSERVED, **STRICTER}[name]
    status, answer = post(server, "/generate", body)
    if message is None:
        assert status == 200, answer
    else:
        assert status == 400, answer
        assert re.search(message, answer["error"]["message"]), answer


def test_bodies_that_are_not_json_or_too_big_get_an_answer(server):
    """Each on a connection of its own: a body the server did not read ends the connection."""
    host, port = server.removeprefix("http://").split(":")
    def sized(payload: bytes) -> bytes:
        return b"Content-Length: %d\r\n\r\n" % len(payload) + payload

    cases = {b"Content-Length: 100000000000\r\n\r\n": "413 Request Entity Too Large",
             b"Content-Length: -5\r\n\r\n": "400 Bad Request",
             sized(b"{nope}"): "400 Bad Request",
             sized(b'{"input_ids": [5], "sampling_params": {"temperature": NaN}}'): "400 Bad Request",
             sized(b"[" * 100_000 + b"]" * 100_000): "400 Bad Request"}
    for request, status in cases.items():
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n" + request)
            answer = connection.recv(65536).decode(errors="replace")
        assert answer.startswith(f"HTTP/1.1 {status}"), (request[:60], answer[:300])
    assert post(server, "/generate", BODIES["plain"][0])[0] == 200  # and the server still serves


def test_health_and_info_endpoints(server, models):
    assert get(server, "/health_generate") == (200, "OK")
    info = json.loads(get(server, "/server_info")[1])
    assert info["enable_return_routed_experts"] is True and info["dtype"] == "float32"


def test_weight_update_from_disk_serves_the_new_weights(server, models):
    before = generate(server, max_new_tokens=6, sampling_seed=5)
    status, answer = post(server, "/update_weights_from_disk", {"model_path": str(models[1]), "weight_version": "42"})
    assert status == 200 and answer["success"] and answer["weight_version"] == "42"
    assert json.loads(get(server, "/model_info")[1])["weight_version"] == "42"
    after = generate(server, max_new_tokens=6, sampling_seed=5)
    assert after.weight_version == "42" and after.logprobs.tolist() != before.logprobs.tolist()
    expected, _ = teacher_forced(models[1], PROMPT, after.response_ids, 1.0)
    assert (expected - torch.tensor(after.logprobs)).abs().max() < 1e-5
    status, answer = post(server, "/update_weights_from_disk", {"model_path": "/nonexistent"})
    assert status == 400 and not answer["success"] and "/nonexistent" in answer["message"]
    post(server, "/update_weights_from_disk", {"model_path": str(models[0]), "weight_version": "43"})


@pytest.fixture(scope="module")
def synced(server, models, tmp_path_factory):
    """The learner side of every weight-sync case below, one case after another in one torchrun
    of 2 ranks (each starts torch and Megatron once): each case's directory, holding the
    learner's weights after its step (`reference`) and what the servers served right after its
    sync (`served-<i>.json`). Between cases the server goes back to the first model's weights."""
    from tests.distributed import run_torchrun_each

    root, hf = tmp_path_factory.mktemp("sync"), str(models[0])
    worker = str(Path(__file__).parent / "workers" / "weight_sync_cases.py")
    # The senders of the gloo and two-senders cases talk to the servers through recording
    # proxies: the calls each server received, in order, for the replay through SGLang's own
    # scheduler below (the cases' own checks and resets go to the servers directly).
    with (running_server(models[0]) as second, RecordingProxy(server) as stale, RecordingProxy(server) as first_of_two,
          RecordingProxy(second) as second_of_two):
        both, both_recorded = f"{server},{second}", f"{first_of_two.url},{second_of_two.url}"
        runs = [
            ["weight_sync_export", root / "disk", "", hf, "2", "2", hf, root / "disk" / "sync", "7"],
            ["weight_sync_distributed", root / "gloo", server, hf, "2", "2", hf, stale.url, free_port(), "9"],
            ["weight_sync_distributed", root / "owners-tp1-ep2", server, hf, "1", "2", hf, server, free_port(), "11",
             "owners"],
            ["weight_sync_distributed", root / "owners-tp2-ep2", server, hf, "2", "2", hf, server, free_port(), "11",
             "owners"],
            ["weight_sync_two_senders", root / "two-senders", both, hf, hf, both_recorded, "4"],
            ["weight_sync_tensor", root / "tensor-rank0", server, hf, hf, server, "5", "rank0"],
            ["weight_sync_tensor", root / "tensor-per-rank", both, hf, hf, both, "6", "per-rank"],
            ["weight_sync_races", root / "races-distributed", "", hf, hf, "distributed", "2", "0", "0"],
            ["weight_sync_races", root / "races-disk", "", hf, hf, "disk", "1", "0", "0"],
            ["weight_sync_races", root / "races-tensor", "", hf, hf, "tensor", "1", "0", "0"],
        ]
        run_torchrun_each(worker, 2, runs, timeout=600)
    (root / "recorded.json").write_text(json.dumps({
        "stale session": {"url": stale.url, "calls": stale.calls},
        "first of two servers": {"url": first_of_two.url, "calls": first_of_two.calls},
        "second of two servers": {"url": second_of_two.url, "calls": second_of_two.calls}}))
    return root


def recorded(synced, case: str) -> dict:
    """The calls one server received in a case of `synced`, in order, with its answers."""
    return json.loads((synced / "recorded.json").read_text())[case]


def served(case_dir, index=0):
    """What server `index` answered right after the case's sync (tests/workers/weight_sync_cases.py)."""
    answer = json.loads((case_dir / f"served-{index}.json").read_text())
    return parse_generate_response(answer, rid="r", prompt_ids=PROMPT, server="", topk=5, routing=ROUTING)


def test_disk_weight_sync_serves_the_learners_new_weights(server, models, synced):
    from dppo_megatron.rollout.weight_sync import DiskWeightSync, WeightSyncError
    from tests.tiny_models import hf_logits, parity_tokens

    sync = DiskWeightSync(synced / "disk" / "sync", keep=1)
    stale = sync.version_dir(6)
    stale.mkdir(parents=True)
    before = generate(server, max_new_tokens=6, sampling_seed=5)
    published = sync.version_dir(7)
    # What was published is what the learner holds after its step (TP=2 + EP=2, experts and all).
    learner_logits = torch.load(synced / "disk" / "learner_logits.pt")
    assert (hf_logits(published, parity_tokens()) - learner_logits).abs().max() <= 1e-4

    sync.publish([server], 7)
    after = generate(server, max_new_tokens=6, sampling_seed=5)
    assert after.weight_version == "7" and after.logprobs.tolist() != before.logprobs.tolist()
    expected, _ = teacher_forced(published, PROMPT, after.response_ids, 1.0)
    assert (expected - torch.tensor(after.logprobs)).abs().max() < 1e-5
    assert not stale.exists() and published.exists()  # keep=1: older versions are removed

    with pytest.raises(WeightSyncError, match="version 8 has not been written"):
        sync.publish([server], 8)
    with pytest.raises(WeightSyncError, match="http://127.0.0.1:9: unreachable"):
        sync.publish(["http://127.0.0.1:9"], 7)
    post(server, "/update_weights_from_disk", {"model_path": str(models[0]), "weight_version": "0"})


def test_distributed_weight_sync_over_gloo_serves_the_learners_new_weights(server, models, synced):
    """Inside a weight-update session of its own, on a server where an earlier trainer left one
    open (ended first, with a warning); closed again after the last bucket."""
    from dppo_megatron.rollout.protocol import OUTSIDE_SESSION

    case = synced / "gloo"
    log = json.loads((case / "log.json").read_text())
    proxy = recorded(synced, "stale session")["url"]  # the sender's way to `server`
    assert any(line.startswith("a weight-update session was left open on " + proxy) for line in log), log
    sent = json.loads((case / "sent-rank0.json").read_text())["bytes"]
    assert sent > 64 * 1024  # several buckets
    after, before = served(case), generate(server, max_new_tokens=6, sampling_seed=5)
    assert after.weight_version == "9" and after.logprobs.tolist() != before.logprobs.tolist()
    expected, _ = teacher_forced(case / "reference", PROMPT, after.response_ids, 1.0)
    assert (expected - torch.tensor(after.logprobs)).abs().max() < 1e-5
    status, answer = post(server, "/update_weights_from_distributed",
                          {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]], "group_name": "dppo-weights"})
    assert (status, answer["message"]) == (400, OUTSIDE_SESSION.format("update_weights_from_distributed"))
    post(server, "/begin_weight_update", {})
    status, answer = post(server, "/update_weights_from_distributed",
                          {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]], "group_name": "dppo-weights"})
    post(server, "/end_weight_update", {})
    assert status == 400 and "no weight update group" in answer["message"]  # the groups were left after the syncs


@pytest.mark.parametrize("feeders", ["rank0", "per-rank"])
def test_released_and_resumed_servers_take_the_learners_weights_by_handle_and_serve_them(synced, feeders):
    """Released, the servers refuse to generate; resumed, they refuse until an update fills every
    tensor; after the publish by handle (rank 0's memory for all, or each server its own rank's,
    as colocated GPUs) they serve what the learner holds after its step (TP=2 + EP=2), as
    transformers computes it from the learner's own HF export."""
    case = synced / f"tensor-{feeders}"
    said = json.loads((case / "while-released.json").read_text())
    servers = len(said["released"])
    assert said["release"] == {} and said["resume"] == {}
    assert all(why.startswith("memory released (kv_cache, weights") for why in said["released"]), said
    assert all("tensors have not been loaded since" in why for why in said["resumed"]), said
    version = "5" if feeders == "rank0" else "6"
    for index in range(servers):
        after = served(case, index)
        assert after.weight_version == version
        expected, _ = teacher_forced(case / "reference", PROMPT, after.response_ids, 1.0)
        assert (expected - torch.tensor(after.logprobs)).abs().max() < 1e-5


def test_two_sending_ranks_publish_to_two_servers_version_after_version_without_deadlock(synced):
    """Each EP rank sends the experts it owns, through its own group with both servers; a
    server takes one weight-group call at a time (as SGLang's scheduler does), so the senders
    take turns: with both at once, two servers that took them in opposite orders would hang."""
    case = synced / "two-senders"
    for index in (0, 1):
        after = served(case, index)
        assert after.weight_version == "4"
        expected, _ = teacher_forced(case / "reference", PROMPT, after.response_ids, 1.0)
        assert (expected - torch.tensor(after.logprobs)).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["distributed", "disk", "tensor"])
def test_a_server_killed_at_any_point_of_a_publish_ends_on_the_new_version_and_no_request_is_lost(synced, method):
    """tests/workers/weight_sync_races.py: two servers of a ServerManager, one of them SIGKILLed
    at each point of a rollout and a publish in turn (mid-rollout, before the publish, as the
    session opens, mid-broadcast, as it closes, as the disk load goes out, between the buckets
    handed over by handle: no server is left serving a mix of versions), and the client's
    restart racing the publish both ways round (twice over by broadcast). After every publish
    both servers serve the new version; every rollout has one sample per request, in order, all
    from the version the servers held; each kill costs exactly one restart of its victim and
    none of the other server, but where it waits on a broken broadcast (restarts and publishes
    have one owner: the two never both restart a server); and what the servers serve at the end
    is the learner's last weights. Then a server that cannot be restarted stops the publish on every
    rank alike."""
    case = synced / f"races-{method}"
    publisher = json.loads((case / "publisher.json").read_text())
    urls, versions, log = publisher["urls"], publisher["versions"], publisher["log"]
    points = ["mid-rollout", "before the publish"] + {
        "distributed": ["during begin", "mid-broadcast", "during end"], "disk": ["during the load"],
        "tensor": ["during begin", "mid-update", "during end"]}[method]
    rounds = 2 if method == "distributed" else 1  # each point with each server as the victim, by broadcast
    assert [v["point"] for v in versions] == (points + ["restart first", "publish first"]) * rounds
    restarts_before = [0, 0]
    for v in versions:
        version, victim = v["version"], urls.index(v["victim"])
        assert v["serving"] == [str(version)] * 2, v
        assert [rid for rid, _ in v["samples"]] == [f"v{version}-r{i}" for i in range(16)], v
        assert {weights for _, weights in v["samples"]} == {str(version - 1)}, v
        assert v["restarts"][victim] == restarts_before[victim] + 1, v
        other = v["restarts"][1 - victim] - restarts_before[1 - victim]
        # Killed mid-broadcast, the victim may leave the other server waiting on the broadcast:
        # that one is started again too (and says so).
        assert other == 0 or (v["point"] == "mid-broadcast" and other == 1
                              and f"restarting {urls[1 - victim]}: they wait on the failed broadcast" in log), v
        restarts_before = v["restarts"]
        if v["point"] == "publish first" or (v["point"] == "restart first" and method == "disk"):
            assert v["race"] is None, v  # back, with the current weights
        elif v["point"] == "restart first":  # by broadcast it waits for the publish that follows
            assert v["race"].startswith("later: it gets the weights of version"), v
        else:
            assert v["race"] == "not asked", v
    if method == "distributed":
        assert any(line.startswith("sending weight version") and "failed" in line for line in log), log
    elif method == "tensor":
        assert any(line.startswith("weight version") and "did not reach" in line for line in log), log
    else:
        assert any(line.startswith("weight version") and "did not load" in line for line in log), log
    for index in (0, 1):
        after = served(case, index)
        assert after.weight_version == str(len(versions))
        expected, _ = teacher_forced(case / "reference", PROMPT, after.response_ids, 1.0)
        assert (expected - torch.tensor(after.logprobs)).abs().max() < 1e-5
    # Then a server whose restarts all fail (a stranger took its port): the same ServersLost on
    # every rank (the run checkpoints the step and stops), naming the server and the attempts.
    port = urls[0].rsplit(":", 1)[1]
    for rank in (0, 1):
        kind, message = json.loads((case / f"lost-rank{rank}.json").read_text())
        assert kind == "ServersLost", message
        assert f"{urls[0]} could not be restarted (3 attempts; last: port {port} on 127.0.0.1 is already in use" \
            in message, message


@pytest.mark.parametrize("tp, ep", [("1", "2"), ("2", "2")])
def test_experts_are_sent_by_the_ep_rank_that_owns_them(models, synced, tp, ep):
    from dppo_megatron.model.arch import Qwen3Arch
    from dppo_megatron.model.mapping import hf_tensor_names

    case = synced / f"owners-tp{tp}-ep{ep}"
    sent = {rank: json.loads((case / f"sent-rank{rank}.json").read_text())["names"] for rank in (0, 1)}
    experts = {rank: {n for n in names if ".mlp.experts." in n} for rank, names in sent.items()}
    assert experts[0] and experts[1] and not experts[0] & experts[1]  # each expert from one rank
    assert all(".mlp.experts." in n for n in sent[1])  # rank 1 sends only its own experts
    everything = set(hf_tensor_names(Qwen3Arch.from_hf(models[0])))
    assert set(sent[0]) | set(sent[1]) == everything and len(sent[0]) + len(sent[1]) == len(everything)
    after = served(case)
    assert after.weight_version == "11"
    expected, _ = teacher_forced(case / "reference", PROMPT, after.response_ids, 1.0)
    assert (expected - torch.tensor(after.logprobs)).abs().max() < 1e-5


def test_an_update_refused_outside_a_session_fails_at_once_in_the_servers_words(server, models):
    """Not after the group's timeout, waiting on a broadcast the server never joins: the sender
    stops as soon as a server answers no, and the publisher does not send it again."""
    from safetensors.torch import load_file

    from dppo_megatron.rollout.protocol import OUTSIDE_SESSION
    from dppo_megatron.rollout.weight_sync import DistributedWeightSync, WeightUpdateRefused

    tensors = sorted(load_file(models[1] / "model.safetensors").items())
    tensors.append(("model.extra.weight", torch.zeros(4096, 4096)))  # 64 MiB: more than gloo sends unreceived
    sync = DistributedWeightSync([server], master_address="127.0.0.1", master_port=free_port(),
                                 group_name="dppo-weights-refused", bucket_bytes=256 << 20, timeout=300)
    sync.connect()
    started = time.monotonic()
    try:
        with pytest.raises(WeightUpdateRefused, match=re.escape(
                f"{server}: " + OUTSIDE_SESSION.format("update_weights_from_distributed"))):
            sync.publish(tensors, 1, session=False)
        assert time.monotonic() - started < 30  # the group's timeout: 300 s
    finally:
        sync.close()
    assert generate(server, max_new_tokens=4).weight_version == "0"  # and it serves on, untouched


@pytest.fixture(scope="module")
def sglang(tmp_path_factory):
    """SGLang's own code (tests/sglang_contract.py), for the weight-update state machine."""
    from tests.sglang_contract import SGLangWorker

    worker = SGLangWorker(tmp_path_factory.mktemp("sglang") / "worker.log")
    yield worker
    worker.close()


def outcome(answer: dict) -> tuple[bool, str | None]:
    """Whether a call succeeded, and SGLang's message where it did not (success messages are
    free text in both)."""
    return bool(answer["success"]), None if answer["success"] else answer["message"]


def test_the_publishers_calls_are_answered_by_sglangs_own_scheduler_as_by_the_engine(synced, sglang):
    """The calls each server received from the run's WeightPublisher (two senders, two servers,
    four versions, then close), and from a sender that finds a session a crashed trainer left
    open, replayed through SGLang 0.5.23's scheduler: the same answer to every call, every
    version recorded, no session left open."""
    from dppo_megatron.rollout.protocol import SESSION_ALREADY_OPEN
    from tests.sglang_contract import replay_in_sglangs_scheduler

    cases = {name: recorded(synced, name)["calls"] for name in
             ("first of two servers", "second of two servers", "stale session")}
    replays = replay_in_sglangs_scheduler(sglang, [[(c["path"], c["body"]) for c in calls] for calls in cases.values()])
    for (name, calls), replay in zip(cases.items(), replays):
        assert [outcome(answer) for answer in replay["answers"]] == [outcome(c["answer"]) for c in calls], name
        assert not replay["session_open"], name
    for name in ("first of two servers", "second of two servers"):
        paths = [c["path"] for c in cases[name]]
        assert paths.count("/begin_weight_update") == paths.count("/end_weight_update") == 4, paths
        assert paths.count("/update_weights_from_distributed") >= 2 * 4  # two senders, every version
        assert all(c["answer"]["success"] for c in cases[name]), name
    assert replays[0]["versions"] == replays[1]["versions"] == ["1", "2", "3", "4"]
    # The left-open session: the sender's begin is refused, it ends that session, begins its own.
    stale = [outcome(answer) for answer in replays[2]["answers"]]
    assert stale.count((False, SESSION_ALREADY_OPEN)) == 1 and stale.count((False, None)) == 0
    assert replays[2]["versions"] == ["9"]


def test_without_the_session_the_first_update_is_refused_by_sglang_and_by_the_engine_alike(server, synced, sglang):
    from dppo_megatron.rollout.protocol import OUTSIDE_SESSION
    from tests.sglang_contract import replay_in_sglangs_scheduler

    calls = [c for c in recorded(synced, "first of two servers")["calls"]
             if c["path"] not in ("/begin_weight_update", "/end_weight_update")]
    (replay,) = replay_in_sglangs_scheduler(sglang, [[(c["path"], c["body"]) for c in calls]])
    first = next(i for i, c in enumerate(calls) if c["path"] == "/update_weights_from_distributed")
    refused = (False, OUTSIDE_SESSION.format("update_weights_from_distributed"))
    assert [outcome(answer) for answer in replay["answers"][: first + 1]] == [(True, None)] * first + [refused]
    # The engine refuses it before it would wait on any broadcast, with SGLang's words.
    status, answer = post(server, "/update_weights_from_distributed", calls[first]["body"])
    assert status == 400 and outcome(answer) == refused


SESSION = {"begin": ("/begin_weight_update", {"selector": "all"}), "end": ("/end_weight_update", {}),
           "update": ("/update_weights_from_distributed", {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]],
                                                           "group_name": "dppo-weights", "weight_version": "1"})}
SESSION_ORDERS = [["update"], ["begin", "begin", "end", "end"], ["end"], ["begin", "end", "update"], ["end", "begin", "end"]]


def test_the_engines_weight_update_session_is_sglangs_state_machine(server, sglang):
    from tests.sglang_contract import replay_in_sglangs_scheduler

    replays = replay_in_sglangs_scheduler(sglang, [[SESSION[call] for call in order] for order in SESSION_ORDERS])
    for order, replay in zip(SESSION_ORDERS, replays):
        engine = [outcome(post(server, *SESSION[call])[1]) for call in order]
        assert engine == [outcome(answer) for answer in replay["answers"]], order


def test_a_disk_publish_needs_no_session_in_sglang(server, models, synced, sglang):
    from dppo_megatron.rollout.weight_sync import DiskWeightSync
    from tests.sglang_contract import replay_in_sglangs_scheduler

    with RecordingProxy(server) as proxy:
        DiskWeightSync(synced / "disk" / "sync").publish([proxy.url], 7)
    post(server, "/update_weights_from_disk", {"model_path": str(models[0]), "weight_version": "0"})
    assert [c["path"] for c in proxy.calls] == ["/update_weights_from_disk"]
    (replay,) = replay_in_sglangs_scheduler(sglang, [[(c["path"], c["body"]) for c in proxy.calls]])
    assert [outcome(a) for a in replay["answers"]] == [(True, None)] and replay["versions"] == ["7"]


def test_batched_generation_matches_one_request_at_a_time(models):
    """Rows of a batch run together only with prompts of the same length; each row samples
    with its own seed, so batching does not change what a request gets."""
    from dppo_megatron.rollout.engine import EmbeddedEngine

    engine = EmbeddedEngine(models[0], enable_routed_experts=True)
    prompts = [PROMPT, PROMPT, [3, 4, 5, 6], [7, 8]]
    params = [SamplingParams(max_new_tokens=5, sampling_seed=seed).to_json() for seed in (1, 2, 3, 4)]
    body = {"input_ids": prompts, "rid": ["a", "b", "c", "d"], "sampling_params": params, "return_logprob": True,
            "top_logprobs_num": 3, "return_routed_experts": True}
    batched = engine.generate(body)
    for index, prompt in enumerate(prompts):
        single = engine.generate({"input_ids": prompt, "rid": "x", "sampling_params": params[index],
                                  "return_logprob": True, "top_logprobs_num": 3, "return_routed_experts": True})
        assert batched[index]["output_ids"] == single["output_ids"]
        assert batched[index]["meta_info"]["routed_experts"] == single["meta_info"]["routed_experts"]
        np.testing.assert_allclose([t[0] for t in batched[index]["meta_info"]["output_token_logprobs"]],
                                   [t[0] for t in single["meta_info"]["output_token_logprobs"]], atol=1e-5)


def test_bfloat16_engine_samples_from_a_distribution_close_to_float32(models):
    """--dtype bfloat16: the engine computes in bf16 (a real training-inference mismatch), and
    its logprobs stay within bf16 rounding of the float32 engine's on the same tokens."""
    from dppo_megatron.rollout.engine import EmbeddedEngine

    fp32 = EmbeddedEngine(models[0])
    bf16 = EmbeddedEngine(models[0], dtype=torch.bfloat16)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    params = SamplingParams(max_new_tokens=6, sampling_seed=11, temperature=0.0).to_json()  # greedy
    low = bf16.generate({"input_ids": PROMPT, "rid": "b", "sampling_params": params, "return_logprob": True})
    high = fp32.generate({"input_ids": PROMPT, "rid": "f", "sampling_params": params, "return_logprob": True})
    low_lp = np.array([t[0] for t in low["meta_info"]["output_token_logprobs"]])
    high_lp = np.array([t[0] for t in high["meta_info"]["output_token_logprobs"]])
    assert np.isfinite(low_lp).all()
    prefix = next((i for i, (a, b) in enumerate(zip(low["output_ids"], high["output_ids"])) if a != b), len(low_lp))
    assert prefix >= 1
    difference = np.abs(low_lp[:prefix] - high_lp[:prefix])
    assert difference.max() < 0.1 and difference.max() > 0  # a mismatch, but a small one


def assert_served_as_float8(engine, original: dict) -> int:
    """Every block linear weight is, row by row, an e4m3 value times the row's scale (its largest
    magnitude / 448), checked against the 256 e4m3 bit patterns; the rest is `original`."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    quantized = 0
    for name, param in engine.model.named_parameters():
        if name.startswith("model.layers.") and param.dim() >= 2 and not name.endswith("mlp.gate.weight"):
            scale = original[name].abs().amax(dim=-1, keepdim=True) / 448.0
            codes = (param / scale).flatten()
            nearest = grid[(codes[:, None] - grid[None, :]).abs().argmin(dim=1)]
            torch.testing.assert_close(codes, nearest, rtol=1e-5, atol=1e-6, msg=name)
            assert not torch.equal(param, original[name]), name
            quantized += 1
        else:  # embeddings, output layer, norms and the router as loaded
            assert torch.equal(param, original[name]), name
    return quantized


def test_float8_engine_serves_fp8_weights_with_per_channel_scales_and_a_larger_mismatch_than_bf16(models):
    """--dtype float8: the blocks' linear weights as an FP8 rollout engine holds them (after a
    weight update too); the logprobs on the same tokens then differ from float32 more than
    bf16's do: a real training-inference mismatch for CPU ablations."""
    from safetensors.torch import load_file

    from dppo_megatron.rollout.engine import EmbeddedEngine

    fp32, bf16 = EmbeddedEngine(models[0]), EmbeddedEngine(models[0], dtype=torch.bfloat16)
    fp8 = EmbeddedEngine(models[0], float8_weights=True)
    original = {name: param.detach().clone() for name, param in fp32.model.named_parameters()}
    # Two layers' q, k, v, o; layer 0's fused experts (gate_up, down); layer 1's dense MLP (3).
    assert assert_served_as_float8(fp8, original) == 2 * 4 + 2 + 3

    tokens = torch.tensor([PROMPT + list(range(3, 40))])  # the same tokens through each engine's model
    with torch.no_grad():
        logprobs = {name: torch.log_softmax(engine.model(tokens).logits.float(), dim=-1)
                    for name, engine in (("fp32", fp32), ("bf16", bf16), ("fp8", fp8))}
    bf16_gap = (logprobs["bf16"] - logprobs["fp32"]).abs().mean().item()
    fp8_gap = (logprobs["fp8"] - logprobs["fp32"]).abs().mean().item()
    assert fp8_gap > 2 * bf16_gap > 0, (fp8_gap, bf16_gap)

    new = load_file(models[1] / "model.safetensors")  # a weight update: the new weights are served as FP8 too
    fp8._load_hf_tensors(new)
    fp32._load_hf_tensors(new)
    assert_served_as_float8(fp8, {name: param.detach().clone() for name, param in fp32.model.named_parameters()})


def test_top_k_as_flat_base64_arrays_is_the_json_triples_of_the_same_sample(models):
    """return_flat_raw_output_top_logprobs + return_flat_raw_top_logprobs_b64: SGLang's layout
    (shape, null prefix, little-endian float32 values / int32 ids, dtype markers), the same
    numbers as the triples; b64 alone is refused, as SGLang refuses it."""
    import base64

    from dppo_megatron.rollout.engine import EmbeddedEngine, RequestError

    engine = EmbeddedEngine(models[0])
    body = {"input_ids": PROMPT, "rid": "x", "return_logprob": True, "top_logprobs_num": 3,
            "sampling_params": SamplingParams(max_new_tokens=4, sampling_seed=5).to_json()}
    nested = engine.generate(body)["meta_info"]["output_top_logprobs"]
    flat = engine.generate(dict(body, return_flat_raw_output_top_logprobs=True,
                                return_flat_raw_top_logprobs_b64=True))["meta_info"]
    assert "output_top_logprobs" not in flat and flat["output_top_logprobs_shape"] == [4, 3]
    assert flat["output_top_logprobs_null_prefix"] == 0 and flat["output_top_logprobs_idx_flat_b64_dtype"] == "int32"
    values = np.frombuffer(base64.b64decode(flat["output_top_logprobs_val_flat_b64"]), "<f4").reshape(4, 3)
    ids = np.frombuffer(base64.b64decode(flat["output_top_logprobs_idx_flat_b64"]), "<i4").reshape(4, 3)
    assert ids.tolist() == [[e[1] for e in row] for row in nested]
    np.testing.assert_array_equal(values, np.array([[e[0] for e in row] for row in nested], dtype=np.float32))
    with pytest.raises(RequestError, match="requires return_flat_raw_top_logprobs"):
        engine.generate(dict(body, return_flat_raw_top_logprobs_b64=True))


def test_sampling_is_greedy_only_below_sglangs_threshold_and_then_reports_logprobs_at_t1(server):
    """SGLang (sampling_params.py) samples greedily for 0 <= T < 1e-6, reporting logprobs at
    T = 1 (top_k = 1); at T = 5e-6 it samples at that temperature: the argmax has all the mass."""
    greedy = generate(server, max_new_tokens=4, temperature=0.0)
    cold = generate(server, max_new_tokens=4, temperature=5e-6, sampling_seed=1)
    assert cold.response_ids == greedy.response_ids
    assert max(abs(lp) for lp in cold.logprobs) < 1e-3
    assert min(greedy.logprobs) < -1e-2


@pytest.fixture
def engine_server(models):
    """An engine served in this process, so that a test can see what it is doing."""
    import threading

    from dppo_megatron.rollout.engine import EmbeddedEngine
    from dppo_megatron.rollout.server import make_server

    engine = EmbeddedEngine(models[0], seed=0)
    httpd = make_server(engine, port=0, stall_seconds=2.0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield engine, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


# 60 prompts of 60 lengths, each generating to the end of the 128 positions: thousands of
# forwards, seconds of work even for the tiny model.
LONG_BATCH = {"rid": [f"long-{n}" for n in range(1, 61)], "input_ids": [[5] * n for n in range(1, 61)],
              "sampling_params": [{"max_new_tokens": 128 - n, "ignore_eos": True} for n in range(1, 61)]}


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_an_abort_stops_the_requests_it_names_and_an_abort_for_no_request_is_forgotten(engine_server):
    import threading

    engine, url = engine_server
    answers = {}
    worker = threading.Thread(target=lambda: answers.update(long=post(url, "/generate", LONG_BATCH)))
    worker.start()
    wait_until(lambda: engine.lock.locked())
    queued = threading.Thread(target=lambda: answers.update(queued=post(url, "/generate", dict(
        BODIES["plain"][0], rid="queued"))))
    queued.start()
    wait_until(lambda: "queued" in engine.active)
    assert post(url, "/abort_request", {"abort_all": True}) == (200, {"success": True})
    worker.join(30)
    queued.join(30)
    status, outputs = answers["long"]
    assert status == 200 and {o["meta_info"]["finish_reason"]["type"] for o in outputs} == {"abort"}
    assert sum(len(o["output_ids"]) for o in outputs) < sum(p["max_new_tokens"] for p in LONG_BATCH["sampling_params"])
    assert answers["queued"][1]["meta_info"]["finish_reason"] == {
        "type": "abort", "message": "aborted by /abort_request", "status_code": None, "err_type": None}
    # An abort for a request that is not here does nothing, now or later.
    assert post(url, "/abort_request", {"rid": "later"})[0] == 200
    status, answer = post(url, "/generate", dict(BODIES["plain"][0], rid="later"))
    assert status == 200 and answer["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    assert not engine.active and not engine.aborted


def test_a_client_that_goes_away_frees_the_engine_for_the_next_request(engine_server):
    engine, url = engine_server
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(LONG_BATCH).encode()
    connection = socket.create_connection((host, int(port)))
    connection.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    wait_until(lambda: engine.lock.locked())
    started = time.monotonic()
    connection.close()
    wait_until(lambda: not engine.active, timeout=10)
    assert time.monotonic() - started < 5  # the batch alone runs for seconds more
    assert post(url, "/generate", BODIES["plain"][0])[0] == 200


def test_health_says_unavailable_while_the_engine_makes_no_progress(engine_server):
    engine, url = engine_server
    assert get(url, "/health") == (200, "OK")
    with engine.lock:  # what a stuck forward or weight load looks like from outside
        engine.progress_at = time.monotonic() - 10
        status, answer = get(url, "/health")
    assert status == 503 and "no progress for 10 s" in answer
    assert get(url, "/health") == (200, "OK")


def test_a_missing_model_directory_is_named_in_one_line_not_a_hub_traceback(engine_server, tmp_path):
    _, url = engine_server
    status, answer = post(url, "/update_weights_from_disk", {"model_path": str(tmp_path / "nowhere")})
    assert status == 400 and answer == {
        "success": False, "message": f"failed to load {tmp_path / 'nowhere'}: {tmp_path / 'nowhere'}: not a Hugging "
                                     "Face model directory (no config.json there)"}
    result = subprocess.run([sys.executable, "-m", "dppo_megatron", "serve-embedded", "--model-path",
                             str(tmp_path / "nowhere"), "--port", str(free_port())], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nowhere'}: not a Hugging Face model directory (no config.json there)"


# Every endpoint the embedded engine serves, with a body that leaves it as it was where the call
# goes through (a missing field, a bad selector, no session to end).
SERVED = [("GET", "/health", None), ("GET", "/health_generate", None), ("GET", "/model_info", None),
          ("GET", "/server_info", None), ("GET", "/flush_cache", None), ("POST", "/generate", {}),
          ("POST", "/update_weights_from_disk", {}), ("POST", "/init_weights_update_group", {}),
          ("POST", "/update_weights_from_distributed", {}), ("POST", "/destroy_weights_update_group", {}),
          ("POST", "/begin_weight_update", {"selector": "none of them"}), ("POST", "/end_weight_update", {}),
          ("POST", "/abort_request", {"rid": "nobody"})]

SGLANG_AUTH = """
import json, sys
from sglang.srt.entrypoints import http_server
from sglang.srt.utils.auth import AuthLevel, decide_request_auth
levels = {}
for route in http_server.app.routes:
    for method in getattr(route, "methods", None) or ():
        levels[(method, route.path)] = getattr(route.endpoint, "_auth_level", AuthLevel.NORMAL)
for method, path, header, api_key, admin_api_key in json.loads(sys.stdin.read()):
    decision = decide_request_auth(method=method, path=path, authorization_header=header, api_key=api_key,
                                   admin_api_key=admin_api_key, auth_level=levels[(method, path)])
    print(json.dumps([method, path, header, decision.allowed, decision.error_status_code]))
"""


def test_every_endpoint_lets_through_exactly_the_requests_sglangs_own_auth_lets_through(models, sglang, tmp_path):
    """`serve-embedded --api-key-file` with a generation key alone and with both keys, and
    without keys: for every endpoint it serves and every header (none, another scheme, a wrong
    key, no token, the generation key, the admin key, the scheme in lower case), 401 exactly
    where SGLang 0.5.23's decide_request_auth, at SGLang's auth level for that route, refuses."""
    import yaml

    from dppo_megatron.keys import headers

    generation, admin = "generation-key-0123", "admin-key-4567"
    cases = {"none": None, "api": {"api-key": generation}, "both": {"api-key": generation, "admin-api-key": admin}}
    header_cases = [None, f"Basic {generation}", "Bearer wrong", "Bearer", f"Bearer {generation}", f"Bearer {admin}",
                    f"bearer {admin}", f"bearer {generation}"]
    asked, answered = [], []
    for case, keys in cases.items():
        extra = []
        if keys is not None:
            key_file = tmp_path / f"{case}.yaml"
            key_file.write_text(yaml.safe_dump(keys))
            key_file.chmod(0o600)
            extra = ["--api-key-file", str(key_file)]
        with running_server(models[0], *extra) as url:
            for method, path, body in SERVED:
                for header in header_cases:
                    sent = {"Authorization": header} if header else {}
                    status, answer = (get(url, path, sent) if method == "GET" else post(url, path, body, sent))
                    asked.append([method, path, header, (keys or {}).get("api-key"), (keys or {}).get("admin-api-key")])
                    answered.append([method, path, header, status != 401, 401 if status == 401 else None])
                    if status == 401:
                        assert (json.loads(answer) if isinstance(answer, str) else answer) == {"error": "Unauthorized"}
            if case == "both":  # a refused update changes nothing; the admin key alone makes it
                update = {"model_path": str(models[1]), "weight_version": "1"}
                assert post(url, "/update_weights_from_disk", update, headers(generation))[0] == 401
                assert json.loads(get(url, "/model_info", headers(generation))[1])["weight_version"] == "0"
                assert post(url, "/update_weights_from_disk", update, headers(admin))[0] == 200
                assert json.loads(get(url, "/model_info", headers(generation))[1])["weight_version"] == "1"
    code, output = sglang.run(SGLANG_AUTH, stdin=json.dumps(asked))
    assert code == 0, output[-3000:]
    decided = [json.loads(line) for line in output.splitlines() if line.startswith("[")]
    assert [row[:4] for row in answered] == [row[:4] for row in decided]
    refused = sum(not row[3] for row in decided)
    assert refused > 100 and all(row[4] == 401 for row in decided if not row[3])  # no 403 among them


def test_the_embedded_engine_will_not_listen_beyond_loopback_without_a_key(models):
    result = subprocess.run([sys.executable, "-m", "dppo_megatron", "serve-embedded", "--model-path", str(models[0]),
                             "--host", "0.0.0.0", "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == ("error: the embedded engine would listen on 0.0.0.0 without a key: anyone who "
                                     "reaches this node could drive it; give it a key file (--api-key-file) or bind "
                                     "127.0.0.1")
