"""A step's samples, from rank 0 to the ranks that train them: rank 0 plans the step
(mini-batches, split over data-parallel ranks, cut into micro-batches) and sends each
data-parallel rank only its own samples, as one compact buffer, to the first rank of that DP
rank's model-parallel peers (TP x PP), which passes it on inside that group; every rank pads
its own micro-batches. Rank 0 never pads, nor pickles, another rank's share."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from dppo_megatron.learner.batches import TrainSample, compact_bytes, micro_batch, pack_share, plan_step, unpack_share
from dppo_megatron.learner.learner import MicroBatch


class SampleScatter:
    def __init__(self, group, *, dp_rank: int, dp_size: int, mini_batches: int, micro_batch_size: int,
                 layout: dict):
        """`group`: a gloo group of all ranks. `layout`: the keywords of `micro_batch`
        (pad_multiple, topk, routing). A collective (every rank's DP rank is gathered, and
        one gloo group is made per DP rank with more than one member)."""
        self.group, self.dp_size = group, dp_size
        self.mini_batches, self.micro_batch_size, self.layout = mini_batches, micro_batch_size, layout
        dp_rank_of = [None] * dist.get_world_size()
        dist.all_gather_object(dp_rank_of, dp_rank, group=group)
        self.leaders = {}  # DP rank -> the global rank that receives its share from rank 0
        self.peers = None  # this rank's gloo group of the same DP rank (None: alone in it)
        for index in range(dp_size):
            members = [rank for rank, d in enumerate(dp_rank_of) if d == index]
            self.leaders[index] = members[0]
            peers = dist.new_group(members, backend="gloo") if len(members) > 1 else None  # every rank calls it
            if index == dp_rank:
                self.peers, self.leader = peers, members[0]
        self.last_bytes_sent = 0  # by rank 0 in the last share()
        self.last_compact_bytes = 0  # the data of the step's samples, in their compact types

    def share(self, samples: list[TrainSample] | None) -> list[list[MicroBatch]]:
        """This rank's micro-batches, per mini-batch. `samples`: the step's, on rank 0 (None
        elsewhere). A collective."""
        rank = dist.get_rank()
        buffer = None
        if rank == 0:
            buffer = self._send(samples)
        elif rank == self.leader:
            size = torch.zeros(1, dtype=torch.int64)
            dist.recv(size, src=0, group=self.group)
            received = torch.empty(int(size), dtype=torch.uint8)
            dist.recv(received, src=0, group=self.group)
            buffer = received.numpy()
        if self.peers is not None:
            size = torch.tensor([buffer.size if rank == self.leader else 0], dtype=torch.int64)
            dist.broadcast(size, src=self.leader, group=self.peers)
            passed = torch.from_numpy(buffer) if rank == self.leader else torch.empty(int(size), dtype=torch.uint8)
            dist.broadcast(passed, src=self.leader, group=self.peers)
            buffer = passed.numpy()
        return [[micro_batch(micro, **self.layout) for micro in mini] for mini in unpack_share(buffer)]

    def _send(self, samples: list[TrainSample]) -> np.ndarray:
        """Rank 0: pack and send every DP rank's share (to each leader at once); returns its own."""
        plan = plan_step(samples, mini_batches=self.mini_batches, dp_size=self.dp_size,
                         micro_batch_size=self.micro_batch_size)
        own, pending, alive, sent = None, [], [], 0
        for index in range(self.dp_size):
            buffer = pack_share([mini[index] for mini in plan])
            leader = self.leaders[index]
            if leader == 0:
                own = buffer
                continue
            size = torch.tensor([buffer.size], dtype=torch.int64)
            payload = torch.from_numpy(buffer)
            pending += [dist.isend(size, dst=leader, group=self.group), dist.isend(payload, dst=leader, group=self.group)]
            alive.append((size, payload))  # until sent
            sent += buffer.size + size.numel() * 8
        for request in pending:
            request.wait()
        self.last_bytes_sent = sent
        self.last_compact_bytes = sum(compact_bytes(s) for mini in plan for share in mini for micro in share
                                      for s in micro)
        return own
