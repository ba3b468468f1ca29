"""Colocated runs (rollout.colocate): the embedded engine releases and resumes its memory as
SGLang's memory saver does and takes weights by handle (/update_weights_from_tensor), answering
each call as SGLang's own scheduler does. The colocated quickstart end to end:
tests/test_train.py; the publisher by handle: tests/test_embedded_engine.py; SGLang's request
types and serializer: tests/test_sglang_contract.py."""

import base64
import json
import os
import pickle

import torch

from dppo_megatron.model.arch import small_hf_config
from dppo_megatron.rollout.protocol import OUTSIDE_SESSION
from dppo_megatron.rollout.tensor_handles import bucket_payload, shared_bucket
from dppo_megatron.rollout.weight_sync import TensorWeightSync
from tests.test_embedded_engine import PROMPT, get, post, running_server
from tests.tiny_models import teacher_forced


def make_model(directory, seed: int):
    """A Qwen3-MoE of ~90 MB of float32 weights (most in the embedding and output layer, fused
    experts too): enough for the engine's resident memory to show what release frees."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = small_hf_config(moe=True, vocab_size=32768, hidden_size=256, num_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=64, intermediate_size=512, init_std=0.02,
                             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.save_pretrained(directory)
    return directory


def resident_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def server_pid(url: str) -> int:
    port = url.rsplit(":", 1)[1]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"serve-embedded" in command and port.encode() in command:
            return int(pid)
    raise AssertionError(f"no engine process on port {port}")


def generated(url: str) -> tuple[int, dict]:
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4, "sampling_seed": 3}, "return_logprob": True}
    return post(url, "/generate", body)


def hand_over(url: str, named: list, version: int) -> tuple[int, dict]:
    """One bucket by handle, in a session of its own; the bucket is held until the answer."""
    flat, metadata = shared_bucket(named)
    assert post(url, "/begin_weight_update", {"selector": "all"})[1]["success"]
    answer = post(url, "/update_weights_from_tensor", TensorWeightSync.update_body([bucket_payload(flat, metadata)],
                                                                                   version))
    assert post(url, "/end_weight_update", {})[1]["success"]
    return answer


class RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_release_frees_the_weights_memory_and_resumed_weights_serve_only_once_an_update_by_handle_fills_them(
        tmp_path):
    from safetensors.torch import load_file

    old, new = make_model(tmp_path / "v0", seed=0), make_model(tmp_path / "v1", seed=1)
    new_tensors = sorted(load_file(str(new / "model.safetensors")).items())
    weight_bytes = sum(t.numel() * t.element_size() for _, t in new_tensors)
    with running_server(old) as url:
        pid = server_pid(url)
        assert generated(url)[0] == 200
        resident = resident_bytes(pid)
        status, answer = post(url, "/release_memory_occupation", {"tags": ["weights", "kv_cache"]})
        assert (status, answer) == (200, None)  # SGLang's answer to a success
        released = resident_bytes(pid)
        assert resident - released >= 0.9 * weight_bytes, (resident, released, weight_bytes)
        assert json.loads(get(url, "/server_info")[1])["memory_released"] == ["kv_cache", "weights"]
        status, answer = generated(url)
        assert status == 400 and answer["error"]["message"].startswith("memory released (kv_cache, weights)")
        assert hand_over(url, new_tensors, 1)[1]["message"] == "the weights are released: /resume_memory_occupation first"

        assert post(url, "/resume_memory_occupation", {"tags": ["weights", "kv_cache"]}) == (200, None)
        status, answer = post(url, "/resume_memory_occupation", {})
        assert status == 400 and "not released" in answer["error"]["message"]
        status, answer = post(url, "/update_weights_from_tensor", TensorWeightSync.update_body(["e30="], 1))
        assert status == 400 and answer["message"] == OUTSIDE_SESSION.format("update_weights_from_tensor")
        # Half the tensors: the engine will not serve a model that is partly empty memory.
        assert hand_over(url, new_tensors[: len(new_tensors) // 2], 1)[1]["success"]
        status, answer = generated(url)
        assert status == 400 and "tensors have not been loaded since" in answer["error"]["message"]
        assert hand_over(url, new_tensors[len(new_tensors) // 2:], 2)[1]["success"]

        status, answer = generated(url)
        assert status == 200 and answer["meta_info"]["weight_version"] == "2"
        served = torch.tensor([entry[0] for entry in answer["meta_info"]["output_token_logprobs"]])
        expected, _ = teacher_forced(new, PROMPT, answer["output_ids"], 1.0)
        assert (expected - served).abs().max() < 1e-5  # the new weights, as transformers computes them
        assert resident_bytes(pid) - released >= 0.9 * weight_bytes  # the memory is back in use
        for tags, why in ((["weights", "optimizer"], "unknown memory tags ['optimizer']"), ("weights", "tags is a list")):
            status, answer = post(url, "/release_memory_occupation", {"tags": tags})
            assert status == 400 and why in answer["error"]["message"]
        assert generated(url)[0] == 200  # nothing was released

        # A payload is opened with only torch's tensor functions allowed: nothing else runs.
        trap = tmp_path / "ran"
        hostile = base64.b64encode(pickle.dumps({"flattened_tensor": RunsCode(trap), "metadata": []})).decode()
        assert post(url, "/begin_weight_update", {"selector": "all"})[1]["success"]
        status, answer = post(url, "/update_weights_from_tensor", TensorWeightSync.update_body([hostile], 3))
        post(url, "/end_weight_update", {})
        assert status == 400 and "may not load posix.system" in answer["message"] and not trap.exists()
        assert generated(url)[1]["meta_info"]["weight_version"] == "2"


def test_the_colocated_calls_are_answered_by_sglangs_own_scheduler_as_by_the_engine(tmp_path):
    """The calls of a colocated step (release, resume, begin, a tensor update by handle, end),
    and the same calls out of order, replayed through SGLang 0.5.23's scheduler (its weight
    updater and memory release over torch_memory_saver's stand-in) and sent to the embedded
    engine: the same success or failure for every call, and every tag SGLang paused is resumed."""
    from safetensors.torch import load_file

    from dppo_megatron.rollout.weight_sync import memory_body
    from tests.sglang_contract import SGLangWorker, replay_in_sglangs_scheduler
    from tests.tiny_models import make_moe

    model = make_moe(tmp_path / "m")
    flat, metadata = shared_bucket(sorted(load_file(str(model / "model.safetensors")).items()))

    def update():  # a payload per receiver
        return "/update_weights_from_tensor", TensorWeightSync.update_body([bucket_payload(flat, metadata)], 1)

    release, resume = ("/release_memory_occupation", memory_body()), ("/resume_memory_occupation", memory_body())
    begin, end = ("/begin_weight_update", {"selector": "all"}), ("/end_weight_update", {})
    sequences = {"a colocated step": lambda: [release, resume, begin, update(), end],
                 "resume first": lambda: [resume],
                 "an update outside the session": lambda: [release, resume, update(), begin, update(), end]}
    worker = SGLangWorker(tmp_path / "sglang.log")
    try:
        replays = replay_in_sglangs_scheduler(worker, [calls() for calls in sequences.values()])
    finally:
        worker.close()
    with running_server(model) as url:
        for (name, calls), replay in zip(sequences.items(), replays):
            engine = [post(url, path, body) for path, body in calls()]
            ours = [status == 200 and (answer is None or answer.get("success", False)) for status, answer in engine]
            assert ours == [answer["success"] for answer in replay["answers"]], (name, [a for _, a in engine])
            assert replay["paused"] == [], name  # every release resumed
        assert generated(url)[0] == 200
    assert replays[0]["versions"] == ["1"] and not replays[0]["session_open"]
