"""Rollout throughput of the embedded engine: one request per /generate call (the naive
baseline) against requests batched per call, side by side, through the real client and HTTP.

    python benchmarks/rollout_batching.py                # the quickstart's model and batch
    python benchmarks/rollout_batching.py --prompts 64 --n 16 --max-new-tokens 16

The model is the quickstart's tiny Qwen3-MoE (random weights, toy vocabulary); every prompt has
the same length, as in the toy task, so batched rows need no padding.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from dppo_megatron.config import load_recipe
from dppo_megatron.config.schema import RolloutConfig
from dppo_megatron.processes import free_port
from dppo_megatron.rollout.client import Request, RolloutClient
from dppo_megatron.rollout.protocol import RoutingShape, SamplingParams
from dppo_megatron.rollout.servers import ServerManager, ServerSpec
from dppo_megatron.run.configs import client_config
from dppo_megatron.run.run_dir import make_random_model

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "quickstart.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="requests per call")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the server is a subprocess on the same cores
    recipe = load_recipe(QUICKSTART)
    routing = RoutingShape(2, 2, 4)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        make_random_model(recipe, model)
        spec = ServerSpec(model_path=str(model), port=free_port(), engine="embedded", routed_experts=True)
        with ServerManager([spec], Path(tmp) / "logs") as manager:
            url = manager.urls[0]
            prompt = [3, 6, 7, 8, 4]  # "reverse 1 2 3 :"
            for per_call in args.batches:
                client = RolloutClient([url], replace(client_config(RolloutConfig()), requests_per_call=per_call))
                times = []
                for repeat in range(args.repeats + 1):  # the first pass warms up
                    requests = [Request(f"r{repeat}-{i}", prompt, SamplingParams(max_new_tokens=args.max_new_tokens,
                                                                                 sampling_seed=i), 0, routing)
                                for i in range(args.prompts * args.n)]
                    start = time.perf_counter()
                    samples = client.generate_sync(requests)
                    if repeat:
                        times.append(time.perf_counter() - start)
                    assert len(samples) == len(requests)
                rows.append((per_call, min(times)))
    requests = args.prompts * args.n
    print(f"embedded engine rollout, {requests} requests x <= {args.max_new_tokens} new tokens, routes on; "
          f"{platform.machine()} CPU, {os.cpu_count()} cores, best of {args.repeats}")
    print(f"{'requests per call':>18} | {'seconds':>8} | {'requests/s':>10} | {'speed-up':>8}")
    base = rows[0][1]
    for per_call, seconds in rows:
        print(f"{per_call:>18} | {seconds:>8.3f} | {requests / seconds:>10.0f} | {base / seconds:>7.1f}x")


if __name__ == "__main__":
    main()
