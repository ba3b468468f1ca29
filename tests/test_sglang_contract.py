"""Contract tests: the project against SGLang's own code (the pinned release, see
tests/sglang_contract.py), not against the embedded engine, which shares our assumptions."""

import json
import os
import subprocess
import sys

import torch

from dppo_megatron.processes import free_port
from tests.sglang_contract import run_with_sglang

# SGLang's receiver, as its weight updater runs it (model_runner_components/weight_updater.py:
# init_weights_update_group, then receive_weights_from_distributed): its own group constructor,
# then one torch.distributed.broadcast from rank 0 per tensor announced.
SGLANG_RECEIVER = """
import json, sys, torch
from sglang.srt.utils.common import init_custom_process_group
port, group_name, manifest, out = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
group = init_custom_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=1,
                                  group_name=group_name, timeout=__import__("datetime").timedelta(seconds=30))
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
group = weight_update_group("127.0.0.1", port, 0, 2, group_name, timeout=30)
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
                                  group_name=group_name, timeout=__import__("datetime").timedelta(seconds=30))
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
group = weight_update_group("127.0.0.1", port, 0, 2, group_name, timeout=30)
broadcast_from_first(group, flat)
sys.stdin.readline()  # as in a run: the group is closed once the server has answered
destroy_weight_update_group(group)
"""


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
        receiver_out, _ = sglang.communicate(timeout=120)
        sender_out, _ = ours.communicate("done\n", timeout=120)  # the server is done: close the group
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


SGLANG_PARSES = """
import argparse, json, sys
from sglang.srt.server_args import ServerArgs
for name, argv in json.loads(sys.stdin.read()):
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    try:
        args = ServerArgs.from_cli_args(parser.parse_args(argv))
    except SystemExit:
        sys.exit(f"{name}: SGLang refused {argv}")
    print(json.dumps([name, args.weight_version, args.enable_return_routed_experts, args.enable_deterministic_inference,
                      args.tp_size, args.port]))
"""


def test_every_sglang_command_line_of_the_shipped_recipes_parses_with_sglangs_server_args(tmp_path):
    """For every shipped recipe that runs SGLang, R3 on and off (MoE) and with deterministic
    inference: the command line the project builds is what SGLang's own ServerArgs reads, with
    the weight version the trainer counts."""
    from pathlib import Path

    from dppo_megatron.config.validate import load_recipe, recipe_arch
    from dppo_megatron.rollout.servers import server_command
    from dppo_megatron.run.placement import server_specs

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*/*.yaml"))
    lines, expected = [], []
    for path in recipes:
        shipped = load_recipe(path)
        if shipped.rollout.engine != "sglang":
            continue
        variants = [[f"rollout.r3={r3}"] for r3 in (("true", "false") if recipe_arch(shipped).is_moe else ("false",))]
        for overrides in variants + [["rollout.deterministic=true"]]:  # R3 needs a MoE model
            recipe = load_recipe(path, overrides)
            for spec in server_specs(recipe, tmp_path):
                command = server_command(spec)
                assert command[1:3] == ["-m", "sglang.launch_server"]
                lines.append([f"{path.parent.name}/{path.name} {' '.join(overrides)}", command[3:]])
                expected.append([lines[-1][0], "0", spec.routed_experts, spec.deterministic, spec.tp, spec.port])
    assert len({name for name, _ in lines}) == 25  # 7 MoE recipes with R3 on and off, 2 dense, 9 deterministic
    parser = run_with_sglang(SGLANG_PARSES)
    output, _ = parser.communicate(json.dumps(lines), timeout=300)
    assert parser.returncode == 0, output[-3000:]
    parsed = [json.loads(line) for line in output.splitlines() if line.startswith("[")]
    assert parsed == expected
