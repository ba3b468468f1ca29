"""Samples to micro-batches: the split over mini-batches and DP ranks, and the tensor layout
the learner expects (entry t of every per-token tensor is about token t)."""

import math

import numpy as np
import torch

from dppo_megatron.learner.batches import TrainSample, micro_batch, plan_step, split_evenly


def sample(prompt_len: int, response_len: int, advantage: float = 1.0, *, layers: int = 2, k: int = 2) -> TrainSample:
    prompt = list(range(1, prompt_len + 1))
    response = list(range(100, 100 + response_len))
    rows = prompt_len + response_len - 1
    routes = np.arange(rows * layers * k, dtype=np.int32).reshape(rows, layers, k) % 4
    return TrainSample(prompt, response, [-0.1 * (i + 1) for i in range(response_len)], advantage,
                       [[t, 7] for t in response], [[-0.5, -1.5]] * response_len, routes)


def test_split_evenly_keeps_order_and_sizes_within_one():
    parts = split_evenly(list(range(10)), 3)
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_every_dp_rank_gets_the_same_number_of_non_empty_micro_batches():
    samples = [sample(3, 2) for _ in range(11)]
    plan = plan_step(samples, mini_batches=1, dp_size=2, micro_batch_size=2)
    (mini,) = plan
    assert [len(rank) for rank in mini] == [3, 3]  # 6 and 5 samples: both cut into 3
    assert all(len(mb) >= 1 for rank in mini for mb in rank)
    assert sum(len(mb) for rank in mini for mb in rank) == 11


def test_mini_batches_smaller_than_the_dp_size_are_left_out():
    plan = plan_step([sample(3, 2) for _ in range(3)], mini_batches=3, dp_size=2, micro_batch_size=1)
    assert plan == []


def test_micro_batch_aligns_per_token_tensors_with_tokens_and_pads_to_the_tp_multiple():
    a, b = sample(3, 2, advantage=0.5), sample(2, 4, advantage=-1.0)
    batch = micro_batch([a, b], pad_multiple=4, topk=2, routing=(2, 2))
    assert batch.tokens.shape == (2, 8)  # longest is 6, padded to a multiple of 4
    assert batch.tokens[0, :5].tolist() == [1, 2, 3, 100, 101]
    assert batch.response_mask[0].tolist() == [False] * 3 + [True] * 2 + [False] * 3
    assert torch.allclose(batch.rollout_logprobs[0, 3:5], torch.tensor([-0.1, -0.2]))
    assert batch.topk_ids[1, 2:6, 0].tolist() == [100, 101, 102, 103]
    assert math.isinf(batch.topk_logprobs[0, 0, 0]) and batch.topk_logprobs[0, 3, 1] == -1.5
    assert batch.advantages.tolist() == [0.5, -1.0]
    # Routes: one row per token that was fed forward (all but the last), -1 elsewhere.
    assert batch.routed_experts.shape == (2, 8, 2, 2)
    assert torch.equal(batch.routed_experts[0, :4].long(), torch.from_numpy(a.routed_experts).long())
    assert (batch.routed_experts[0, 4:] == -1).all()


def numbered_samples(count: int, *, seed: int = 0) -> list[TrainSample]:
    """Samples of varied lengths in the compact types the client makes; sample i's first
    prompt token is 1000 + i, so that it can be recognised wherever it lands."""
    from dppo_megatron.rollout.protocol import route_dtype

    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        prompt_len, response_len = int(rng.integers(2, 6)), int(rng.integers(1, 9))
        samples.append(TrainSample(
            [1000 + index] + rng.integers(0, 900, prompt_len - 1).tolist(), rng.integers(0, 900, response_len).tolist(),
            rng.normal(size=response_len).astype(np.float32), float(rng.normal()),
            rng.integers(0, 900, (response_len, 3)).astype(np.int32), rng.normal(size=(response_len, 3)).astype(np.float32),
            rng.integers(0, 4, (prompt_len + response_len - 1, 2, 2)).astype(route_dtype(4))))
    return samples


def test_a_share_packs_into_one_buffer_and_unpacks_to_the_same_micro_batches():
    from dppo_megatron.learner.batches import compact_bytes, pack_share, unpack_share

    samples = numbered_samples(9)
    share = [[samples[:2], samples[2:5]], [samples[5:]]]
    buffer = pack_share(share)
    assert buffer.dtype == np.uint8 and buffer.nbytes <= 1.2 * sum(compact_bytes(s) for s in samples) + 1024
    unpacked = unpack_share(buffer)
    assert [[len(micro) for micro in mini] for mini in unpacked] == [[2, 3], [4]]
    layout = dict(pad_multiple=2, topk=3, routing=(2, 2))
    for mini, mini_back in zip(share, unpacked):
        for micro, micro_back in zip(mini, mini_back):
            expected, got = micro_batch(micro, **layout), micro_batch(micro_back, **layout)
            for field in ("tokens", "response_mask", "rollout_logprobs", "advantages", "topk_ids", "topk_logprobs",
                          "routed_experts"):
                assert torch.equal(getattr(expected, field), getattr(got, field)), field


def test_samples_packed_as_they_arrive_are_sent_as_they_are_and_come_back_equal():
    """The blocks made when responses arrived are the pieces of a share (nothing is copied after
    the last response); what the receiving rank unpacks equals the samples as they came."""
    from dppo_megatron.learner.batches import pack_sample, share_pieces, unpack_share

    originals = numbered_samples(5, seed=3)
    packed = [pack_sample(s) for s in originals]
    assert all(np.shares_memory(p.topk_ids, p.block) and np.shares_memory(p.routed_experts, p.block) for p in packed)
    pieces = share_pieces([[packed[:2]], [packed[2:]]])
    assert all(piece is p.block for piece, p in zip(pieces[1:], packed))
    received = [s for mini in unpack_share(np.concatenate(pieces)) for micro in mini for s in micro]
    for original, got in zip(originals, received, strict=True):
        assert got.advantage == original.advantage
        assert got.routed_experts.dtype == original.routed_experts.dtype  # routes keep their small type
        for name in ("prompt_ids", "response_ids", "rollout_logprobs", "topk_ids", "topk_logprobs", "routed_experts"):
            assert np.array_equal(getattr(got, name), np.asarray(getattr(original, name))), name
