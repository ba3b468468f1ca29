"""Rank program: one DPPO step (TP=2, EP=2), then the weights to released-and-resumed servers by
handle, through the run's publisher (run/publisher.py, method tensor).

argv: OUT_DIR HF_DIR SERVER_URLS VERSION FEEDERS. SERVER_URLS comma-separated. FEEDERS "rank0":
rank 0 hands every server the buckets from its own memory (the CPU layout); "per-rank": server i
takes them from rank i's memory, each rank holding a copy of every bucket, as colocated GPUs do.
Before the publish rank 0 releases the servers' memory and takes it back (the weights come back
empty), and writes what the servers said meanwhile to OUT_DIR/while-released.json; after it,
the learner's weights go to OUT_DIR/reference (HF format) for comparison."""

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learner_train import stepped_learner  # noqa: E402

from dppo_megatron.learner.weights import save_hf  # noqa: E402
from dppo_megatron.rollout.protocol import SamplingParams, generate_request  # noqa: E402
from dppo_megatron.rollout.weight_sync import release_memory, resume_memory  # noqa: E402
from dppo_megatron.run.publisher import WeightPublisher  # noqa: E402


def refusal(url: str) -> str:
    """What a server answers to a generation now (a 400's message)."""
    body = generate_request("r", [5, 17, 42, 99], SamplingParams(max_new_tokens=2), topk=0)
    request = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60):
            return "served"
    except urllib.error.HTTPError as error:
        return json.loads(error.read())["error"]["message"]


def main(out_dir, hf_dir, servers, version, feeders) -> None:
    learner, arch = stepped_learner(hf_dir, "2", "2")
    urls = servers.split(",")
    ranks = [[0]] * len(urls) if feeders == "rank0" else [[index] for index in range(len(urls))]
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    if dist.get_rank() == 0:
        said = {"release": release_memory(urls), "released": [refusal(url) for url in urls],
                "resume": resume_memory(urls), "resumed": [refusal(url) for url in urls]}
        Path(out_dir, "while-released.json").write_text(json.dumps(said))
    publisher = WeightPublisher(learner, arch, urls, method="tensor", weights_dir=Path(out_dir) / "unused",
                                hf_config=config, side_files_from=Path(hf_dir), server_tp=1, tensor_ranks=ranks)
    publisher.tensors.bucket_bytes = 64 * 1024  # many buckets, as a large model makes
    publisher.publish(int(version))
    save_hf(learner.module, arch, Path(out_dir) / "reference", config=config, dtype=torch.float32)


if __name__ == "__main__":
    main(*sys.argv[1:])
