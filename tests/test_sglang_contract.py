"""Contract tests: the project against SGLang's own code (the pinned release, see
tests/sglang_contract.py), not against the embedded engine, which shares our assumptions."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dppo_megatron.processes import free_port
from tests.sglang_contract import SGLangWorker, run_with_sglang

# SGLang's receiver, as its weight updater runs it (model_runner_components/weight_updater.py:
# init_weights_update_group, then receive_weights_from_distributed): its own group constructor,
# then one torch.distributed.broadcast from rank 0 per tensor announced.
SGLANG_RECEIVER = """
import json, sys, torch
from sglang.srt.utils.common import init_custom_process_group
port, group_name, manifest, out = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
group = init_custom_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=1,
                                  group_name=group_name, timeout=__import__("datetime").timedelta(seconds=180))
received = {}
for name, dtype, shape in manifest:
    tensor = torch.empty(shape, dtype=getattr(torch, dtype))
    torch.distributed.broadcast(tensor, src=0, group=group, async_op=True).wait()
    received[name] = tensor
torch.save(received, out)
torch.distributed.destroy_process_group(group)
"""

# The project's sender, as a learner rank under torchrun runs it (torchrun's agent-store
# setting included, which torch's own tcp:// rendezvous would obey).
PROJECT_SENDER = """
import sys, torch
from dppo_megatron.rollout.weight_sync import broadcast_from_first, destroy_weight_update_group, weight_update_group
port, group_name, tensors = int(sys.argv[1]), sys.argv[2], torch.load(sys.argv[3])
group = weight_update_group("127.0.0.1", port, 0, 2, group_name, timeout=180)
for tensor in tensors.values():
    broadcast_from_first(group, tensor)
sys.stdin.readline()  # as in a run: the group is closed once the server has answered
destroy_weight_update_group(group)
"""


# SGLang's receiver for load_format "flattened_bucket" (weight_updater.py:
# _receive_bucketed_weights_from_distributed): its own bucket layout, one broadcast.
SGLANG_FLAT_RECEIVER = """
import json, sys, torch
from sglang.srt.utils.common import init_custom_process_group
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
port, group_name, manifest, out = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
group = init_custom_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=1,
                                  group_name=group_name, timeout=__import__("datetime").timedelta(seconds=180))
order = json.loads(sys.stdin.readline())  # the sender's order of the bucket
names = [name for name in order]
kinds = {name: (dtype, shape) for name, dtype, shape in manifest}
bucket = FlattenedTensorBucket.empty(names, [kinds[n][0] for n in names], [kinds[n][1] for n in names], "cpu")
torch.distributed.broadcast(bucket.get_flattened_tensor(), src=0, group=group)
torch.save({name: tensor.clone() for name, tensor in bucket.reconstruct_tensors()}, out)
torch.distributed.destroy_process_group(group)
"""

PROJECT_FLAT_SENDER = """
import json, sys, torch
from dppo_megatron.rollout.weight_sync import (
    broadcast_from_first, destroy_weight_update_group, flatten_bucket, weight_update_group)
port, group_name, tensors = int(sys.argv[1]), sys.argv[2], torch.load(sys.argv[3])
ordered, flat = flatten_bucket(list(tensors.items()))
print(json.dumps([name for name, _ in ordered]), flush=True)
group = weight_update_group("127.0.0.1", port, 0, 2, group_name, timeout=180)
broadcast_from_first(group, flat)
sys.stdin.readline()  # as in a run: the group is closed once the server has answered
destroy_weight_update_group(group)
"""


@pytest.fixture(scope="module")
def sglang(tmp_path_factory):
    """SGLang's own code, imported once for the tests that need only its Python."""
    worker = SGLangWorker(tmp_path_factory.mktemp("sglang") / "worker.log")
    yield worker
    worker.close()


def sync_through_sglang(tmp_path, tensors: dict, receiver: str, sender: str) -> dict:
    """Run the project's `sender` against SGLang's `receiver` (gloo, two processes); what arrived."""
    torch.save(tensors, tmp_path / "sent.pt")
    manifest = [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in tensors.items()]
    port, group_name = free_port(), "dppo-weights-r0"
    sglang = run_with_sglang(receiver, str(port), group_name, json.dumps(manifest), str(tmp_path / "got.pt"))
    ours = subprocess.Popen([sys.executable, "-c", sender, str(port), group_name, str(tmp_path / "sent.pt")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, TORCHELASTIC_USE_AGENT_STORE="True"))
    try:
        if sender is PROJECT_FLAT_SENDER:  # the order the sender flattened in, as its request body names it
            sglang.stdin.write(ours.stdout.readline())
            sglang.stdin.flush()
        receiver_out, _ = sglang.communicate(timeout=300)
        sender_out, _ = ours.communicate("done\n", timeout=300)  # the server is done: close the group
    finally:
        for process in (ours, sglang):
            if process.poll() is None:
                process.kill()
    assert ours.returncode == 0 and sglang.returncode == 0, f"sender:\n{sender_out}\nSGLang:\n{receiver_out}"
    return torch.load(tmp_path / "got.pt")


