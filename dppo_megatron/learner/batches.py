"""From scored rollout samples to the learner's micro-batches: mini-batches (one optimizer step
each), split over data-parallel ranks, cut into micro-batches, padded and laid out as
`MicroBatch` tensors (entry t of every per-token tensor is about token t)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dppo_megatron.learner.learner import MicroBatch


@dataclass
class TrainSample:
    """One response with its advantage, in the shape the learner needs."""

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    advantage: float
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    routed_experts: np.ndarray | None = None  # [prompt + response - 1, layers, k]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def split_evenly(items: list, parts: int) -> list[list]:
    """`parts` contiguous slices whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for index in range(parts):
        end = start + size + (index < extra)
        out.append(items[start:end])
        start = end
    return out


def plan_step(samples: list[TrainSample], *, mini_batches: int, dp_size: int, micro_batch_size: int
              ) -> list[list[list[list[TrainSample]]]]:
    """plan[mini_batch][dp_rank][micro_batch] -> samples. Every DP rank gets the same number of
    micro-batches per mini-batch (expert-parallel all-to-alls pair them up across ranks), so the
    count follows the smallest rank's share; no micro-batch is empty. Mini-batches with fewer
    samples than DP ranks are left out."""
    plan = []
    for mini in split_evenly(samples, mini_batches):
        if len(mini) < dp_size:
            continue
        shares = split_evenly(mini, dp_size)
        count = max(1, math.ceil(min(len(s) for s in shares) / micro_batch_size))
        plan.append([split_evenly(share, count) for share in shares])
    return plan


def micro_batch(samples: list[TrainSample], *, pad_multiple: int = 1, topk: int = 0,
                routing: tuple[int, int] | None = None) -> MicroBatch:
    """Pad `samples` to one length (a multiple of `pad_multiple`: sequence parallelism splits
    the sequence evenly over TP ranks). `topk`: K of the engine's top-K lists; `routing`:
    (layers, experts per token) of the routes, -1 where there are none."""
    length = max(s.length for s in samples)
    length += -length % pad_multiple
    b = len(samples)
    tokens = torch.zeros(b, length, dtype=torch.long)
    mask = torch.zeros(b, length, dtype=torch.bool)
    rollout = torch.zeros(b, length)
    topk_ids = torch.zeros(b, length, topk, dtype=torch.long) if topk else None
    topk_logprobs = torch.full((b, length, topk), -math.inf) if topk else None
    routes = torch.full((b, length, *routing), -1, dtype=torch.long) if routing else None
    for row, sample in enumerate(samples):
        start, end = len(sample.prompt_ids), sample.length
        tokens[row, :end] = torch.tensor(sample.prompt_ids + sample.response_ids)
        mask[row, start:end] = True
        rollout[row, start:end] = torch.tensor(sample.rollout_logprobs)
        if topk:
            topk_ids[row, start:end] = torch.tensor(sample.topk_ids)
            topk_logprobs[row, start:end] = torch.tensor(sample.topk_logprobs)
        if routing:
            routes[row, : end - 1] = torch.from_numpy(np.asarray(sample.routed_experts)).long()
    return MicroBatch(tokens=tokens, response_mask=mask, rollout_logprobs=rollout,
                      advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32),
                      topk_ids=topk_ids, topk_logprobs=topk_logprobs, routed_experts=routes)
