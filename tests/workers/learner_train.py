"""Rank program: a few DPPO steps on a toy batch, with mu from transformers on the same
weights (so the first step is exactly on-policy).

argv: OUT_DIR TP PP EP MODE THRESHOLD STEPS HF_DIR [recompute]. Rank 0 writes OUT_DIR/metrics.json (one dict per
step) and OUT_DIR/policy.json (mean log pi of A>0 and A<0 responses before and after)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dppo_megatron.learner.learner import Learner, LossConfig, MicroBatch, OptimizerConfig
from dppo_megatron.learner.model import ModelOptions
from dppo_megatron.learner.parallel import init_parallel
from dppo_megatron.learner.weights import load_hf_weights
from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.model.layout import ParallelLayout

TOPK = 20


def toy_micro_batches(hf_dir: str, arch: Qwen3Arch, dp_rank: int, dp_size: int) -> list[MicroBatch]:
    """4 sequences (prompt 4 + response 6 tokens) per DP rank in 2 micro-batches; advantages
    +1, -1, +1, -1; mu and its top-K from transformers."""
    from transformers import AutoModelForCausalLM

    gen = torch.Generator().manual_seed(100 + dp_rank)
    tokens = torch.randint(0, arch.vocab_size, (4, 10), generator=gen)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        log_probs = torch.log_softmax(hf(tokens).logits.double(), dim=-1)
    rollout = torch.zeros(4, 10)
    rollout[:, 1:] = log_probs[:, :-1].gather(2, tokens[:, 1:, None]).squeeze(2).float()
    top = log_probs[:, :-1].topk(TOPK, dim=-1)
    topk_ids = torch.zeros(4, 10, TOPK, dtype=torch.long)
    topk_lp = torch.zeros(4, 10, TOPK)
    topk_ids[:, 1:], topk_lp[:, 1:] = top.indices, top.values.float()
    # As the rollout client does: the sampled token replaces the K-th entry when missing.
    sampled = tokens[:, 1:]
    missing = ~(topk_ids[:, 1:] == sampled[..., None]).any(-1)
    topk_ids[:, 1:, -1] = torch.where(missing, sampled, topk_ids[:, 1:, -1])
    topk_lp[:, 1:, -1] = torch.where(missing, rollout[:, 1:], topk_lp[:, 1:, -1])
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[:, 4:] = True
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    return [
        MicroBatch(tokens=tokens[i : i + 2], response_mask=mask[i : i + 2], rollout_logprobs=rollout[i : i + 2],
                   advantages=advantages[i : i + 2], topk_ids=topk_ids[i : i + 2], topk_logprobs=topk_lp[i : i + 2])
        for i in (0, 2)
    ]


def mean_response_logprob(learner: Learner, batches: list[MicroBatch]) -> dict[str, float]:
    from megatron.core import parallel_state as ps

    sums = torch.zeros(4, dtype=torch.float64)
    for mb, logprob in zip(batches, learner.logprobs(batches)):
        per_seq = (logprob * mb.response_mask).sum(1)
        pos = mb.advantages > 0
        if ps.get_tensor_model_parallel_rank() == 0:
            sums += torch.tensor([per_seq[pos].sum(), pos.sum(), per_seq[~pos].sum(), (~pos).sum()], dtype=torch.float64)
    dist.all_reduce(sums)
    return {"positive": float(sums[0] / sums[1]), "negative": float(sums[2] / sums[3])}


def main(out_dir: str, tp: str, pp: str, ep: str, mode: str, threshold: str, steps: str, hf_dir: str,
         recompute: str = "") -> None:
    from megatron.core import parallel_state as ps

    arch = Qwen3Arch.from_hf(hf_dir)
    layout = ParallelLayout(tp=int(tp), pp=int(pp), ep=int(ep))
    init_parallel(layout, arch)
    learner = Learner(arch, layout, ModelOptions(recompute=recompute == "recompute"),
                      OptimizerConfig(lr=1e-3, clip_grad=1.0),
                      LossConfig(mode=mode, low=float(threshold), high=float(threshold)))
    load_hf_weights(learner.module, arch, hf_dir)
    batches = toy_micro_batches(hf_dir, arch, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    before = mean_response_logprob(learner, batches)
    history = [learner.train_step(batches) for _ in range(int(steps))]
    after = mean_response_logprob(learner, batches)
    if dist.get_rank() == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "metrics.json").write_text(json.dumps(history, indent=1))
        (Path(out_dir) / "policy.json").write_text(json.dumps({"before": before, "after": after}))
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])


def stepped_learner(hf_dir: str, tp: str, ep: str) -> tuple[Learner, Qwen3Arch]:
    """A learner at this layout, loaded from hf_dir, after one DPPO step on the toy batch."""
    from megatron.core import parallel_state as ps

    arch = Qwen3Arch.from_hf(hf_dir)
    layout = ParallelLayout(tp=int(tp), ep=int(ep))
    init_parallel(layout, arch)
    learner = Learner(arch, layout, ModelOptions(), OptimizerConfig(lr=1e-3), LossConfig())
    load_hf_weights(learner.module, arch, hf_dir)
    learner.train_step(toy_micro_batches(hf_dir, arch, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()))
    return learner, arch
