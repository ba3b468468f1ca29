"""Rank program: one weight-sync case of tests/test_embedded_engine.py (run through each.py, so
that all the cases share one start of the ranks), then what the servers serve right after it.

argv: WORKER OUT_DIR SERVED_URLS RESET_TO *WORKER_ARGS. Runs WORKER's main(OUT_DIR,
*WORKER_ARGS) (a rank program of this folder); then, where SERVED_URLS (comma-separated) is not
empty, rank 0 asks each server for one seeded sample (OUT_DIR/served-<i>.json, the raw answer)
and puts the server back on the weights of RESET_TO, so that the next case's sync is what
changes them."""

import importlib
import json
import sys
import urllib.request
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dppo_megatron.rollout.protocol import SamplingParams, generate_request

PROMPT = [5, 17, 42, 99]  # as tests/test_embedded_engine.py


def post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def record_served(out_dir, urls: list[str], reset_to: str | None = None) -> None:
    """Rank 0: one seeded sample from each server (OUT_DIR/served-<i>.json), then, with
    `reset_to`, the server back on those weights."""
    body = generate_request("r", PROMPT, SamplingParams(max_new_tokens=6, sampling_seed=5), topk=5,
                            return_routed_experts=True)
    for index, url in enumerate(urls):
        Path(out_dir, f"served-{index}.json").write_text(json.dumps(post(url, "/generate", body)))
        if reset_to:
            post(url, "/update_weights_from_disk", {"model_path": reset_to, "weight_version": "0"})


def main(worker, out_dir, served_urls, reset_to, *worker_args) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    importlib.import_module(worker).main(out_dir, *worker_args)
    dist.barrier()
    if dist.get_rank() == 0 and served_urls:
        record_served(out_dir, served_urls.split(","), reset_to)


if __name__ == "__main__":
    main(*sys.argv[1:])
