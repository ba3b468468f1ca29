"""A step's samples, from rank 0 to the ranks that train them: rank 0 plans the step
(mini-batches, split over data-parallel ranks, cut into micro-batches) and sends each
data-parallel rank only its own samples, as the compact blocks made when they arrived, to the
first rank of that DP rank's model-parallel peers (TP x PP), which passes them on inside that
group; every rank pads its own micro-batches. Rank 0 never pads, copies nor pickles another
rank's share."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from dppo_megatron.learner.batches import (
    TrainSample, compact_bytes, micro_batch, plan_step, share_header, share_pieces, unpack_share,
)
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
            buffer = self._receive()
        if self.peers is not None:
            size = torch.tensor([buffer.size if rank == self.leader else 0], dtype=torch.int64)
            dist.broadcast(size, src=self.leader, group=self.peers)
            passed = torch.from_numpy(buffer) if rank == self.leader else torch.empty(int(size), dtype=torch.uint8)
            dist.broadcast(passed, src=self.leader, group=self.peers)
            buffer = passed.numpy()
        return [[micro_batch(micro, **self.layout) for micro in mini] for mini in unpack_share(buffer)]

    def _send(self, samples: list[TrainSample]) -> np.ndarray:
        """Rank 0: send every DP rank's share (to each leader at once, the samples' blocks as they
        are: nothing is copied); returns its own, joined."""
        plan = plan_step(samples, mini_batches=self.mini_batches, dp_size=self.dp_size,
                         micro_batch_size=self.micro_batch_size)
        own, pending, sent = None, [], 0
        for index in range(self.dp_size):
            pieces = share_pieces([mini[index] for mini in plan])
            leader = self.leaders[index]
            if leader == 0:
                own = np.concatenate(pieces)
                continue
            sizes = torch.tensor([pieces[0].size, sum(piece.size for piece in pieces)], dtype=torch.int64)
            tensors = [sizes, *(torch.from_numpy(piece) for piece in pieces)]
            pending += [dist.isend(tensor, dst=leader, group=self.group) for tensor in tensors]
            sent += sum(tensor.numel() * tensor.element_size() for tensor in tensors)
        for request in pending:  # `pending` keeps the tensors alive until they are sent
            request.wait()
        self.last_bytes_sent = sent
        self.last_compact_bytes = sum(compact_bytes(s) for mini in plan for share in mini for micro in share
                                      for s in micro)
        return own

    def _receive(self) -> np.ndarray:
        """A DP rank's leader: its share from rank 0, the header and then each block in its place."""
        sizes = torch.zeros(2, dtype=torch.int64)
        dist.recv(sizes, src=0, group=self.group)
        received = torch.empty(int(sizes[1]), dtype=torch.uint8)
        head_size = int(sizes[0])
        dist.recv(received[:head_size], src=0, group=self.group)
        at, pending = head_size, []
        for size in share_header(received[:head_size].numpy())["blocks"]:
            pending.append(dist.irecv(received[at:at + size], src=0, group=self.group))
            at += size
        for request in pending:
            request.wait()
        return received.numpy()
