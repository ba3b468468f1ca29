"""The multi-server client and the server manager: spreading, exactly-once answers, a server
killed mid-batch restarted, misbehaving servers retried then marked dead, R3 without routes
stopping the run."""

import json
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dppo_megatron.config.schema import RolloutConfig
from dppo_megatron.processes import free_port
from dppo_megatron.rollout.client import ClientConfig, Request, RolloutClient, RolloutError, ServerRejoinsLater
from dppo_megatron.rollout.protocol import RoutingShape, SamplingParams
from dppo_megatron.run.configs import client_config
from dppo_megatron.rollout.servers import ServerManager, ServerReleaseError, ServerSpec, check_release, server_command
from dppo_megatron.rollout.sglang_release import SGLANG_RELEASE
from tests.tiny_models import make_moe


def client_settings(**changes) -> ClientConfig:
    """The client as a recipe with rollout's defaults builds it, one request per call (so that
    a few requests spread over the servers), with `changes`."""
    return replace(client_config(RolloutConfig()), **{"requests_per_call": 1, **changes})


FAST = client_settings(backoff_seconds=0.05, max_backoff_seconds=0.2, failures_before_dead=2, max_attempts=8,
                    wait_for_servers_seconds=120)
ROUTING = RoutingShape(num_layers=2, experts_per_token=2, num_experts=4)


def requests(count: int, max_new_tokens: int = 6, routing=ROUTING) -> list[Request]:
    return [Request(rid=f"q{i}", prompt_ids=[5 + i, 17, 42], params=SamplingParams(max_new_tokens=max_new_tokens,
                    sampling_seed=i), topk=3, routing=routing) for i in range(count)]


def test_sglang_command_line_from_a_spec():
    spec = ServerSpec(model_path="/models/Qwen3-30B-A3B", port=30001, tp=4, dp=2, ep=4, mem_fraction=0.8,
                      routed_experts=True, dtype="bfloat16", gpus=(4, 5, 6, 7))
    assert server_command(spec) == [
        sys.executable, "-m", "sglang.launch_server", "--model-path", "/models/Qwen3-30B-A3B",
        "--host", "127.0.0.1", "--port", "30001", "--tp-size", "4", "--dp-size", "2", "--ep-size", "4",
        "--mem-fraction-static", "0.8", "--skip-tokenizer-init", "--weight-version", "0", "--dtype", "bfloat16",
        "--enable-return-routed-experts",
    ]
    assert spec.url == "http://127.0.0.1:30001"
    assert "--enable-return-routed-experts" not in server_command(ServerSpec(model_path="m", port=1))
    # rollout.sglang_python: SGLang's own environment, where it is not the trainer's.
    assert server_command(ServerSpec(model_path="m", port=1, python="/opt/sglang/bin/python"))[:3] == [
        "/opt/sglang/bin/python", "-m", "sglang.launch_server"]


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    root = tmp_path_factory.mktemp("servers")
    model = make_moe(root / "hf")
    specs = [ServerSpec(model_path=str(model), port=free_port(), engine="embedded", routed_experts=True)
             for _ in range(2)]
    with ServerManager(specs, root / "logs", health_timeout=120) as running:
        yield running


def test_requests_are_spread_over_servers_and_each_answered_once(manager):
    client = RolloutClient(manager.urls, FAST)
    samples = client.generate_sync(requests(8))
    assert [s.rid for s in samples] == [f"q{i}" for i in range(8)]
    assert {s.server for s in samples} == set(manager.urls)
    assert all(s.routed_experts.shape == (3 + len(s.response_ids) - 1, 2, 2) for s in samples)


def test_hundreds_of_concurrent_calls_are_all_served_and_batching_gives_the_same_samples(manager):
    """The embedded server's listen backlog takes a client's full concurrency (the default of
    5 reset connections); and batching calls changes nothing in the samples (per-row seeds)."""
    many = requests(290, max_new_tokens=2, routing=None)  # prompt ids stay inside the vocabulary (300)
    single = RolloutClient(manager.urls[:1], client_settings(failures_before_dead=1, max_attempts=1)).generate_sync(many)
    batched = RolloutClient(manager.urls[:1], client_settings(requests_per_call=64)).generate_sync(many)
    assert [s.rid for s in single] == [r.rid for r in many] == [s.rid for s in batched]
    assert [s.response_ids for s in single] == [s.response_ids for s in batched]


