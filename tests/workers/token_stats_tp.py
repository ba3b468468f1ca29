"""Rank program: token_stats on this rank's vocabulary slice of every test case.

Each rank saves its per-token results and the gradient of its slice; the test assembles them
and compares with the float64 full-vocabulary reference."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: its tests package

from dppo_megatron.algo import token_stats  # noqa: E402
from tests.token_stats_reference import all_cases  # noqa: E402


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for case in all_cases():
        width = case.logits.shape[1] // world
        start = rank * width
        local = case.logits[:, start : start + width].clone().requires_grad_()
        stats = token_stats(
            local, case.target_ids, topk_ids=case.topk_ids, topk_logprobs=case.topk_logprobs,
            tp_group=dist.group.WORLD, vocab_start=start, temperature=case.temperature,
            vocab_size=case.vocab_size, with_entropy=True, chunk_tokens=7,
        )
        loss = (case.logprob_weights * stats.logprob).sum() + (case.entropy_weights * stats.entropy).sum()
        loss.backward()
        result = {
            "logprob": stats.logprob, "entropy": stats.entropy, "topk_tv": stats.topk_tv,
            "topk_kl": stats.topk_kl, "grad": local.grad, "vocab_start": start,
        }
        torch.save({k: v.detach() if torch.is_tensor(v) else v for k, v in result.items()},
                   Path(out_dir) / f"{case.name}-rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
