"""From scored rollout samples to the learner's micro-batches: mini-batches (one optimizer step
each), split over data-parallel ranks, cut into micro-batches, padded and laid out as
`MicroBatch` tensors (entry t of every per-token tensor is about token t); and a rank's share
of a step as one compact buffer (`pack_share` / `unpack_share`) for the trip from rank 0."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

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
    for row, sample in enumerate(samples):
        start, end = len(sample.prompt_ids), sample.length
        tokens[row, :start] = torch.as_tensor(np.asarray(sample.prompt_ids, dtype=np.int64))
        tokens[row, start:end] = torch.as_tensor(np.asarray(sample.response_ids, dtype=np.int64))
        mask[row, start:end] = True
        rollout[row, start:end] = torch.as_tensor(np.asarray(sample.rollout_logprobs, dtype=np.float32))
        if topk:
            topk_ids[row, start:end] = torch.as_tensor(np.asarray(sample.topk_ids, dtype=np.int64))
            topk_logprobs[row, start:end] = torch.as_tensor(np.asarray(sample.topk_logprobs, dtype=np.float32))
        if routing:
            routes[row, : end - 1] = torch.as_tensor(np.asarray(sample.routed_experts).astype(np.int16))
    return MicroBatch(tokens=tokens, response_mask=mask, rollout_logprobs=rollout,
                      advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32),
                      topk_ids=topk_ids, topk_logprobs=topk_logprobs, routed_experts=routes)


# --- a rank's share of a step as one buffer ---------------------------------------------------

_ALIGN = 8


def pack_share(share: list[list[list[TrainSample]]]) -> np.ndarray:
    """share[mini_batch][micro_batch] -> samples, as one uint8 buffer: a JSON header (the
    nesting, each sample's lengths, dtypes) and the samples' arrays concatenated, in their
    compact types (tokens int32, logprobs float32, top-K int32/float32, routes as they came)."""
    samples = [s for mini in share for micro in mini for s in micro]
    first = samples[0] if samples else None
    topk = first.topk_ids.shape[1] if first is not None and first.topk_ids is not None else 0
    routes = first.routed_experts if first is not None and first.routed_experts is not None else None
    arrays = {
        "tokens": np.concatenate([np.concatenate([np.asarray(s.prompt_ids), np.asarray(s.response_ids)])
                                  for s in samples]).astype(np.int32) if samples else np.zeros(0, np.int32),
        "logprobs": _concat([s.rollout_logprobs for s in samples], np.float32),
        "advantages": np.array([s.advantage for s in samples], dtype=np.float32),
    }
    if topk:
        arrays["topk_ids"] = _concat([s.topk_ids for s in samples], np.int32)
        arrays["topk_logprobs"] = _concat([s.topk_logprobs for s in samples], np.float32)
    if routes is not None:
        arrays["routes"] = _concat([s.routed_experts for s in samples], routes.dtype)
    header = {
        "nesting": [[len(micro) for micro in mini] for mini in share],
        "prompt_lens": [len(s.prompt_ids) for s in samples],
        "response_lens": [len(s.response_ids) for s in samples],
        "topk": topk, "route_shape": list(routes.shape[1:]) if routes is not None else None,
        "arrays": {},
    }
    offset = 0
    for name, array in arrays.items():
        header["arrays"][name] = [array.dtype.str, offset, array.nbytes]
        offset += array.nbytes + (-array.nbytes % _ALIGN)
    encoded = json.dumps(header).encode()
    start = 8 + len(encoded) + (-len(encoded) % _ALIGN)
    buffer = np.zeros(start + offset, dtype=np.uint8)
    buffer[:8] = np.frombuffer(np.int64(len(encoded)).tobytes(), dtype=np.uint8)
    buffer[8:8 + len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
    for name, array in arrays.items():
        _, at, size = header["arrays"][name]
        buffer[start + at:start + at + size] = np.frombuffer(np.ascontiguousarray(array).tobytes(), dtype=np.uint8)
    return buffer


def unpack_share(buffer: np.ndarray) -> list[list[list[TrainSample]]]:
    """The inverse of `pack_share`; the samples' arrays are views into `buffer`."""
    header_len = int(np.frombuffer(buffer[:8].tobytes(), dtype=np.int64)[0])
    header = json.loads(buffer[8:8 + header_len].tobytes())
    start = 8 + header_len + (-header_len % _ALIGN)

    def array(name: str):
        if name not in header["arrays"]:
            return None
        dtype, at, size = header["arrays"][name]
        return buffer[start + at:start + at + size].view(np.dtype(dtype))

    tokens, logprobs, advantages = array("tokens"), array("logprobs"), array("advantages")
    topk, route_shape = header["topk"], header["route_shape"]
    topk_ids, topk_logprobs, routes = array("topk_ids"), array("topk_logprobs"), array("routes")
    if topk:
        topk_ids, topk_logprobs = topk_ids.reshape(-1, topk), topk_logprobs.reshape(-1, topk)
    if route_shape is not None:
        routes = routes.reshape(-1, *route_shape)
    samples, token_at, response_at, route_at = [], 0, 0, 0
    for index, (prompt_len, response_len) in enumerate(zip(header["prompt_lens"], header["response_lens"])):
        end = token_at + prompt_len + response_len
        rows = prompt_len + response_len - 1
        samples.append(TrainSample(
            prompt_ids=tokens[token_at:token_at + prompt_len], response_ids=tokens[token_at + prompt_len:end],
            rollout_logprobs=logprobs[response_at:response_at + response_len], advantage=float(advantages[index]),
            topk_ids=topk_ids[response_at:response_at + response_len] if topk else None,
            topk_logprobs=topk_logprobs[response_at:response_at + response_len] if topk else None,
            routed_experts=routes[route_at:route_at + rows] if route_shape is not None else None,
        ))
        token_at, response_at, route_at = end, response_at + response_len, route_at + rows
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


def _concat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=dtype) for a in arrays]) if arrays else np.zeros(0, dtype)