def test_a_server_killed_mid_batch_is_restarted_and_the_batch_completes(manager):
    victim = manager.urls[0]
    client = RolloutClient(manager.urls, FAST, restart=manager.restart)
    before = manager.restarts[victim]
    # Each engine serves one request at a time: 12 queued requests of 125 tokens (the model's
    # 128 positions less the prompt) keep the victim busy for seconds, so the kill lands
    # mid-batch on any machine.
    timer = threading.Timer(0.5, lambda: os.killpg(manager.processes[victim].pid, signal.SIGKILL))
    timer.start()
    samples = client.generate_sync(requests(24, max_new_tokens=125))
    timer.join()
    assert [s.rid for s in samples] == [f"q{i}" for i in range(24)]  # nothing lost, nothing twice
    assert sum(s.server == victim for s in samples) < 12  # its queued requests went elsewhere
    assert all(s.finish_reason in ("stop", "length") for s in samples)
    # The dead server was restarted (in the background, while the other one served).
    deadline = time.monotonic() + 120
    while manager.restarts[victim] == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert manager.restarts[victim] == before + 1
    assert RolloutClient([victim], FAST).generate_sync(requests(1))[0].server == victim


def test_a_server_restarted_to_rejoin_later_is_left_out_of_this_batch_and_serves_the_next(manager):
    """Under the distributed weight sync a restarted server gets the weights only at the next
    broadcast: the restart call says so (ServerRejoinsLater), the client keeps the server out of
    the batch, and asks again with the next one; from then on it serves."""
    victim = manager.urls[0]
    calls, restarted = [], threading.Event()

    def restart(url: str) -> None:
        calls.append(url)
        if len(calls) == 1:
            manager.restart(url)
            restarted.set()
            raise ServerRejoinsLater("it rejoins at the next weight update")

    client = RolloutClient(manager.urls, FAST, restart=restart)
    os.killpg(manager.processes[victim].pid, signal.SIGKILL)
    manager.processes[victim].wait()
    first = client.generate_sync(requests(24, max_new_tokens=20))
    assert [s.rid for s in first] == [f"q{i}" for i in range(24)] and {s.server for s in first} == {manager.urls[1]}
    assert restarted.wait(120) and client.dead_servers() == [victim]
    client.generate_sync(requests(4))  # (its calls were handed out before the answer came)
    assert calls == [victim, victim] and client.dead_servers() == []
    assert victim in {s.server for s in client.generate_sync(requests(8))}


def test_a_restart_that_outlasts_the_batch_is_awaited_and_not_asked_for_again(manager):
    """The other server finished the batch while the victim's restart was still under way: the
    batch waits for the restart's answer (its thread runs on anyway), so the next batch has the
    server back rather than asking for a second restart."""
    victim = manager.urls[0]
    calls = []

    def restart(url: str) -> None:
        calls.append(url)
        time.sleep(2.0)  # longer than the batch takes on the other server
        manager.restart(url)

    client = RolloutClient(manager.urls, FAST, restart=restart)
    os.killpg(manager.processes[victim].pid, signal.SIGKILL)
    manager.processes[victim].wait()
    first = client.generate_sync(requests(4, max_new_tokens=2))
    assert [s.rid for s in first] == [f"q{i}" for i in range(4)] and client.dead_servers() == []
    assert victim in {s.server for s in client.generate_sync(requests(8))}
    assert calls == [victim]


