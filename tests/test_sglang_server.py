"""A real SGLang 0.5.23 server (its CPU engine, started as tests/sglang_server.py says) against
the project's own client, weight senders and trainer, with transformers as the reference for
what it serves. One module, so that the server starts once (about 30 s). Where the server cannot
be made here (no SGLang environment, no compiler), the tests skip with the reason; in CI they fail."""

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch
import yaml

from dppo_megatron.keys import ApiKeys, headers
from dppo_megatron.processes import free_port
from dppo_megatron.rollout.client import Request, RolloutClient
from dppo_megatron.rollout.protocol import OUTSIDE_SESSION, RoutingShape, SamplingParams
from dppo_megatron.rollout.servers import ServerManager, ServerSpec, check_release, is_healthy, server_release
from dppo_megatron.rollout.sglang_release import SGLANG_RELEASE
from dppo_megatron.run.metrics import read_metrics
from tests.sglang_server import CPU_SERVER_ARGS, server_python
from tests.test_rollout_client import client_settings
from tests.tiny_models import hf_logits, make_moe, teacher_forced

ROUTING = RoutingShape(num_layers=2, experts_per_token=2, num_experts=4)
PROMPTS = [[5, 17, 42, 99], [7, 7, 250, 3, 18, 64, 2]]
TOPK = 5


def post(url: str, path: str, body: dict, key: str | None = None) -> tuple[int, dict]:
    """As the run posts: with the admin key unless another is given (the server asks for keys)."""
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **headers(key or KEYS.admin_api_key)})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def sglang_python():
    python, problem = server_python()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    return python


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Every layer MoE: SGLang serves every Qwen3-MoE layer as one (see the recipe check)."""
    root = tmp_path_factory.mktemp("hf")
    return make_moe(root / "v0", seed=0, mlp_only_layers=()), make_moe(root / "v1", seed=1, mlp_only_layers=())


KEYS = ApiKeys(api_key="generation-key-0123", admin_api_key="admin-key-4567")


@pytest.fixture(scope="module")
def server(sglang_python, models, tmp_path_factory):
    """A real SGLang server asking for the two keys (from a key file, as a run starts it)."""
    key_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    key_file.write_text(yaml.safe_dump({"api-key": KEYS.api_key, "admin-api-key": KEYS.admin_api_key}))
    key_file.chmod(0o600)
    spec = ServerSpec(model_path=str(models[0]), port=free_port(), dtype="float32", routed_experts=True,
                      python=sglang_python, extra_args=tuple(CPU_SERVER_ARGS), keys_file=str(key_file))
    with ServerManager([spec], tmp_path_factory.mktemp("sglang-logs"), health_timeout=300) as manager:
        yield manager.urls[0]


def samples(url: str, seed: int = 5, max_new_tokens: int = 8) -> list:
    client = RolloutClient([url], client_settings(requests_per_call=len(PROMPTS)), api_key=KEYS.api_key)
    requests = [Request(rid=f"r{i}", prompt_ids=prompt, params=SamplingParams(max_new_tokens=max_new_tokens,
                        sampling_seed=seed, ignore_eos=True), topk=TOPK, routing=ROUTING)
                for i, prompt in enumerate(PROMPTS)]
    return client.generate_sync(requests)


def assert_serves(url: str, model_dir, version: str) -> None:
    """Every logprob and top-K logprob SGLang answers is transformers' on `model_dir`."""
    for sample in samples(url):
        assert sample.weight_version == version
        expected, _ = teacher_forced(model_dir, sample.prompt_ids, sample.response_ids, 1.0)
        assert (torch.tensor(sample.logprobs) - expected).abs().max() < 1e-4


def test_the_server_reports_the_supported_release(server):
    check_release([server], KEYS)  # what the trainer and preflight check at start
    request = urllib.request.Request(server + "/server_info", headers=headers(KEYS.api_key))
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["version"] == SGLANG_RELEASE