def assert_bit_identical(got: dict, sent: dict) -> None:
    assert sorted(got) == sorted(sent)
    for name, tensor in sent.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8))


def bucket_of_four_dtypes() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"model.norm.weight": torch.randn(5, generator=generator).half(),  # odd sizes: alignment matters
            "model.embed_tokens.weight": torch.randn(7, 5, generator=generator),
            "model.layers.0.mlp.experts.3.down_proj.weight": torch.randn(3, 5, generator=generator).bfloat16(),
            "counts": torch.arange(6, dtype=torch.int64).view(2, 3)}


def test_a_flattened_bucket_from_the_sender_is_what_sglangs_flattened_bucket_receiver_rebuilds(tmp_path):
    tensors = bucket_of_four_dtypes()
    assert_bit_identical(sync_through_sglang(tmp_path, tensors, SGLANG_FLAT_RECEIVER, PROJECT_FLAT_SENDER), tensors)


def test_the_weight_sender_forms_a_group_with_sglangs_own_receiver_and_a_bucket_arrives_bit_identical(tmp_path):
    tensors = bucket_of_four_dtypes()
    assert_bit_identical(sync_through_sglang(tmp_path, tensors, SGLANG_RECEIVER, PROJECT_SENDER), tensors)


# Read as `sglang.launch_server` reads its command line (prepare_server_args: --config merged in).
SGLANG_PARSES = """
import json, sys
from sglang.srt.server_args import prepare_server_args
for name, argv in json.loads(sys.stdin.read()):
    try:
        args = prepare_server_args(argv)
    except SystemExit:
        sys.exit(f"{name}: SGLang refused {argv}")
    print(json.dumps([name, args.weight_version, args.enable_return_routed_experts, args.enable_deterministic_inference,
                      args.tp_size, args.port, args.dtype, args.quantization, args.api_key, args.admin_api_key,
                      args.enable_memory_saver]))
"""


