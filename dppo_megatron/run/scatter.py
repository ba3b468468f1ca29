"""A step's samples, from rank 0 to the rank that trains them: rank 0 plans the step (mini-
batches, split over data-parallel ranks, cut into micro-batches) and sends every rank the
samples of its data-parallel rank; each rank pads its own micro-batches."""

from __future__ import annotations

import torch.distributed as dist

from dppo_megatron.learner.batches import TrainSample, micro_batch, plan_step
from dppo_megatron.learner.learner import MicroBatch


class SampleScatter:
    def __init__(self, group, *, dp_rank: int, dp_size: int, mini_batches: int, micro_batch_size: int,
                 layout: dict):
        """`group`: a gloo group of all ranks. `layout`: the keywords of `micro_batch`
        (pad_multiple, topk, routing). A collective (every rank's DP rank is gathered)."""
        self.group, self.dp_size = group, dp_size
        self.mini_batches, self.micro_batch_size, self.layout = mini_batches, micro_batch_size, layout
        self.dp_rank_of = [None] * dist.get_world_size()
        dist.all_gather_object(self.dp_rank_of, dp_rank, group=group)

    def share(self, samples: list[TrainSample] | None) -> list[list[MicroBatch]]:
        """This rank's micro-batches, per mini-batch. `samples`: the step's, on rank 0 (None
        elsewhere). A collective."""
        shares = None
        if dist.get_rank() == 0:
            plan = plan_step(samples, mini_batches=self.mini_batches, dp_size=self.dp_size,
                             micro_batch_size=self.micro_batch_size)
            shares = [[mini[dp_rank] for mini in plan] for dp_rank in self.dp_rank_of]
        received = [None]
        dist.scatter_object_list(received, shares, src=0, group=self.group)
        return [[micro_batch(micro, **self.layout) for micro in mini] for mini in received[0]]