def test_logprobs_and_top_k_are_transformers_on_the_same_weights(server, models):
    for sample in samples(server):
        tokens = torch.tensor([sample.prompt_ids + sample.response_ids[:-1]])
        logprobs = torch.log_softmax(hf_logits(models[0], tokens)[0], dim=-1)[len(sample.prompt_ids) - 1:]
        sampled = logprobs.gather(1, torch.tensor(sample.response_ids)[:, None]).squeeze(1)
        assert len(sample.response_ids) == 8 and (torch.tensor(sample.logprobs) - sampled).abs().max() < 1e-4
        ids, values = torch.as_tensor(sample.topk_ids).long(), torch.as_tensor(sample.topk_logprobs)
        assert ids.shape == (8, TOPK)
        assert (values - logprobs.gather(1, ids)).abs().max() < 1e-4  # each entry's logprob
        best = logprobs.topk(TOPK, dim=-1).indices
        for position in range(8):  # the top K, but for the sampled token forced in as the K-th
            expected = set(best[position].tolist())
            got = set(ids[position].tolist()) - {sample.response_ids[position]}
            assert got <= expected and len(got) >= TOPK - 1


def test_routes_are_the_experts_transformers_routes_the_same_tokens_to(server, models):
    for sample in samples(server):
        _, routes = teacher_forced(models[0], sample.prompt_ids, sample.response_ids, 1.0)
        served = torch.as_tensor(sample.routed_experts)  # (prompt + response - 1, layers, experts per token)
        assert served.shape == (len(sample.prompt_ids) + len(sample.response_ids) - 1, 2, 2)
        assert sorted(routes) == [0, 1]
        for layer in (0, 1):  # the same experts (SGLang orders them by weight, transformers too: as sets)
            expected = torch.as_tensor(routes[layer])[: served.shape[0]].sort(dim=-1).values
            assert torch.equal(served[:, layer].long().sort(dim=-1).values, expected.long())


def test_a_disk_update_serves_the_new_checkpoint_and_back(server, models, tmp_path):
    from dppo_megatron.rollout.weight_sync import DiskWeightSync

    sync = DiskWeightSync(tmp_path / "weights", key=KEYS.admin_api_key)
    shutil.copytree(models[1], sync.version_dir(3))
    sync.publish([server], 3)
    assert_serves(server, models[1], "3")
    status, answer = post(server, "/update_weights_from_disk", {"model_path": str(models[0]), "weight_version": "0"})
    assert status == 200 and answer["success"], answer
    assert_serves(server, models[0], "0")


def test_a_distributed_update_inside_the_session_serves_the_senders_weights(server, models, caplog):
    """The project's sender (gloo on the CPU, flattened buckets) inside SGLang's weight-update
    session, on a server where a crashed trainer left a session open; outside a session SGLang
    refuses the update with the words the embedded engine uses."""
    from safetensors.torch import load_file

    from dppo_megatron.rollout.weight_sync import DistributedWeightSync

    update = {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[64]], "group_name": "none"}
    status, answer = post(server, "/update_weights_from_distributed", update)
    assert (status, answer["message"]) == (400, OUTSIDE_SESSION.format("update_weights_from_distributed"))

    assert post(server, "/begin_weight_update", {"selector": "all"})[1]["success"]  # the crashed trainer's
    tensors = load_file(models[1] / "model.safetensors")
    sync = DistributedWeightSync([server], master_address="127.0.0.1", master_port=free_port(),
                                 group_name="dppo-weights-r0", bucket_bytes=16 * 1024, key=KEYS.admin_api_key)
    sync.connect()
    try:
        with caplog.at_level("WARNING"):
            sent = sync.publish(sorted(tensors.items()), 4, session=True)
    finally:
        sync.close()
    assert sent > 16 * 1024 and any("session was left open" in r.getMessage() for r in caplog.records)
    assert_serves(server, models[1], "4")
    assert post(server, "/end_weight_update", {})[1]["message"].startswith("no weight-update session is open")
    post(server, "/update_weights_from_disk", {"model_path": str(models[0]), "weight_version": "0"})
    assert_serves(server, models[0], "0")