def test_every_sglang_command_line_of_the_shipped_recipes_parses_with_sglangs_server_args(sglang, tmp_path):
    """For every shipped recipe that runs SGLang, R3 on and off (MoE), with deterministic
    inference and with FP8 weights: the command line the project builds is what SGLang's own
    ServerArgs reads, with the weight version the trainer counts and the run's two keys, which
    SGLang takes from the key file (--config), not from the command line; colocated servers with
    the memory saver their release and resume need."""
    from pathlib import Path

    from dppo_megatron.config.validate import load_recipe, recipe_arch
    from dppo_megatron.keys import KEYS_FILE, make_keys_file, read_keys
    from dppo_megatron.rollout.servers import server_command
    from dppo_megatron.run.placement import server_specs

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*/*.yaml"))
    keys = read_keys(make_keys_file(tmp_path / KEYS_FILE))
    lines, expected = [], []
    for path in recipes:
        shipped = load_recipe(path)
        if shipped.rollout.engine != "sglang":
            continue
        variants = [[f"rollout.r3={r3}"] for r3 in (("true", "false") if recipe_arch(shipped).is_moe else ("false",))]
        for overrides in variants + [["rollout.deterministic=true"], ["rollout.dtype=float8"]]:  # R3 needs a MoE model
            recipe = load_recipe(path, overrides)
            for spec in server_specs(recipe, tmp_path):
                command = server_command(spec)
                assert command[1:3] == ["-m", "sglang.launch_server"]
                assert keys.api_key not in " ".join(command) and keys.admin_api_key not in " ".join(command)
                lines.append([f"{path.parent.name}/{path.name} {' '.join(overrides)}", command[3:]])
                float8 = spec.dtype == "float8"  # SGLang's FP8 weights: --quantization fp8, the dtype left auto
                expected.append([lines[-1][0], "0", spec.routed_experts, spec.deterministic, spec.tp, spec.port,
                                 "auto" if float8 or spec.dtype is None else spec.dtype, "fp8" if float8 else None,
                                 keys.api_key, keys.admin_api_key, spec.memory_saver])
    # 20 MoE recipes with R3 on and off (one colocated), 6 dense; 26 deterministic, 26 with FP8 weights
    assert len({name for name, _ in lines}) == 20 * 4 + 6 * 3
    assert any(memory_saver for *_, memory_saver in expected)
    code, output = sglang.run(SGLANG_PARSES, stdin=json.dumps(lines))
    assert code == 0, output[-3000:]
    parsed = [json.loads(line) for line in output.splitlines() if line.startswith("[")]
    assert parsed == expected


SGLANG_PARSE_ERROR = """
import contextlib, io, sys
from sglang.srt.server_args import prepare_server_args
words = io.StringIO()
with contextlib.redirect_stderr(words):
    try:
        prepare_server_args(["--model-path", "m", "--config", sys.argv[1]])
        print("parsed")
    except SystemExit:
        print(words.getvalue())
"""


def test_a_key_starting_with_a_dash_is_refused_by_us_as_sglangs_parser_refuses_it(sglang, tmp_path):
    """SGLang turns its --config file into `--api-key VALUE` for argparse: a value starting with
    "-" reads as an option and the server does not start. The run's own keys are hex; a user's
    key file with such a key is refused when it is read, naming the field."""
    import yaml

    from dppo_megatron.keys import KeyFileError, make_keys_file, read_keys

    dashed = tmp_path / "dashed.yaml"
    dashed.write_text(yaml.safe_dump({"api-key": "-Xb2k", "admin-api-key": "ok-key"}))
    dashed.chmod(0o600)
    code, output = sglang.run(SGLANG_PARSE_ERROR, str(dashed))
    assert code == 0 and "argument --api-key: expected one argument" in output, output[-2000:]
    with pytest.raises(KeyFileError, match=r"api-key starts with '-'"):
        read_keys(dashed)
    made = read_keys(make_keys_file(tmp_path / "keys.yaml"))
    assert all(len(key) == 64 and set(key) <= set("0123456789abcdef") for key in (made.api_key, made.admin_api_key))


# SGLang reads each body as its HTTP server does (entrypoints/http_server.py): FastAPI validates
# it against the endpoint's type (pydantic; fields it does not know are dropped without a word,
# so they are refused here), /generate's bodies also pass SGLang's API contract gate, then
# TokenizerManager's normalisation, one sub-request per prompt and SamplingParams built, normalised
# and verified against the model's vocabulary. What SGLang understood comes back for each request.
SGLANG_READS_BODIES = """
import dataclasses, json, sys, msgspec
from pydantic import TypeAdapter
from sglang.srt.entrypoints.api_contract import generate_contract_error
from sglang.srt.managers import io_struct
from sglang.srt.sampling.sampling_params import TOP_K_ALL, SamplingParams
ENDPOINTS = {"/generate": io_struct.GenerateReqInput,
             "/update_weights_from_disk": io_struct.UpdateWeightFromDiskReqInput,
             "/init_weights_update_group": io_struct.InitWeightsUpdateGroupReqInput,
             "/update_weights_from_distributed": io_struct.UpdateWeightsFromDistributedReqInput,
             "/destroy_weights_update_group": io_struct.DestroyWeightsUpdateGroupReqInput,
             "/release_memory_occupation": io_struct.ReleaseMemoryOccupationReqInput,
             "/resume_memory_occupation": io_struct.ResumeMemoryOccupationReqInput,
             "/begin_weight_update": io_struct.BeginWeightUpdateReqInput}
for name, path, body, vocab_size in json.loads(sys.stdin.read()):
    kind = ENDPOINTS[path]
    fields = ({f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind)
              else {f.name for f in msgspec.structs.fields(kind)})
    if set(body) - fields:
        sys.exit(f"{name}: SGLang's {kind.__name__} has no field {sorted(set(body) - fields)} (dropped silently)")
    request = TypeAdapter(kind).validate_python(body)
    if path != "/generate":
        print(json.dumps([name, {key: msgspec.to_builtins(getattr(request, key)) for key in body}]))
        continue
    error = generate_contract_error(body)
    if error:
        sys.exit(f"{name}: SGLang's API contract refuses the body: {error}")
    request.normalize_batch_and_arguments()
    understood = []
    for item in ([request] if request.is_single else [request[i] for i in range(request.batch_size)]):
        params = SamplingParams(**item.sampling_params)
        params.normalize(None)
        params.verify(vocab_size)
        understood.append({"rid": item.rid, "input_ids": item.input_ids, "return_logprob": item.return_logprob,
                           "logprob_start_len": item.logprob_start_len, "top_logprobs_num": item.top_logprobs_num,
                           "flat_b64": item.return_flat_raw_output_top_logprobs and item.return_flat_raw_top_logprobs_b64,
                           "return_routed_experts": item.return_routed_experts, "stream": item.stream,
                           "max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                           "top_p": params.top_p, "top_k": "all" if params.top_k == TOP_K_ALL else params.top_k,
                           "min_p": params.min_p, "stop_token_ids": sorted(params.stop_token_ids or []), "ignore_eos": params.ignore_eos,
                           "skip_special_tokens": params.skip_special_tokens, "no_stop_trim": params.no_stop_trim,
                           "sampling_seed": params.sampling_seed})
    print(json.dumps([name, understood]))
"""


def read_by_sglang(sglang, bodies: list) -> dict:
    """[name, endpoint, body, vocab size] -> {name: what SGLang understood}; fails with SGLang's reason."""
    code, output = sglang.run(SGLANG_READS_BODIES, stdin=json.dumps(bodies))
    assert code == 0, output[-3000:]
    return dict(json.loads(line) for line in output.splitlines() if line.startswith("["))


def shipped_recipes():
    from pathlib import Path

    from dppo_megatron.config.validate import load_recipe

    for path in sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*/*.yaml")):
        yield f"{path.parent.name}/{path.name}", path, load_recipe(path)


