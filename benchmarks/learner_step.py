"""Learner step time: DPPO with top-K KL (K=20) against plain binary TV and against a plain
cross-entropy step, on the same model, batch and layout, side by side.

    python benchmarks/learner_step.py                                  # one rank
    torchrun --nproc_per_node=2 benchmarks/learner_step.py --tp 2      # vocab split over 2 ranks

The model is a Qwen3-MoE-shaped network (random weights) with Qwen3's 151,936-token
vocabulary, so that the vocabulary-wide work of the loss is at its real size. Each mode runs
warm-up steps, then timed steps; the table shows medians. Target: top-K within 5% of binary.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist

from dppo_megatron.learner.learner import Learner, LossConfig, MicroBatch, OptimizerConfig
from dppo_megatron.learner.model import ModelOptions
from dppo_megatron.learner.parallel import init_parallel
from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.model.layout import ParallelLayout
from dppo_megatron.processes import free_port

TOPK = 20


def arch_for(args) -> Qwen3Arch:
    return Qwen3Arch.from_hf({
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": args.vocab, "hidden_size": args.hidden,
        "num_hidden_layers": args.layers, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
        "intermediate_size": 4 * args.hidden, "moe_intermediate_size": args.hidden, "num_experts": 8,
        "num_experts_per_tok": 2, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "max_position_embeddings": 4096, "router_aux_loss_coef": 0.001,
    })


def make_batches(arch: Qwen3Arch, args, seed: int) -> list[MicroBatch]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(args.micro_batches):
        b, s = args.micro_batch_size, args.seq_len
        tokens = torch.randint(0, arch.vocab_size, (b, s), generator=gen)
        mask = torch.zeros(b, s, dtype=torch.bool)
        mask[:, s // 4 :] = True
        rollout = -torch.rand(b, s, generator=gen) * 12  # plausible logprobs of a random model
        topk_ids = torch.randint(0, arch.vocab_size, (b, s, TOPK), generator=gen)
        topk_ids[..., -1] = tokens  # the sampled token is in the set, as the rollout client ensures
        topk_logprobs = torch.log_softmax(torch.randn(b, s, TOPK, generator=gen), -1) - 2.0
        batches.append(MicroBatch(tokens=tokens, response_mask=mask, rollout_logprobs=rollout,
                                  advantages=torch.randn(b, generator=gen), topk_ids=topk_ids,
                                  topk_logprobs=topk_logprobs))
    return batches


def cross_entropy_step(learner: Learner, batches: list[MicroBatch]) -> None:
    """A plain supervised step: Megatron's vocab-parallel cross-entropy, token mean."""
    from megatron.core import tensor_parallel

    def loss_func(batch: dict, logits: torch.Tensor):
        mb = batch["batch"]
        labels = mb.tokens[:, 1:].to(logits.device)
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits[:, :-1].float().contiguous(), labels)
        mask = mb.response_mask[:, 1:].to(logits.device)
        return (losses * mask).sum() / mask.sum(), {}

    learner.optimizer_step([mb.as_dict() for mb in batches], loss_func)


def timed(step, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32" if not torch.cuda.is_available() else "bfloat16")
    args = parser.parse_args()
    if "RANK" not in os.environ:  # a single process without a launcher
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))

    arch = arch_for(args)
    layout = ParallelLayout(tp=args.tp, ep=args.ep)
    init_parallel(layout, arch)
    dtype = getattr(torch, args.dtype)
    results = {}
    for mode in ("cross_entropy", "dppo_binary_tv", "dppo_topk_kl"):
        learner = Learner(arch, layout, ModelOptions(dtype=dtype), OptimizerConfig(lr=1e-6),
                          LossConfig(mode="dppo_binary_tv" if mode == "cross_entropy" else mode))
        from megatron.core import parallel_state as ps

        batches = make_batches(arch, args, seed=ps.get_data_parallel_rank())
        if mode == "cross_entropy":
            results[mode] = timed(lambda: cross_entropy_step(learner, batches), args.warmup, args.repeats)
        else:
            results[mode] = timed(lambda: learner.train_step(batches), args.warmup, args.repeats)
        del learner

    if dist.get_rank() == 0:
        tokens = args.micro_batches * args.micro_batch_size * args.seq_len * ps.get_data_parallel_world_size()
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
            f"{platform.machine()} CPU, {torch.get_num_threads()} threads/rank"
        print(f"learner step: Qwen3-MoE-shaped, hidden {args.hidden}, {args.layers} layers, 8 experts top-2, "
              f"vocab {args.vocab}, {tokens} tokens/step, {args.dtype}, tp={args.tp} ep={args.ep} "
              f"on {dist.get_world_size()} rank(s), {device}, torch {torch.__version__}")
        print("| step | median s | vs dppo_binary_tv |")
        print("|---|---|---|")
        base = results["dppo_binary_tv"]
        for mode, seconds in results.items():
            print(f"| {mode} | {seconds:.3f} | {100 * (seconds / base - 1):+.1f}% |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