def test_without_the_right_key_sglang_answers_401_changes_nothing_and_serves_on(server, models):
    """No key, the wrong one, or the generation key on a weight update: 401, in SGLang's words,
    the weights untouched; health stays open, and the server serves on with the right key."""
    from dppo_megatron.rollout.servers import post_json

    update = {"model_path": str(models[1]), "weight_version": "9"}
    for key in (None, "wrong", KEYS.api_key):
        answer = post_json(server + "/update_weights_from_disk", update, 300, key=key)
        assert answer == {"success": False, "message": "HTTP 401: Unauthorized"}, answer
    for key in (None, "wrong", KEYS.admin_api_key):  # the admin key does not open /generate
        answer = post_json(server + "/generate", {"input_ids": [5, 17], "sampling_params": {"max_new_tokens": 1}},
                           300, key=key)
        assert answer == {"success": False, "message": "HTTP 401: Unauthorized"}, answer
    with pytest.raises(urllib.error.HTTPError, match="401"):
        server_release(server)
    assert is_healthy(server)
    assert_serves(server, models[0], "0")


def preflight(run_dir, *overrides: str) -> tuple[list[str], list[dict]]:
    """`dppo-megatron preflight` of the quickstart: its verdict lines and the two steps' metrics."""
    from tests.test_preflight import QUICKSTART, REPO, verdict_lines

    result = subprocess.run([sys.executable, "-m", "dppo_megatron", "preflight", str(QUICKSTART), "--run-dir",
                             str(run_dir), "rollout.weight_sync=distributed", f"rollout.base_port={free_port()}",
                             *overrides], capture_output=True, text=True, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return verdict_lines(result.stdout), read_metrics(run_dir)


def test_the_quickstart_preflight_trains_on_the_real_server_with_the_embedded_engines_mismatch(sglang_python,
                                                                                              tmp_path):
    """Two steps of the quickstart (EP=2 learner, R3 on, float32, one mini-batch) with its rollouts
    from a real SGLang server and the weights broadcast inside SGLang's session after each step,
    as `preflight` runs them; the same on the embedded engine beside it. The learner-vs-engine
    mismatch (train/mismatch_tv) is float32 noise with SGLang as with the engine, before and after
    the sync: the weights SGLang serves are the learner's."""
    lines, metrics = {}, {}
    for engine, overrides in {"sglang": ["rollout.engine=sglang", f"rollout.sglang_python={sglang_python}",
                                         f"rollout.extra_args={json.dumps(CPU_SERVER_ARGS)}"],  # all strings
                              "embedded": []}.items():
        lines[engine], metrics[engine] = preflight(tmp_path / engine, *overrides)
    assert lines["sglang"][0].startswith("ok    1 sglang server(s) of the supported release, rollouts")
    for engine in ("sglang", "embedded"):
        assert any(line.startswith("ok    weight sync by broadcast, inside SGLang's weight-update session")
                   for line in lines[engine]), lines[engine]
        assert lines[engine][-1] == "preflight passed: the job can start", lines[engine]
    mismatch = {engine: [m["train/mismatch_tv"] for m in steps] for engine, steps in metrics.items()}
    print("train/mismatch_tv by step:", json.dumps(mismatch))
    # Measured: about 5.5e-9 with SGLang, 6.2e-9 with the embedded engine; a server left on the
    # weights of the step before shows the probe step, about 5e-3.
    assert max(mismatch["sglang"]) < 1e-6 and max(mismatch["embedded"]) < 1e-6, mismatch
    assert [m["train/routing_agreement"] for m in metrics["sglang"]] == [1.0, 1.0]  # R3: SGLang's routes