def test_every_request_body_the_trainer_sends_is_read_by_sglangs_own_code_as_meant(sglang, tmp_path):
    """Every /generate body of every shipped recipe (R3 on and off, one prompt and a batch, a
    retry's fresh rids, top-K as JSON or base64) and every weight-update body: SGLang's schema
    takes it, knows every field, and understands the rid, prompt, top-K, routes and sampling
    (the seed included) as the trainer means them."""
    from dataclasses import replace

    from dppo_megatron.config.validate import load_recipe, recipe_arch
    from dppo_megatron.rollout.client import Request, chunk_request
    from dppo_megatron.rollout.weight_sync import DiskWeightSync, DistributedWeightSync, memory_body
    from dppo_megatron.run.configs import client_config, routing_shape, sampling_params, topk_of

    bodies, meant = [], {}
    for name, path, shipped in shipped_recipes():
        arch = recipe_arch(shipped)
        for r3 in ((True, False) if arch.is_moe else (False,)):
            recipe = load_recipe(path, [f"rollout.r3={str(r3).lower()}"])
            params = sampling_params(recipe, eos_token_id=arch.vocab_size - 1)
            topk, routing, topk_b64 = topk_of(recipe), routing_shape(recipe, arch), client_config(recipe.rollout).topk_b64
            chunk = [Request(f"step3-p{i}-r1", [5 + i, 9, 2][: 2 + i], replace(params, sampling_seed=1000 + i),
                             topk, routing) for i in range(2)]
            for label, requests, flat, attempt in (("one", chunk[:1], topk_b64, 1), ("batch", chunk, topk_b64, 1),
                                                   ("retry", chunk[:1], topk_b64, 2), ("json", chunk, False, 1)):
                case = f"{name} r3={r3} {label}"
                bodies.append([case, "/generate", chunk_request(requests, topk_b64=flat, attempt=attempt),
                               arch.vocab_size])
                meant[case] = [{
                    "rid": r.rid if attempt == 1 else f"{r.rid}~{attempt}", "input_ids": r.prompt_ids,
                    "return_logprob": True, "logprob_start_len": -1, "top_logprobs_num": topk,
                    "flat_b64": bool(topk and flat), "return_routed_experts": routing is not None, "stream": False,
                    "max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                    "top_p": params.top_p, "top_k": "all" if params.top_k == -1 else params.top_k, "min_p": params.min_p,
                    "stop_token_ids": [arch.vocab_size - 1], "ignore_eos": False, "skip_special_tokens": False,
                    "no_stop_trim": True, "sampling_seed": r.params.sampling_seed} for r in requests]
    assert len(meant) == 4 * 52  # 29 recipes: 23 MoE (the three tiny ones too) with R3 on and off, 6 dense
    disk = DiskWeightSync(tmp_path / "weights")
    sync = DistributedWeightSync(["http://a:1", "http://b:2"], master_address="10.0.0.1", master_port=29600,
                                 server_tp=[2, 1], backend="nccl")
    bucket = list(bucket_of_four_dtypes().items())
    weight_bodies = {"disk": ("/update_weights_from_disk", disk.update_body(7)),
                     "init 0": ("/init_weights_update_group", sync.init_bodies()[0]),
                     "init 1": ("/init_weights_update_group", sync.init_bodies()[1]),
                     "update": ("/update_weights_from_distributed", sync.update_body(bucket, 7)),
                     "update per tensor": ("/update_weights_from_distributed",
                                           replace_flattened(sync, False).update_body(bucket, 7)),
                     "destroy": ("/destroy_weights_update_group", sync.destroy_body()),
                     "release": ("/release_memory_occupation", memory_body()),
                     "resume": ("/resume_memory_occupation", memory_body()),
                     "begin": ("/begin_weight_update", {"selector": "all"})}
    bodies += [[case, endpoint, body, 0] for case, (endpoint, body) in weight_bodies.items()]

    understood = read_by_sglang(sglang, bodies)
    for case, requests in meant.items():
        assert understood[case] == requests, case
    for case, (_, body) in weight_bodies.items():
        assert understood[case] == body, case  # every field kept, with its value and type
    assert understood["init 1"]["rank_offset"] == 3 and understood["update"]["load_format"] == "flattened_bucket"
    assert "load_format" not in understood["update per tensor"]


