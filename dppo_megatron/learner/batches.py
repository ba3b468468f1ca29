"""From scored rollout samples to the learner's micro-batches: mini-batches (one optimizer step
each), split over data-parallel ranks, cut into micro-batches, padded and laid out as
`MicroBatch` tensors (entry t of every per-token tensor is about token t); and a rank's share
of a step as one compact buffer (`pack_share` / `unpack_share`) for the trip from rank 0."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from dppo_megatron.learner.learner import MicroBatch


@dataclass
class TrainSample:
    """One response with its advantage, in the shape the learner needs (compact arrays; lists
    are accepted too)."""

    prompt_ids: list[int] | np.ndarray
    response_ids: list[int] | np.ndarray
    rollout_logprobs: np.ndarray  # float32 [response_len]
    advantage: float
    topk_ids: np.ndarray | None = None  # int32 [response_len, K]
    topk_logprobs: np.ndarray | None = None  # float32 [response_len, K]
    routed_experts: np.ndarray | None = None  # [prompt + response - 1, layers, k], small unsigned ints
    block: np.ndarray | None = field(default=None, repr=False, compare=False)  # see pack_sample

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
    # int16 holds any expert id and the -1 of "no route" at a quarter of int64's memory; the
    # routers get int64 one layer at a time (RoutingReplay.local_routes).
    routes = torch.full((b, length, *routing), -1, dtype=torch.int16) if routing else None
    # Each array is copied once into its padded place; the copy converts the compact dtype.
    for row, sample in enumerate(samples):
        start, end = len(sample.prompt_ids), sample.length
        tokens[row, :start] = _tensor(sample.prompt_ids)
        tokens[row, start:end] = _tensor(sample.response_ids)
        mask[row, start:end] = True
        rollout[row, start:end] = _tensor(sample.rollout_logprobs)
        if topk:
            topk_ids[row, start:end] = _tensor(sample.topk_ids)
            topk_logprobs[row, start:end] = _tensor(sample.topk_logprobs)
        if routing:
            routes[row, : end - 1] = _tensor(sample.routed_experts)
    return MicroBatch(tokens=tokens, response_mask=mask, rollout_logprobs=rollout,
                      advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32),
                      topk_ids=topk_ids, topk_logprobs=topk_logprobs, routed_experts=routes)


def _tensor(values) -> torch.Tensor:
    """A numpy array as a tensor without a copy (lists become one)."""
    return torch.from_numpy(np.asarray(values))


# --- a rank's share of a step as one buffer ---------------------------------------------------
#
# A sample's arrays live in one compact block (`pack_sample`), made as its response arrives; a
# share is a small JSON header (the nesting, the advantages, the blocks' sizes) followed by the
# blocks, so that after the last response nothing is copied on rank 0: the blocks are sent as
# they are (`share_pieces`), and the receiving rank's samples are views into what it received.

_ALIGN = 8
_HEAD = 6  # int64s at the start of a block: prompt len, response len, K, route layers, route k, route dtype


def _aligned(nbytes: int) -> int:
    return nbytes + (-nbytes % _ALIGN)


def _block_fields(head: np.ndarray) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    prompt_len, response_len, topk, layers, k, route_code = (int(v) for v in head)
    fields = [("tokens", np.dtype(np.int32), (prompt_len + response_len,)),
              ("logprobs", np.dtype(np.float32), (response_len,))]
    if topk:
        fields += [("topk_ids", np.dtype(np.int32), (response_len, topk)),
                   ("topk_logprobs", np.dtype(np.float32), (response_len, topk))]
    if route_code:
        fields.append(("routes", np.dtype(chr(route_code)), (prompt_len + response_len - 1, layers, k)))
    return fields


def pack_sample(sample: TrainSample) -> TrainSample:
    """The sample with its arrays copied into one compact block (`block`; tokens int32, logprobs
    float32, top-K int32/float32, routes in their own small type), its arrays views into it."""
    routes = None if sample.routed_experts is None else np.asarray(sample.routed_experts)
    head = np.array([len(sample.prompt_ids), len(sample.response_ids),
                     0 if sample.topk_ids is None else np.shape(sample.topk_ids)[1],
                     *((0, 0, 0) if routes is None else (*routes.shape[1:], ord(routes.dtype.char)))], dtype=np.int64)
    fields = _block_fields(head)
    sizes = [_aligned(dtype.itemsize * math.prod(shape)) for _, dtype, shape in fields]
    block = np.zeros(head.nbytes + sum(sizes), dtype=np.uint8)
    block[:head.nbytes] = head.view(np.uint8)
    views = _block_views(block)
    views["tokens"][:len(sample.prompt_ids)] = sample.prompt_ids
    views["tokens"][len(sample.prompt_ids):] = sample.response_ids
    sources = {"logprobs": sample.rollout_logprobs, "topk_ids": sample.topk_ids,
               "topk_logprobs": sample.topk_logprobs, "routes": routes}
    for name, view in views.items():
        if name != "tokens":
            view[...] = np.asarray(sources[name]).reshape(view.shape)
    return _sample_of(block, views, sample.advantage)


def _block_views(block: np.ndarray) -> dict[str, np.ndarray]:
    head = block[:_HEAD * 8].view(np.int64)
    views, at = {}, _HEAD * 8
    for name, dtype, shape in _block_fields(head):
        nbytes = dtype.itemsize * math.prod(shape)
        views[name] = block[at:at + nbytes].view(dtype).reshape(shape)
        at += _aligned(nbytes)
    return views


def unpack_sample(block: np.ndarray, advantage: float) -> TrainSample:
    """The sample in a block made by `pack_sample` (its arrays views into it)."""
    return _sample_of(block, _block_views(block), advantage)


def _sample_of(block: np.ndarray, views: dict[str, np.ndarray], advantage: float) -> TrainSample:
    prompt_len = int(block[:8].view(np.int64)[0])
    return TrainSample(views["tokens"][:prompt_len], views["tokens"][prompt_len:], views["logprobs"], advantage,
                       views.get("topk_ids"), views.get("topk_logprobs"), views.get("routes"), block=block)


def share_pieces(share: list[list[list[TrainSample]]]) -> list[np.ndarray]:
    """share[mini_batch][micro_batch] -> samples, as the pieces of one buffer: a header, then
    each sample's block (packed here if it was not yet)."""
    samples = [s for mini in share for micro in mini for s in micro]
    blocks = [s.block if s.block is not None else pack_sample(s).block for s in samples]
    header = json.dumps({"nesting": [[len(micro) for micro in mini] for mini in share],
                         "advantages": [float(s.advantage) for s in samples],
                         "blocks": [b.size for b in blocks]}).encode()
    head = np.zeros(8 + _aligned(len(header)), dtype=np.uint8)
    head[:8] = np.array([len(header)], dtype=np.int64).view(np.uint8)
    head[8:8 + len(header)] = np.frombuffer(header, dtype=np.uint8)
    return [head, *blocks]


