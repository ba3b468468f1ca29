"""Weight sync from the learner to a rollout server: disk, distributed and by handle, side by side.

    python benchmarks/weight_sync.py                 # a tiny and a mid-size (~0.5 GB) model
    python benchmarks/weight_sync.py --sizes tiny

For each model: a Megatron learner (one rank) holding random Qwen3-MoE weights, and the
embedded engine serving the same model. "disk" = gather + write an HF checkpoint + the server's
/update_weights_from_disk; "distributed" = gather + broadcast over a gloo group in 512 MiB
buckets + the server loading them (the group is formed once beforehand: its cost is shown
apart); "tensor" (colocated runs) = gather + each 512 MiB bucket copied into shared memory and
handed to the server by handle (/update_weights_from_tensor in a weight-update session), the
server copying it into its model. All end with the server serving the new weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from dppo_megatron.learner.model import build_model
from dppo_megatron.learner.parallel import init_parallel
from dppo_megatron.learner.weights import iter_hf_tensors, load_hf_weights, save_hf
from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.model.layout import ParallelLayout
from dppo_megatron.processes import free_port
from dppo_megatron.rollout.tensor_handles import BucketMemory, bucket_payload, in_buckets, shared_bucket
from dppo_megatron.rollout.weight_sync import (
    DiskWeightSync,
    DistributedWeightSync,
    TensorWeightSync,
    begin_weight_update,
    end_weight_update,
)

SIZES = {  # Qwen3-MoE-shaped configs
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_experts=4, moe_intermediate_size=32, vocab_size=1000),
    "mid": dict(hidden_size=768, num_hidden_layers=6, num_experts=8, moe_intermediate_size=512, vocab_size=32000),
}


def make_model(directory: Path, size: str) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    shape = SIZES[size]
    config = Qwen3MoeConfig(num_attention_heads=8, num_key_value_heads=4, head_dim=64 if size == "mid" else 16,
                            intermediate_size=4 * shape["hidden_size"], num_experts_per_tok=2, norm_topk_prob=True,
                            max_position_embeddings=4096, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).save_pretrained(directory)
    return directory


def start_server(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "dppo_megatron", "serve-embedded", "--model-path", str(model), "--port", str(port)]
    proc = subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}") from None
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def served_version(url: str) -> str:
    with urllib.request.urlopen(url + "/model_info", timeout=10) as response:
        return json.loads(response.read())["weight_version"]


def hand_over(model, arch: Qwen3Arch, url: str, version: int, memory: BucketMemory) -> int:
    """The weights to the server by handle, bucket by bucket, as the colocated publisher sends
    them (its buckets made in `memory`, as the publisher's are, version after version); returns
    the bytes handed over."""
    sync, handed = TensorWeightSync([url]), 0
    begin_weight_update([url])
    for bucket in in_buckets(iter_hf_tensors(model, arch), sync.bucket_bytes):
        flat, metadata = shared_bucket(bucket, memory)
        failed = sync.send({url: [bucket_payload(flat, metadata)]}, version)
        assert not failed, failed
        handed += flat.numel()
    assert not end_weight_update([url])
    return handed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            root = Path(tmp) / size
            hf = make_model(root / "hf", size)
            arch = Qwen3Arch.from_hf(hf)
            layout = ParallelLayout()
            init_parallel(layout, arch)
            model = build_model(arch, layout)
            load_hf_weights(model, arch, hf)
            params = sum(p.numel() for p in model.parameters())
            proc, url = start_server(hf, root / "server.log")
            try:
                disk = DiskWeightSync(root / "sync", keep=1)
                start = time.perf_counter()
                save_hf(model, arch, disk.version_dir(1), config=json.loads((hf / "config.json").read_text()),
                        dtype=torch.float32)
                disk.publish([url], 1)
                disk_seconds = time.perf_counter() - start
                disk_bytes = sum(f.stat().st_size for f in disk.version_dir(1).glob("*.safetensors"))
                assert served_version(url) == "1"

                seconds = {}
                for version, flattened in ((2, False), (3, True)):  # per-tensor broadcasts, then one per bucket
                    sync = DistributedWeightSync([url], master_address="127.0.0.1", master_port=free_port(),
                                                 group_name=f"dppo-weights-{version}", flattened=flattened)
                    start = time.perf_counter()
                    sync.connect()
                    connect_seconds = time.perf_counter() - start
                    start = time.perf_counter()
                    sent = sync.publish(iter_hf_tensors(model, arch), version)
                    seconds[flattened] = time.perf_counter() - start
                    sync.close()
                    assert served_version(url) == str(version)
                memory, handle_seconds = BucketMemory(), []
                for version in (4, 5):  # the first makes the publisher's shared segment, later ones reuse it
                    start = time.perf_counter()
                    handed = hand_over(model, arch, url, version, memory)
                    handle_seconds.append(time.perf_counter() - start)
                    assert served_version(url) == str(version) and handed == sent
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rows.append((size, params, disk_bytes, disk_seconds, sent, seconds[False], seconds[True], connect_seconds,
                         *handle_seconds))
            shutil.rmtree(root, ignore_errors=True)

    print(f"weight sync to one embedded engine, fp32, learner on 1 rank; {platform.machine()} CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| model | parameters | disk MiB | disk s | distributed MiB | distributed, per tensor s | "
          "distributed, flattened buckets s | group setup s | by handle, first s | by handle s | disk / by handle |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size, params, disk_bytes, disk_s, sent, tensor_s, flat_s, connect_s, first_s, handle_s in rows:
        print(f"| {size} | {params / 1e6:.1f}M | {disk_bytes / 2**20:.1f} | {disk_s:.2f} | {sent / 2**20:.1f} | "
              f"{tensor_s:.2f} | {flat_s:.2f} | {connect_s:.2f} | {first_s:.2f} | {handle_s:.2f} | "
              f"{disk_s / handle_s:.1f}x |")


if __name__ == "__main__":
    main()