# SGLang reads a tensor update as its HTTP server and scheduler do: the body against its
# UpdateWeightsFromTensorReqInput, the payloads normalised (tokenizer manager), the TP rank's own
# one deserialised with MultiprocessingSerializer (its safe unpickler) with SGLang's patched
# reductions (tp_worker), the flattened bucket rebuilt (model runner's weight updater).
SGLANG_READS_TENSORS = """
import json, sys
import torch
from pydantic import TypeAdapter
from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput
from sglang.srt.utils.common import MultiprocessingSerializer, normalize_serialized_named_tensor_payloads
from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata
body = json.loads(sys.stdin.read())
request = TypeAdapter(UpdateWeightsFromTensorReqInput).validate_python(body)
payloads = normalize_serialized_named_tensor_payloads(request.serialized_named_tensors)
monkey_patch_torch_reductions()
for tp_rank, payload in enumerate(payloads):
    bucket = MultiprocessingSerializer.deserialize(payload)
    metadata = [FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                        end_idx=m.end_idx, numel=m.numel) for m in bucket["metadata"]]
    tensors = FlattenedTensorBucket(flattened_tensor=bucket["flattened_tensor"], metadata=metadata).reconstruct_tensors()
    print(json.dumps([tp_rank, request.load_format, request.weight_version, request.flush_cache,
                      [[name, str(t.dtype), list(t.shape), t.double().flatten().tolist()] for name, t in tensors]]))
"""


def test_a_tensor_update_by_handle_is_read_by_sglangs_own_code_to_the_same_tensors(sglang):
    """The /update_weights_from_tensor body the publisher posts for a server of TP 2 (a payload
    per TP rank, made in shared memory of this process, which keeps it meanwhile): SGLang's own
    request type takes it, and each TP rank's payload opens with SGLang's serializer to the same
    names, dtypes, shapes and values (bit for bit, four dtypes: each tensor starts aligned)."""
    from dppo_megatron.rollout.tensor_handles import LOAD_FORMAT, bucket_payload, shared_bucket
    from dppo_megatron.rollout.weight_sync import TensorWeightSync

    sent = bucket_of_four_dtypes()
    flat, metadata = shared_bucket(list(sent.items()))
    body = TensorWeightSync.update_body([bucket_payload(flat, metadata) for _ in range(2)], 7)  # one per rank
    code, output = sglang.run(SGLANG_READS_TENSORS, stdin=json.dumps(body))
    assert code == 0, output[-3000:]
    read = [json.loads(line) for line in output.splitlines() if line.startswith("[")]
    assert [rank for rank, *_ in read] == [0, 1]
    for _, load_format, version, flush, tensors in read:
        assert (load_format, version, flush) == (LOAD_FORMAT, "7", True)
        assert sorted(name for name, *_ in tensors) == sorted(sent)
        for name, dtype, shape, values in tensors:
            expected = sent[name]
            assert dtype == str(expected.dtype) and shape == list(expected.shape), name
            assert torch.equal(torch.tensor(values, dtype=torch.float64).reshape(shape).to(expected.dtype), expected), name
    del flat  # only now: SGLang's side opened it while this process held it


def replace_flattened(sync, flattened: bool):
    sync = __import__("copy").copy(sync)
    sync.flattened = flattened
    return sync


