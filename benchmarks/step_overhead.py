"""Rank 0's work per step at the 30B recipe's shape, today's path and the new one side by side.

    python benchmarks/step_overhead.py                   # 256 responses of ~3000 tokens over 60 s
    python benchmarks/step_overhead.py --responses 4096 --window 180   # the recipe's step (a big machine)
    python benchmarks/step_overhead.py --quick           # 64 short responses, a 10 s window

The default is 1/16 of the recipe's 4096 responses at its lengths: the old path holds the
top-K of a step as Python lists (~7 KB a token on rank 0), so the whole step needs ~90 GB on
rank 0 and does not fit a 24 GB machine; every cost measured here grows linearly with the
number of responses.

A local load generator answers /generate as an SGLang server would: SGLang-format bodies
(token logprob triples, top-K K=20, R3 routes of 48 layers x 8 experts as base64 int32) whose
responses are math solutions that math-verify really parses, each released at a time that
follows its length over the generation window (the longest last). 8 processes stand for the 8
data-parallel ranks; a step is done when every one holds its padded micro-batches.

- before (the loop before this change): top-K as JSON triples kept as Python lists; scoring
  one response after another on rank 0 once generation ends; rank 0 pickles every rank's
  samples to it (scatter_object_list).
- after: rank 0's rollout process (run/rollout_process.py) with top-K as SGLang's flat base64
  arrays, each response scored in the reward pool and packed into its compact block as it
  arrives, the block passed to rank 0 at once; each DP rank gets its own samples' blocks, sent
  as they are (run/scatter.SampleScatter).

Both pad the micro-batches with the same function. Printed: the time from the last response
to every rank holding its micro-batches, the bytes rank 0 sends against the compact size of
the data, and the peak memory of rank 0's process and (after) of its largest child, the
rollout process or a reward worker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import pickle
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYERS, EXPERTS_PER_TOKEN, EXPERTS, TOPK, N = 48, 8, 128, 20, 16
MAX_NEW_TOKENS = 8192
DP = 8


# --- the workload ------------------------------------------------------------------------------

WORDS = ("we have so the equation gives then substituting into and therefore which means that "
         "let be a real number such that consider the sum of all values hence it follows").split()
MATH = [r"\frac{{{a}}}{{{b}}}", r"x^{{{a}}} + {b}x", r"\sqrt{{{a}}}", r"{a} \cdot {b} = {c}", r"(x - {a})(x + {b})"]


def solution_text(rng: np.random.Generator, chars: int, answer: str) -> str:
    """About `chars` characters of worked solution, inline LaTeX in it, the answer boxed last."""
    parts, size = [], 0
    while size < chars:
        if rng.random() < 0.3:
            a, b = int(rng.integers(1, 99)), int(rng.integers(1, 99))
            piece = "$" + MATH[int(rng.integers(len(MATH)))].format(a=a, b=b, c=a * b) + "$"
        else:
            piece = WORDS[int(rng.integers(len(WORDS)))]
        parts.append(piece)
        size += len(piece) + 1
    return " ".join(parts) + f". The answer is $\\boxed{{{answer}}}$."


def build_tokenizer(directory: Path, rng: np.random.Generator):
    """A byte-level BPE trained here on text of the same kind (no hub downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [solution_text(rng, 2000, str(i)) for i in range(200)]
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=3000, special_tokens=["<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def make_workload(directory: Path, responses: int, mean_tokens: int, seed: int = 0) -> dict:
    """Prompts, responses (token ids, a log-normal length distribution, some cut at the limit),
    reference answers (about half the responses right) and each response's finish time as a
    fraction of the window."""
    rng = np.random.default_rng(seed)
    tokenizer = build_tokenizer(directory / "tokenizer", rng)
    sigma = 0.6
    lengths = np.clip(rng.lognormal(math.log(mean_tokens) - sigma**2 / 2, sigma, responses), 64, MAX_NEW_TOKENS)
    prompts = responses // N
    answers = [str(int(rng.integers(2, 999))) for _ in range(prompts)]
    chars_per_token = len(solution_text(rng, 20000, "1")) / len(tokenizer.encode(solution_text(rng, 20000, "1")))
    items = []
    for index, length in enumerate(lengths.astype(int)):
        answer = answers[index // N] if rng.random() < 0.5 else str(int(rng.integers(2, 999)))
        ids = tokenizer.encode(solution_text(rng, int(length * chars_per_token), answer))[:MAX_NEW_TOKENS]
        items.append(ids)
    prompt_ids = [tokenizer.encode(f"Problem {i}: find the value. " * 8) for i in range(prompts)]
    finish = np.array([len(ids) for ids in items], dtype=float)
    finish = 0.05 + 0.95 * finish / finish.max() * rng.uniform(0.9, 1.0, responses)
    return {"prompts": prompt_ids, "answers": answers, "responses": items, "finish": finish.tolist()}


# --- the load generator ----------------------------------------------------------------------

def serve(workload_file: str, port: int, window: float, ready_file: str) -> None:
    """An SGLang-like /generate server: each response is released at its finish time
    (relative to the first request of the step), its body laid out as SGLang's."""
    import base64

    from aiohttp import web

    work = json.loads(Path(workload_file).read_text())
    rng = np.random.default_rng(1)
    max_rows = max(len(p) for p in work["prompts"]) + MAX_NEW_TOKENS
    # One base64 string of valid routes; a row is 48 x 8 x 4 = 1536 bytes = 2048 base64 chars,
    # so any whole number of rows is a prefix of it.
    routes_b64 = base64.b64encode(rng.integers(0, EXPERTS, (max_rows, LAYERS, EXPERTS_PER_TOKEN), dtype="<i4")
                                  .tobytes()).decode()

    def body(index: int, flat: bool) -> bytes:
        ids = work["responses"][index]
        prompt = work["prompts"][index // N]
        values = np.sort(rng.normal(-3, 2, (len(ids), TOPK)).astype("<f4"), axis=1)[:, ::-1]
        top_ids = rng.integers(0, 3000, (len(ids), TOPK)).astype("<i4")
        top_ids[:, 0] = ids
        logprobs = values[:, 0].tolist()
        meta = {"id": f"r{index}", "finish_reason": {"type": "stop", "matched": 0}, "prompt_tokens": len(prompt),
                "completion_tokens": len(ids), "cached_tokens": 0, "weight_version": "0",
                "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, ids)]}
        if flat:
            meta.update({"output_top_logprobs_val_flat_b64": base64.b64encode(values.copy().tobytes()).decode(),
                         "output_top_logprobs_idx_flat_b64": base64.b64encode(top_ids.tobytes()).decode(),
                         "output_top_logprobs_val_flat_b64_dtype": "float32",
                         "output_top_logprobs_idx_flat_b64_dtype": "int32",
                         "output_top_logprobs_shape": [len(ids), TOPK], "output_top_logprobs_null_prefix": 0})
        else:
            meta["output_top_logprobs"] = [[[float(v), int(t), None] for v, t in zip(vr, ir)]
                                           for vr, ir in zip(values.tolist(), top_ids.tolist())]
        rows = len(prompt) + len(ids) - 1
        head = json.dumps({"output_ids": ids, "meta_info": meta})[:-2]  # without the closing "}}"
        return (head + ', "routed_experts": "' + routes_b64[: rows * 2048] + '"}}').encode()

    first_request = None

    async def generate(request):
        nonlocal first_request
        request_body = await request.json()
        now = time.monotonic()
        first_request = first_request or now
        _, slot, reply = request_body["rid"].split("-")
        index = int(slot[1:]) * N + int(reply[1:])
        flat = bool(request_body.get("return_flat_raw_output_top_logprobs"))
        await asyncio.sleep(max(0.0, first_request + work["finish"][index] * window - time.monotonic()))
        return web.Response(body=body(index, flat), content_type="application/json")

    async def reset(request):
        nonlocal first_request
        first_request = None
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=2**30)
    app.add_routes([web.post("/generate", generate), web.post("/reset", reset)])
    Path(ready_file).write_text("ready")
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# --- the ranks -------------------------------------------------------------------------------

def rank_main(path: str, workload_file: str, url: str, result_file: str) -> None:
    """One of the 8 ranks. Rank 0 drives the step; every rank ends holding its micro-batches."""
    import torch.distributed as dist

    from dppo_megatron.learner.batches import micro_batch

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    work = json.loads(Path(workload_file).read_text())
    layout = dict(pad_multiple=1, topk=TOPK, routing=(LAYERS, EXPERTS_PER_TOKEN))
    dist.barrier()
    result = {}
    if path == "before":
        received = [None]
        shares = None
        if rank == 0:
            samples, result = _rank0_before(work, url)
            shares = _plan_shares(samples)
        dist.scatter_object_list(received, shares, src=0)
        share = [[micro_batch(micro, **layout) for micro in mini] for mini in received[0]]
    else:
        from dppo_megatron.run.scatter import SampleScatter

        scatter = SampleScatter(dist.group.WORLD, dp_rank=rank, dp_size=DP, mini_batches=1, micro_batch_size=1,
                                layout=layout)
        samples = None
        if rank == 0:
            samples, result = _rank0_after(workload_file, url)
        share = scatter.share(samples)
        if rank == 0:
            result["bytes_sent"] = scatter.last_bytes_sent
            result["compact_bytes"] = scatter.last_compact_bytes
    ready = time.time()
    if rank == 0 and path == "after":
        _rank0_after.process.close()
        result["rollouts_peak_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    held = sum(mb.tokens.shape[0] for mini in share for mb in mini)
    times = [None] * DP
    dist.all_gather_object(times, (ready, held))
    if rank == 0:
        if path == "before":  # counted after the step, so that measuring it costs the step nothing
            result["bytes_sent"] = sum(len(pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL)) for s in shares[1:])
            result["compact_bytes"] = _compact_bytes(samples)
        result["learner_ready"] = max(t for t, _ in times)
        result["samples_held"] = sum(h for _, h in times)
        result["rank0_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(result_file).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _requests(work: dict, tag: str):
    from dppo_megatron.rollout.client import Request
    from dppo_megatron.rollout.protocol import RoutingShape, SamplingParams

    routing = RoutingShape(LAYERS, EXPERTS_PER_TOKEN, EXPERTS)
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    return [Request(f"{tag}-p{index // N}-r{index % N}", work["prompts"][index // N], params, TOPK, routing)
            for index in range(len(work["responses"]))]


def _client(url: str, *, topk_b64: bool):
    from dppo_megatron.rollout.client import ClientConfig, RolloutClient

    return RolloutClient([url], ClientConfig(max_in_flight_per_server=100_000, requests_per_call=1,
                                             topk_b64=topk_b64, request_timeout=3600))


def _rank0_before(work: dict, url: str):
    """The loop before: parse to lists while generating, score one by one after, then samples."""
    from transformers import AutoTokenizer

    from dppo_megatron.algo import group_advantages
    from dppo_megatron.learner.batches import TrainSample
    from dppo_megatron.rewards.math import MathReward

    tokenizer = AutoTokenizer.from_pretrained(work["tokenizer"])
    reward = MathReward(timeout=5)
    last = [0.0]

    def arrived(index, sample):  # the old client's samples held the top-K as Python lists
        sample.topk_ids, sample.topk_logprobs = sample.topk_ids.tolist(), sample.topk_logprobs.tolist()
        sample.logprobs = sample.logprobs.tolist()
        sample.routed_experts = sample.routed_experts.astype(np.int32)
        last[0] = time.time()

    started = time.time()
    samples = _client(url, topk_b64=False).generate_sync(_requests(work, "s0"), on_sample=arrived)
    scoring = time.time()
    rewards = []
    for index, sample in enumerate(samples):
        text = tokenizer.decode(sample.response_ids, skip_special_tokens=True)
        rewards.append(reward(text, work["answers"][index // N]))
    scored = time.time()
    import torch

    advantages = group_advantages(torch.tensor(rewards), N)
    train = [TrainSample(s.prompt_ids, s.response_ids, s.logprobs, float(a), s.topk_ids, s.topk_logprobs,
                         s.routed_experts) for s, a in zip(samples, advantages.tolist())]
    return train, {"started": started, "last_response": last[0], "scoring_s": scored - scoring,
                   "reward_mean": float(np.mean(rewards)), "per_response_ms": 1000 * (scored - scoring) / len(samples)}


class WorkloadRollouts:
    """The loop's `Rollouts` on the load generator's workload, made in rank 0's rollout process
    (run/rollout_process.py) as the loop makes its own: flat base64 top-K; each response scored
    in the reward pool and packed into its compact block as it arrives."""

    def __init__(self, workload_file: str, url: str, restart=None):
        from dppo_megatron.rewards import RewardSpec
        from dppo_megatron.rewards.pool import RewardPool

        self.work, self.url = json.loads(Path(workload_file).read_text()), url
        self.pool = RewardPool(RewardSpec(kind="math", timeout=5), self.work["tokenizer"])
        self.pool.submit([1, 2], "1").result()  # the pool lives as long as the run: started before the step

    def step(self, step: int, version: int, on_packed):
        from dppo_megatron.learner.batches import TrainSample, pack_sample
        from dppo_megatron.run.rollouts import ScoredGroups

        work = self.work
        groups = ScoredGroups(len(work["prompts"]), N, normalize_std=False)
        last = [0.0]

        def arrived(index, sample):
            on_packed(index, pack_sample(TrainSample(sample.prompt_ids, sample.response_ids, sample.logprobs, 0.0,
                                                     sample.topk_ids, sample.topk_logprobs, sample.routed_experts)))
            sample.logprobs = sample.topk_ids = sample.topk_logprobs = sample.routed_experts = None
            self.pool.submit(sample.response_ids, work["answers"][index // N]).add_done_callback(
                lambda done: groups.add(index, done))
            last[0] = time.time()

        _client(self.url, topk_b64=True).generate_sync(_requests(work, f"s{step}"), on_sample=arrived)
        groups.wait()
        return list(enumerate(groups.advantages.tolist())), {
            "last_response": last[0], "scored_after_last_s": time.time() - last[0], "result_sent": time.time(),
            "reward_mean": float(groups.rewards.mean()), "pool_workers": self.pool.size}

    def close(self) -> None:
        self.pool.close()


def _rank0_after(workload_file: str, url: str):
    """Today's loop: rank 0's rollout process (started before the step, closed after it, not
    timed) sends each response's block as it arrives, then the advantages."""
    from functools import partial

    from dppo_megatron.run.rollout_process import RolloutProcess

    process = _rank0_after.process = RolloutProcess(partial(WorkloadRollouts, workload_file, url))
    started = time.time()
    samples, metrics = process.step(0, 0)
    return samples, dict(metrics, started=started, rank0_has_samples=time.time())


def _plan_shares(samples):
    from dppo_megatron.learner.batches import plan_step

    plan = plan_step(samples, mini_batches=1, dp_size=DP, micro_batch_size=1)
    return [[mini[rank] for mini in plan] for rank in range(DP)]


def _compact_bytes(samples) -> int:
    from dppo_megatron.learner.batches import compact_bytes

    return sum(compact_bytes(type(s)(s.prompt_ids, s.response_ids, np.asarray(s.rollout_logprobs, np.float32),
                                     s.advantage, np.asarray(s.topk_ids, np.int32),
                                     np.asarray(s.topk_logprobs, np.float32), s.routed_experts.astype(np.uint8)))
               for s in samples)


# --- driving it -------------------------------------------------------------------------------

def run_path(path: str, workload_file: Path, url: str, tmp: Path) -> dict:
    import subprocess
    import urllib.request

    from dppo_megatron.processes import free_port

    urllib.request.urlopen(urllib.request.Request(url + "/reset", data=b"{}"), timeout=10).read()
    result_file = tmp / f"{path}.json"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={DP}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", __file__, "--rank", path, str(workload_file), url, str(result_file)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(command, check=True, env=env, timeout=7200)
    return json.loads(result_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, default=256, help="responses per step (the recipe: 4096)")
    parser.add_argument("--mean-tokens", type=int, default=3000, help="mean response length")
    parser.add_argument("--window", type=float, default=60.0, help="seconds over which the responses arrive")
    parser.add_argument("--quick", action="store_true", help="64 responses of ~600 tokens over 10 s")
    args = parser.parse_args()
    if args.quick:
        args.responses, args.mean_tokens, args.window = 64, 600, 10.0
    import subprocess

    from dppo_megatron.processes import free_port

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        work = make_workload(tmp, args.responses, args.mean_tokens)
        work["tokenizer"] = str(tmp / "tokenizer")
        workload_file = tmp / "workload.json"
        workload_file.write_text(json.dumps(work))
        port = free_port()
        ready = tmp / "server.ready"
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(workload_file), str(port),
                                   str(args.window), str(ready)])
        try:
            while not ready.exists():
                time.sleep(0.1)
            time.sleep(1.0)
            url = f"http://127.0.0.1:{port}"
            results = {path: run_path(path, workload_file, url, tmp) for path in ("before", "after")}
        finally:
            server.kill()
    lengths = [len(r) for r in work["responses"]]
    print(f"\n{args.responses} responses (mean {np.mean(lengths):.0f}, max {max(lengths)} tokens), K={TOPK}, routes "
          f"{LAYERS}x{EXPERTS_PER_TOKEN}, window {args.window:.0f} s, {DP} DP ranks; {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores")
    print("| path | last response -> learner ready (s) | step total (s) | rank 0 sends (MiB) | compact data (MiB) "
          "| sent / compact | rank 0 peak RSS (MiB) | rollout process peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for path, r in results.items():
        tail, total = r["learner_ready"] - r["last_response"], r["learner_ready"] - r["started"]
        child = f"{r['rollouts_peak_mib']:.0f}" if "rollouts_peak_mib" in r else "-"
        print(f"| {path} | {tail:.2f} | {total:.1f} | {r['bytes_sent'] / 2**20:.0f} | {r['compact_bytes'] / 2**20:.0f} "
              f"| {r['bytes_sent'] / r['compact_bytes']:.2f} | {r['rank0_peak_mib']:.0f} | {child} |")
    before, after = results["before"], results["after"]
    ratio = (after["learner_ready"] - after["last_response"]) / (before["learner_ready"] - before["last_response"])
    print(f"\nafter, from the last response: scored {after['scored_after_last_s']:.2f} s, result sent "
          f"{after['result_sent'] - after['last_response']:.2f} s, rank 0 holds the samples "
          f"{after['rank0_has_samples'] - after['last_response']:.2f} s, every rank its micro-batches "
          f"{after['learner_ready'] - after['last_response']:.2f} s")
    print(f"tail after / before: {ratio:.3f} (target <= 0.05); math-verify {before['per_response_ms']:.0f} ms a "
          f"response on rank 0; mean reward {before['reward_mean']:.3f} / {after['reward_mean']:.3f}; "
          f"{after['pool_workers']} reward workers; every rank held its samples: "
          f"{before['samples_held']} / {after['samples_held']} of {args.responses}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
    elif sys.argv[1:2] == ["--rank"]:
        rank_main(*sys.argv[2:6])
    else:
        main()
