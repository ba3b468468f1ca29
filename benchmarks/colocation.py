"""Colocation on this machine: the embedded engine's resident memory through a release and a
resume, and the colocated tiny recipe's steps/s against the disaggregated quickstart's.

    python benchmarks/colocation.py                  # both tables
    python benchmarks/colocation.py --only memory    # or: steps
    python benchmarks/colocation.py --steps 40

Memory: an engine serving the weight-sync benchmark's mid-size model (Qwen3-MoE, 114M fp32
parameters, 431 MiB), its VmRSS while serving, after /release_memory_occupation (weights and KV
cache), after /resume_memory_occupation (the weights come back empty: nothing touched yet), and
after the weights are handed back by handle and it serves again.

Steps/s: `dppo-megatron train` of recipes/tiny/colocated.yaml (weights by handle, the engine
released while the learner trains) and of recipes/tiny/quickstart.yaml (weights from disk, the
engine always resident), synchronous both, the same steps, one after the other on the same cores;
the mean step time leaves out the first step (start-up), and the metrics of the two runs are
compared (they must be equal).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from weight_sync import make_model, start_server  # noqa: E402

from dppo_megatron.processes import free_port  # noqa: E402
from dppo_megatron.rollout.tensor_handles import bucket_payload, shared_bucket  # noqa: E402
from dppo_megatron.rollout.weight_sync import (  # noqa: E402
    TensorWeightSync,
    begin_weight_update,
    end_weight_update,
    release_memory,
    resume_memory,
)
from dppo_megatron.run.metrics import read_metrics  # noqa: E402


def resident_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def generate(url: str) -> None:
    import urllib.request

    body = json.dumps({"input_ids": [5, 17, 42], "sampling_params": {"max_new_tokens": 4}}).encode()
    request = urllib.request.Request(url + "/generate", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120):
        pass


def memory_table(root: Path) -> None:
    from safetensors.torch import load_file

    model = make_model(root / "mid", "mid")
    tensors = sorted((name, tensor) for path in model.glob("*.safetensors") for name, tensor in load_file(path).items())
    weights_mib = sum(t.numel() * t.element_size() for _, t in tensors) / 2**20
    proc, url = start_server(model, root / "server.log")
    rows = []
    try:
        generate(url)
        rows.append(("serving", resident_mib(proc.pid)))
        assert not release_memory([url])
        rows.append(("after release (weights, kv_cache)", resident_mib(proc.pid)))
        assert not resume_memory([url])
        rows.append(("after resume (weights empty until the update)", resident_mib(proc.pid)))
        begin_weight_update([url])
        flat, metadata = shared_bucket(tensors)
        assert not TensorWeightSync([url]).send({url: [bucket_payload(flat, metadata)]}, 1)
        assert not end_weight_update([url])
        del flat
        generate(url)
        rows.append(("after the update by handle, serving", resident_mib(proc.pid)))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    print(f"embedded engine resident memory (VmRSS), mid model: {weights_mib:.0f} MiB of fp32 weights; "
          f"{platform.machine()} CPU, torch {torch.__version__}")
    print("| engine state | resident MiB | vs serving |")
    print("|---|---|---|")
    for state, mib in rows:
        print(f"| {state} | {mib:.0f} | {mib - rows[0][1]:+.0f} |")


def train(recipe: str, run_dir: Path, steps: int) -> tuple[float, list[dict]]:
    command = [sys.executable, "-m", "dppo_megatron", "train", str(REPO / "recipes" / "tiny" / recipe), "--run-dir",
               str(run_dir), f"trainer.steps={steps}", "trainer.save_every=0", "trainer.save_at_end=false",
               "trainer.eval_every=0", f"rollout.base_port={free_port()}"]
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    return time.monotonic() - started, read_metrics(run_dir)


def steps_table(root: Path, steps: int) -> None:
    rows, metrics = [], {}
    for name, recipe in (("disaggregated (quickstart.yaml, disk)", "quickstart.yaml"),
                         ("colocated (colocated.yaml, by handle)", "colocated.yaml")):
        wall, metrics[name] = train(recipe, root / recipe.removesuffix(".yaml"), steps)
        later = metrics[name][1:]
        mean = lambda key: sum(m.get(key, 0.0) for m in later) / len(later)  # noqa: E731
        rows.append((name, wall, 1 / mean("time/step"), mean("time/sync"), mean("time/servers_released"),
                     mean("time/servers_resumed")))
    same = [[{k: v for k, v in m.items() if not k.startswith("time/")} for m in run] for run in metrics.values()]
    print(f"`dppo-megatron train`, {steps} synchronous steps, 2 learner ranks + 1 embedded engine on "
          f"{os.cpu_count()} cores; metrics of the two runs equal: {same[0] == same[1]}")
    print("| run | wall s | steps/s (after step 1) | weight sync s/step | release s/step | resume + sync s/step |")
    print("|---|---|---|---|---|---|")
    for name, wall, rate, sync, released, resumed in rows:
        print(f"| {name} | {wall:.0f} | {rate:.2f} | {sync:.3f} | {released:.3f} | {resumed:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["memory", "steps"])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "memory"):
            memory_table(Path(tmp))
        if args.only in (None, "steps"):
            steps_table(Path(tmp), args.steps)


if __name__ == "__main__":
    main()