# A finished /generate response as SGLang builds it (managers/tokenizer_manager.py,
# _handle_batch_output for a BatchStrOutput): the request parsed and normalised as the server
# does, the scheduler's output in SGLang's own BatchStrOutput, finish reasons from its FINISH_*
# classes, routes base64-encoded by its detokenizer, logprobs and top-K (nested or flat base64)
# converted by TokenizerManager.convert_logprob_style, serialised by its JSON response encoder;
# SGLang's own response schema must take the result.
SGLANG_BUILDS_RESPONSES = """
import json, sys, torch
from pydantic import TypeAdapter
from sglang.api.v1.api_types import GenerateResponse
from sglang.srt.managers.detokenizer_manager import DetokenizerManager
from sglang.srt.managers.io_struct import BatchStrOutput, GenerateReqInput
from sglang.srt.managers.schedule_batch import FINISH_LENGTH, FINISH_MATCHED_TOKEN
from sglang.srt.managers.tokenizer_manager import ReqState, TokenizerManager
from sglang.srt.utils.json_response import dumps_json
manager = object.__new__(TokenizerManager)  # its logprob conversion reads only the tokenizer, unused here
manager.tokenizer = None
for case in json.loads(sys.stdin.read()):
    request = TypeAdapter(GenerateReqInput).validate_python(case["body"])
    request.normalize_batch_and_arguments()
    state = ReqState(out_list=[], finished=False, event=None, obj=request, time_stats=None)
    kind, value = case["finish"]
    finish = (FINISH_MATCHED_TOKEN(matched=value) if kind == "stop" else FINISH_LENGTH(length=value)).to_json()
    routes = [None]
    if request.return_routed_experts:
        routes = DetokenizerManager._b64_encode_per_request([torch.tensor(case["routes"], dtype=torch.int32)])
    top = request.top_logprobs_num > 0
    output_ids, n = case["output_ids"], len(case["output_ids"])
    recv = BatchStrOutput(
        rids=[request.rid], finished_reasons=[finish], output_strs=[""], output_ids=[output_ids],
        prompt_tokens=[len(request.input_ids)], completion_tokens=[n], reasoning_tokens=[0], cached_tokens=[0],
        input_token_logprobs_val=[], input_token_logprobs_idx=[], output_token_logprobs_val=[case["logprobs"]],
        output_token_logprobs_idx=[output_ids], input_top_logprobs_val=[], input_top_logprobs_idx=[],
        output_top_logprobs_val=[case["top_values"]] if top else None,
        output_top_logprobs_idx=[case["top_ids"]] if top else None, input_token_ids_logprobs_val=None,
        input_token_ids_logprobs_idx=None, output_token_ids_logprobs_val=None, output_token_ids_logprobs_idx=None,
        output_token_entropy_val=None, output_token_sampling_mask=None, output_hidden_states=None,
        routed_experts=routes, indexer_topk=None, placeholder_tokens_idx=None, placeholder_tokens_val=None)
    meta = {"id": request.rid, "finish_reason": recv.finished_reasons[0], "prompt_tokens": recv.prompt_tokens[0],
            "weight_version": case["weight_version"], "num_retractions": 0}
    manager.convert_logprob_style(meta, state, request.top_logprobs_num, request.token_ids_logprob, False, recv, 0,
                                  finished=True)
    meta.update(reasoning_tokens=0, completion_tokens=n, cached_tokens=0)
    if recv.routed_experts[0] is not None:
        meta["routed_experts"] = recv.routed_experts[0]
    body = dumps_json({"text": "", "output_ids": list(recv.output_ids[0]), "meta_info": meta})
    GenerateResponse.from_json_value(json.loads(body))
    print(json.dumps([case["name"], body.decode()]))
"""


