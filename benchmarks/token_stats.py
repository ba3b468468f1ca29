"""token_stats against the naive approach (fp32 log_softmax over the whole vocabulary, then
gather), side by side: time and peak extra memory, forward and forward+backward.

    python benchmarks/token_stats.py                    # Qwen3 vocabulary, K=20, 1024, 4096 and 8192 tokens
    python benchmarks/token_stats.py --tokens 512 --repeats 2 --budget-mib 64

Each measurement runs in a fresh subprocess so that its peak memory is its own: on CPU the
process's peak RSS above what the inputs already took, on GPU torch.cuda.max_memory_allocated
above the inputs; with a backward, the gradient of the logits (in their dtype, which both
methods must return) is subtracted, so "extra" is the working memory beyond it. Both methods compute the same things: log pi of the sampled token with
gradient, entropy, and top-K TV and KL against the rollout policy's top-K logprobs.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import time
from functools import partial

import torch

from dppo_megatron.algo import token_stats

QWEN3_VOCAB = 151936


def naive_stats(logits, targets, topk_ids, topk_logprobs):
    """What the reference implementation does: a full-vocabulary fp32 log_softmax."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    logprob = log_probs.gather(1, targets[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    with torch.no_grad():
        pi_k = log_probs.gather(1, topk_ids).exp()
        mu_k = topk_logprobs.exp()
        mu_other = (1 - mu_k.sum(-1)).clamp(min=0)
        pi_other = (1 - pi_k.sum(-1)).clamp(min=0)
        tv = 0.5 * ((mu_k - pi_k).abs().sum(-1) + (mu_other - pi_other).abs())
        mu = torch.cat([mu_k, mu_other[:, None]], 1).clamp(min=1e-12)
        pi = torch.cat([pi_k, pi_other[:, None]], 1).clamp(min=1e-12)
        kl = (mu * (mu.log() - pi.log())).sum(-1)
    return logprob, entropy, tv, kl


def chunked_stats(logits, targets, topk_ids, topk_logprobs, budget_mib: int = 256):
    stats = token_stats(logits, targets, topk_ids=topk_ids, topk_logprobs=topk_logprobs, with_entropy=True,
                        memory_budget=budget_mib * 2**20)
    return stats.logprob, stats.entropy, stats.topk_tv, stats.topk_kl


METHODS = {"naive": naive_stats, "token_stats": chunked_stats}


def measure_one(method: str, tokens: int, vocab: int, topk: int, backward: bool, repeats: int, dtype: str,
                budget_mib: int) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    logits = torch.randn(tokens, vocab, dtype=getattr(torch, dtype), device=device)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    topk_ids = torch.randint(0, vocab, (tokens, topk), device=device)
    topk_logprobs = torch.full((tokens, topk), -math.log(4 * topk), device=device)
    fn = METHODS[method] if method == "naive" else partial(chunked_stats, budget_mib=budget_mib)

    def run():
        x = logits.detach().requires_grad_(backward)
        logprob, entropy, _, _ = fn(x, targets, topk_ids, topk_logprobs)
        if backward:
            (logprob.sum() + 0.01 * entropy.sum()).backward()
        return x.grad

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run()  # warm-up; also sets the peak
    if device == "cuda":
        torch.cuda.synchronize()
        peak_extra = torch.cuda.max_memory_allocated() - base
    else:
        peak_extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if backward:
        peak_extra -= logits.numel() * logits.element_size()  # the gradient itself
    return {"time_ms": 1e3 * sorted(times)[len(times) // 2], "peak_extra_mib": max(0, peak_extra) / 2**20}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _cell(value: float, fmt: str = "{:.0f}") -> str:
    return "failed" if math.isnan(value) else fmt.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--budget-mib", type=int, default=256, help="token_stats' memory_budget, MiB")
    parser.add_argument("--vocab", type=int, default=QWEN3_VOCAB)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "TOKENS", "PASS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:  # child: one measurement, printed as JSON
        method, tokens, pass_ = args.one
        result = measure_one(method, int(tokens), args.vocab, args.topk, pass_ == "fwd+bwd", args.repeats, args.dtype,
                             args.budget_mib)
        print(json.dumps(result))
        return

    print(f"token_stats benchmark: vocab {args.vocab}, K={args.topk}, logits {args.dtype}, "
          f"token_stats budget {args.budget_mib} MiB, {device_name()}, torch {torch.__version__}")
    print("| tokens | pass | naive ms | token_stats ms | speed-up | naive extra MiB | token_stats extra MiB | "
          "extra ratio | logits MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        logits_mib = tokens * args.vocab * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 2**20
        for pass_ in ("fwd", "fwd+bwd"):
            results = {}
            for method in METHODS:
                child = subprocess.run(
                    [sys.executable, __file__, "--one", method, str(tokens), pass_, "--vocab", str(args.vocab),
                     "--topk", str(args.topk), "--repeats", str(args.repeats), "--dtype", args.dtype,
                     "--budget-mib", str(args.budget_mib)],
                    capture_output=True, text=True,
                )
                if child.returncode != 0:
                    tail = child.stderr.strip().splitlines()[-1:] or ["killed (out of memory?)"]
                    results[method] = {"time_ms": math.nan, "peak_extra_mib": math.nan, "error": tail[0]}
                else:
                    results[method] = json.loads(child.stdout.strip().splitlines()[-1])
            naive, ours = results["naive"], results["token_stats"]
            speed_up = naive["time_ms"] / ours["time_ms"]
            ratio = ours["peak_extra_mib"] / naive["peak_extra_mib"] if naive["peak_extra_mib"] else math.nan
            print(f"| {tokens} | {pass_} | {_cell(naive['time_ms'])} | {_cell(ours['time_ms'])} | "
                  f"{_cell(speed_up, '{:.2f}x')} | {_cell(naive['peak_extra_mib'])} | "
                  f"{_cell(ours['peak_extra_mib'])} | {_cell(ratio, '{:.3f}')} | {logits_mib:.0f} |", flush=True)
            for method, result in results.items():
                if "error" in result:
                    print(f"  {method} failed: {result['error']}")


if __name__ == "__main__":
    main()