class _Misbehaving(BaseHTTPRequestHandler):
    mode = "garbage"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.mode == "retry":  # as SGLang: a rid seen before is refused (still in flight there)
            self.seen.append(body["rid"])
            if self.seen.count(body["rid"]) > 1:
                status, payload = 400, b'{"error": {"message": "Duplicate request ID"}}'
            elif len(self.seen) == 1:
                status, payload = 503, b'{"error": {"message": "busy"}}'
            else:
                status, payload = 200, self.answer()
        elif self.mode == "error":
            status, payload = 500, b'{"error": {"message": "CUDA out of memory"}}'
        elif self.mode == "garbage":
            status, payload = 200, b"{not json"
        else:  # a well-formed answer without the routes that were asked for
            status, payload = 200, self.answer()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):  # /server_info, as SGLang 0.5.9 answers it
        payload = json.dumps({"version": "0.5.9", "weight_version": "0"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    @staticmethod
    def answer() -> bytes:
        return json.dumps({"output_ids": [7], "meta_info": {
            "finish_reason": {"type": "length", "length": 1},
            "output_token_logprobs": [[-1.0, 7, None]], "output_top_logprobs": [[[-1.0, 7, None]] * 3],
        }}).encode()


@pytest.fixture
def misbehaving():
    servers = []

    def start(mode: str) -> str:
        handler = type("Handler", (_Misbehaving,), {"mode": mode, "seen": []})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize("mode", ["garbage", "error"])
def test_malformed_json_and_500_are_retried_then_the_server_marked_dead(manager, misbehaving, mode):
    bad = misbehaving(mode)
    client = RolloutClient([bad, manager.urls[1]], FAST)
    samples = client.generate_sync(requests(6))
    assert [s.rid for s in samples] == [f"q{i}" for i in range(6)]
    assert {s.server for s in samples} == {manager.urls[1]}
    assert client.dead_servers() == [bad]


def test_a_retry_carries_a_fresh_rid_so_that_sglang_does_not_refuse_it_as_a_duplicate(misbehaving):
    url = misbehaving("retry")
    server = RolloutClient([url], FAST)
    (sample,) = server.generate_sync(requests(1, routing=None))
    assert sample.rid == "q0" and sample.response_ids == [7]


def test_with_only_broken_servers_the_run_stops_naming_them(misbehaving):
    bad = misbehaving("error")
    with pytest.raises(RolloutError, match=f"every rollout server is dead: {bad}"):
        RolloutClient([bad], FAST).generate_sync(requests(2))


def test_missing_routes_under_r3_stop_the_run_naming_the_server(misbehaving):
    bad = misbehaving("no-routes")
    with pytest.raises(RolloutError, match=f"server {bad}, request q0: routing replay is on but the response has no"):
        RolloutClient([bad], FAST).generate_sync(requests(1))


def test_one_client_serves_step_after_step(manager):
    """A trainer keeps its client: each step runs in a new event loop (generate_sync)."""
    from dataclasses import replace

    client = RolloutClient(manager.urls, replace(FAST, max_in_flight_per_server=1))  # contended
    for _ in range(3):
        samples = client.generate_sync(requests(5))
        assert [s.rid for s in samples] == [f"q{i}" for i in range(5)]


def test_a_port_already_in_use_is_refused_rather_than_health_checked(tmp_path):
    """Whatever answers on a busy port is not our server: training against it would use
    someone else's weights."""
    import socket

    from dppo_megatron.rollout.servers import ServerStartError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        manager = ServerManager([ServerSpec(model_path=str(tmp_path), port=port, engine="embedded")], tmp_path)
        with pytest.raises(ServerStartError, match=f"port {port} on 127.0.0.1 is already in use"):
            manager.start()
        manager.stop()


def test_a_server_of_another_sglang_release_is_refused_naming_both_releases(manager, misbehaving):
    check_release(manager.urls)  # the embedded engine serves 0.5.23's protocol
    old = misbehaving("garbage")
    with pytest.raises(ServerReleaseError, match=rf"{old} runs SGLang 0.5.9; dppo-megatron supports SGLang "
                                                 rf"{SGLANG_RELEASE}.*install sglang=={SGLANG_RELEASE}"):
        check_release([manager.urls[0], old])