def test_responses_built_by_sglangs_own_code_decode_to_what_the_engine_returned(sglang):
    """What the scheduler produced (tokens, logprobs, top-K as JSON triples or flat base64,
    routes, finish reason, version), passed through SGLang's own response code, is what the
    client decodes, to the bit of float32."""
    import numpy as np

    from dppo_megatron.rollout.client import Request, chunk_request
    from dppo_megatron.rollout.protocol import RoutingShape, SamplingParams, parse_generate_response

    rng = np.random.default_rng(0)
    prompt, output_ids, k, routing = [5, 9, 2], [7, 3, 11, 1], 3, RoutingShape(2, 2, 8)
    logprobs = -rng.random(len(output_ids)) * 3  # float64 from the sampler, as SGLang keeps them
    top_ids = [[token, (token + 1) % 16, (token + 5) % 16] for token in output_ids]
    for row in top_ids:
        rng.shuffle(row)  # the sampled token anywhere among the K
    top_values = np.sort(-rng.random((len(output_ids), k)) * 4, axis=1)[:, ::-1]
    routes = rng.integers(0, 8, (len(prompt) + len(output_ids) - 1, 2, 2))
    cases = {"top-K base64, routes, stop": (k, True, routing, ["stop", 1]),
             "top-K as JSON triples, length": (k, False, None, ["length", 4]),
             "no top-K, routes": (0, True, routing, ["stop", 1])}
    sent = []
    for name, (topk, b64, shape, finish) in cases.items():
        request = Request("step3-p0-r1", prompt, SamplingParams(sampling_seed=5), topk, shape)
        sent.append({"name": name, "body": chunk_request([request], topk_b64=b64), "output_ids": output_ids,
                     "logprobs": logprobs.tolist(), "top_ids": top_ids, "top_values": top_values.tolist(),
                     "routes": routes.tolist(), "finish": finish, "weight_version": "3"})
    code, output = sglang.run(SGLANG_BUILDS_RESPONSES, stdin=json.dumps(sent))
    assert code == 0, output[-3000:]
    bodies = dict(json.loads(line) for line in output.splitlines() if line.startswith("["))
    for name, (topk, b64, shape, finish) in cases.items():
        sample = parse_generate_response(json.loads(bodies[name]), rid="step3-p0-r1", prompt_ids=prompt, topk=topk,
                                         routing=shape)
        assert sample.response_ids == output_ids and sample.finish_reason == finish[0]
        assert sample.weight_version == "3"
        np.testing.assert_array_equal(sample.logprobs, logprobs.astype(np.float32))
        if topk:
            np.testing.assert_array_equal(sample.topk_ids, np.array(top_ids, dtype=np.int32))
            np.testing.assert_array_equal(sample.topk_logprobs, top_values.astype(np.float32))
        else:
            assert sample.topk_ids is None
        if shape is not None:
            np.testing.assert_array_equal(sample.routed_experts, routes)
        else:
            assert sample.routed_experts is None


# SGLang's verdict on a /generate body, step by step as its server takes it: Starlette's JSON
# parse, the API contract gate, FastAPI's validation of GenerateReqInput, normalisation, then
# per prompt SamplingParams built, normalised (no tokenizer: the project starts SGLang with
# --skip-tokenizer-init) and verified, and the tokenizer manager's length
# rules (tokenizer_manager.py, _validate_one_request, restated here: the method needs a running
# server around it).
SGLANG_JUDGES_BODIES = """
import json, sys
from pydantic import TypeAdapter
from sglang.srt.entrypoints.api_contract import generate_contract_error
from sglang.srt.managers.io_struct import GenerateReqInput
from sglang.srt.sampling.sampling_params import SamplingParams
vocab, context = int(sys.argv[1]), int(sys.argv[2])

def verdict(raw):
    try:
        body = json.loads(raw)
        error = generate_contract_error(body)
        if error:
            return "contract: " + error
        request = TypeAdapter(GenerateReqInput).validate_python(body)
        request.normalize_batch_and_arguments()
        for item in [request] if request.is_single else [request[i] for i in range(request.batch_size)]:
            params = SamplingParams(**item.sampling_params)
            params.normalize(None)
            params.verify(vocab)
            prompt = len(item.input_ids) if item.input_ids is not None else 0
            if prompt >= context:
                return "length: the input is longer than the context"
            asked = item.sampling_params.get("max_new_tokens")
            if asked is not None and prompt + asked > context:
                return "length: input + max_new_tokens exceed the context"
    except Exception as error:
        return f"{type(error).__name__}: {error}"[:300]
    return None

for name, raw in json.loads(sys.stdin.read()):
    print(json.dumps([name, verdict(raw)]))
"""


def engine_verdict(body: dict, vocab_size: int, context_len: int) -> str | None:
    """The embedded engine's reading of a body (what its server answers 400 with, or None)."""
    from dppo_megatron.rollout.engine_request import RequestError, parse_generate

    try:
        parse_generate(body, vocab_size=vocab_size, context_len=context_len, eos_token_ids={2}, routes_enabled=True)
    except RequestError as error:
        return str(error)
    return None


