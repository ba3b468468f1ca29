"""`dppo-megatron serve-node` and `RemoteServers`: a cluster job's servers, run by an agent on
their node, found by the trainer from the job's layout, restarted through the agent when they
die, and stopped when the trainer is done."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest

from dppo_megatron.processes import free_port
from dppo_megatron.rollout.client import Request, RolloutClient
from dppo_megatron.rollout.job_layout import JobLayout
from dppo_megatron.rollout.protocol import SamplingParams
from dppo_megatron.rollout.servers import RemoteServers, ServerSpec, ServerStartError
from tests.test_rollout_client import client_settings
from tests.tiny_models import make_moe


def layout_for(tmp_path, model, ports, agent_port) -> JobLayout:
    specs = [ServerSpec(model_path=str(model), port=port, engine="embedded") for port in ports]
    servers = [{"node": "node-a", "spec": {**spec.__dict__, "gpus": [], "extra_args": []}} for spec in specs]
    return JobLayout(learner_nodes=["node-a"], server_nodes=["node-a"], master_addr="node-a", master_port=free_port(),
                     agent_port=agent_port, log_dir=str(tmp_path / "logs"), servers=servers)


@pytest.fixture
def agent(tmp_path):
    model = make_moe(tmp_path / "hf")
    layout = layout_for(tmp_path, model, [free_port(), free_port()], free_port())
    layout.save(tmp_path / "layout.json")
    process = subprocess.Popen([sys.executable, "-m", "dppo_megatron", "serve-node", str(tmp_path / "layout.json"),
                                "--node", "node-a"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        yield layout, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def agent_health(layout: JobLayout) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{layout.agent_port}/health", timeout=10) as response:
        return json.loads(response.read())


def test_the_agent_restarts_a_killed_server_mid_batch_and_stops_when_the_trainer_is_done(agent):
    layout, process = agent
    servers = RemoteServers(layout.agents, health_timeout=120)
    assert servers.start() == layout.urls  # waits until the agent's servers answer
    health = agent_health(layout)
    assert health["node"] == "node-a" and [s["restarts"] for s in health["servers"]] == [0, 0]

    victim = layout.urls[0]
    victim_pid = next(s["pid"] for s in health["servers"] if s["url"] == victim)
    client = RolloutClient(servers.urls, client_settings(backoff_seconds=0.05, failures_before_dead=2, max_attempts=8,
                                                         wait_for_servers_seconds=120), restart=servers.restart)
    requests = [Request(f"q{i}", [5 + i, 17, 42], SamplingParams(max_new_tokens=125, sampling_seed=i))
                for i in range(16)]
    timer = threading.Timer(0.5, lambda: os.killpg(victim_pid, signal.SIGKILL))
    timer.start()
    samples = client.generate_sync(requests)
    timer.join()
    assert [s.rid for s in samples] == [r.rid for r in requests]  # nothing lost, nothing twice
    restarted = {s["url"]: s for s in agent_health(layout)["servers"]}
    assert restarted[victim]["restarts"] == 1 and restarted[victim]["pid"] != victim_pid

    servers.stop()  # POST /shutdown: the agent stops its servers and exits cleanly
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "the trainer is done; stopping the servers" in output
    assert not any(os.path.exists(f"/proc/{s['pid']}") for s in restarted.values())  # its servers are gone


def test_an_agent_that_cannot_start_its_servers_ends_the_trainers_wait(tmp_path):
    model = make_moe(tmp_path / "hf")
    busy = free_port()
    layout = layout_for(tmp_path, model, [busy], free_port())
    layout.save(tmp_path / "layout.json")
    with socket.socket() as holder:  # another process owns the server's port
        holder.bind(("127.0.0.1", busy))
        holder.listen()
        result = subprocess.run([sys.executable, "-m", "dppo_megatron", "serve-node", str(tmp_path / "layout.json"),
                                 "--node", "node-a"], capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and f"port {busy} on 127.0.0.1 is already in use" in result.stdout + result.stderr
        servers = RemoteServers(layout.agents, health_timeout=120, agent_grace=2)
        with pytest.raises(ServerStartError, match="has not answered for 2s: it failed to start"):
            servers.start()