def pack_share(share: list[list[list[TrainSample]]]) -> np.ndarray:
    """A share as one uint8 buffer (`share_pieces` joined)."""
    return np.concatenate(share_pieces(share))


def share_header(head: np.ndarray) -> dict:
    """The header at the start of a share's buffer (at least its first piece)."""
    length = int(head[:8].view(np.int64)[0])
    return json.loads(head[8:8 + length].tobytes())


def _header_bytes(head: np.ndarray) -> int:
    """The size of the header piece, from its first 8 bytes."""
    return 8 + _aligned(int(head[:8].view(np.int64)[0]))


def unpack_share(buffer: np.ndarray) -> list[list[list[TrainSample]]]:
    """The inverse of `pack_share`; the samples' arrays are views into `buffer`."""
    header = share_header(buffer)
    at, samples = _header_bytes(buffer), []
    for size, advantage in zip(header["blocks"], header["advantages"]):
        samples.append(unpack_sample(buffer[at:at + size], advantage))
        at += size
    share, at = [], 0
    for mini in header["nesting"]:
        share.append([])
        for count in mini:
            share[-1].append(samples[at:at + count])
            at += count
    return share


def compact_bytes(sample: TrainSample) -> int:
    """The bytes of a sample's data in its compact types (what `pack_share` moves)."""
    size = 4 * sample.length + 4 * len(sample.response_ids) + 4
    for array in (sample.topk_ids, sample.topk_logprobs, sample.routed_experts):
        if array is not None:
            size += array.size * array.itemsize
    return size