def test_the_embedded_engine_refuses_exactly_the_generate_bodies_sglangs_own_code_refuses(sglang):
    """For every body of tests/generate_bodies.py: SGLang refuses it if and only if the engine
    answers 400; what SGLang serves and the engine does not (UNSERVED), and what the engine
    checks and SGLang does not (STRICTER), SGLang does serve: should a release start refusing
    one, the test says so."""
    from tests.generate_bodies import BODIES, CONTEXT, STRICTER, UNSERVED, VOCAB

    corpus = {**BODIES, **UNSERVED, **STRICTER}
    code, output = sglang.run(SGLANG_JUDGES_BODIES, str(VOCAB), str(CONTEXT),
                              stdin=json.dumps([[name, json.dumps(body)] for name, (body, _) in corpus.items()]))
    assert code == 0, output[-3000:]
    verdicts = dict(json.loads(line) for line in output.splitlines() if line.startswith("["))
    assert set(verdicts) == set(corpus)
    engine = {name: engine_verdict(body, VOCAB, CONTEXT) for name, (body, _) in corpus.items()}
    disagreements = {name: (verdicts[name], engine[name]) for name in BODIES
                     if (verdicts[name] is None) != (engine[name] is None)}
    assert not disagreements, disagreements
    assert all(engine[name] is not None for name in [*UNSERVED, *STRICTER])
    assert {name: verdicts[name] for name in [*UNSERVED, *STRICTER] if verdicts[name] is not None} == {}


# Which layers SGLang's Qwen3-MoE model builds as MoE layers, from the config alone.
SGLANG_SPARSE_LAYERS = """
import json
from transformers import Qwen3MoeConfig
from sglang.srt.models.qwen3_moe import Qwen3MoeDecoderLayer
config = Qwen3MoeConfig(num_hidden_layers=4, mlp_only_layers=[1], decoder_sparse_step=2)
print(json.dumps([Qwen3MoeDecoderLayer.stage_facts(config, layer)[1].sparse for layer in range(4)]))
"""


def test_sglang_builds_every_qwen3_moe_layer_as_moe_so_a_model_with_dense_layers_is_refused_for_it(sglang):
    """SGLang's qwen3_moe.py ignores mlp_only_layers and decoder_sparse_step (transformers
    honours both): it would serve such a model without its dense MLPs. The recipe check refuses
    the pair; when a release honours them, this test fails, and the check can go."""
    from dppo_megatron.config import RecipeError, load_recipe
    from tests.train_runs import QUICKSTART

    code, output = sglang.run(SGLANG_SPARSE_LAYERS)
    assert code == 0, output
    assert json.loads(output.strip().splitlines()[-1]) == [True, True, True, True]
    with pytest.raises(RecipeError, match=r"layers \[1\] of this Qwen3-MoE model have a dense MLP"):
        load_recipe(QUICKSTART, ["rollout.engine=sglang", "model.random_init.mlp_only_layers=[1]"])
    load_recipe(QUICKSTART, ["model.random_init.mlp_only_layers=[1]"])  # the embedded engine serves them


SGLANG_ROUTES = """
import json
from sglang.srt.entrypoints import http_server
routes = {}
for route in http_server.app.routes:
    if hasattr(route, "methods") and route.methods:
        level = getattr(route.endpoint, "_auth_level", None)
        entry = routes.setdefault(route.path, {"methods": [], "auth": level.value if level is not None else "normal"})
        entry["methods"] += sorted(route.methods)
print(json.dumps(routes))
"""


def test_the_endpoint_table_in_the_docs_is_sglangs_and_names_every_endpoint_the_project_calls(sglang):
    import re
    from pathlib import Path

    code, output = sglang.run(SGLANG_ROUTES)
    assert code == 0, output
    routes = json.loads(output.strip().splitlines()[-1])
    repo = Path(__file__).resolve().parents[1]
    table = {}
    for line in (repo / "docs" / "rollout.md").read_text().splitlines():
        row = re.match(r"\| `(GET|POST) (/\w+)` \|[^|]+\|[^|]+\| `(\w+)` \|", line)
        if row:
            table[row.group(2)] = (row.group(1), row.group(3))
    assert len(table) >= 9, table
    for path, (method, auth) in table.items():
        assert path in routes, f"SGLang has no {path}"
        assert method in routes[path]["methods"] and auth == routes[path]["auth"], (path, routes[path])
    # Every SGLang endpoint named in the project's code (the embedded engine's own server aside).
    named = set()
    for source in (repo / "dppo_megatron").rglob("*.py"):
        if source.name not in ("server.py", "engine.py", "engine_request.py"):
            named |= set(re.findall(r'"(/\w+)"', source.read_text()))
    assert sorted(named & set(routes)) == sorted(table), "docs/rollout.md's endpoint table"
