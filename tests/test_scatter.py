"""A step's samples reach the ranks that train them: every data-parallel rank gets exactly
its planned samples (none lost, none repeated), its TP/PP peers the same micro-batches, and
rank 0 sends each DP rank's share once, in the compact types."""

import pytest
import torch

from dppo_megatron.learner.batches import compact_bytes, micro_batch, plan_step
from tests.distributed import run_torchrun_each
from tests.test_batches import numbered_samples

WORKER = "tests/workers/scatter.py"
LAYOUT = dict(pad_multiple=2, topk=3, routing=(2, 2))
COUNT, MINI_BATCHES, MICRO_BATCH_SIZE = 37, 2, 3
# How 4 global ranks map to data-parallel ranks: TP=2 peers side by side (Megatron's order),
# peers apart (as PP stages are), and DP=4.
LAYOUTS = {"tp2": "rank // 2", "strided": "rank % 2", "dp4": "rank"}


@pytest.fixture(scope="module")
def received(tmp_path_factory):
    out = tmp_path_factory.mktemp("scatter")
    runs = [[out / name, dp_of, COUNT, MINI_BATCHES, MICRO_BATCH_SIZE] for name, dp_of in LAYOUTS.items()]
    run_torchrun_each(WORKER, 4, runs)
    return {name: [torch.load(out / name / f"rank{r}.pt", weights_only=False) for r in range(4)] for name in LAYOUTS}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_dp_rank_trains_exactly_its_planned_samples(received, layout):
    ranks = received[layout]
    dp_size = len({r["dp_rank"] for r in ranks})
    samples = numbered_samples(COUNT)
    plan = plan_step(samples, mini_batches=MINI_BATCHES, dp_size=dp_size, micro_batch_size=MICRO_BATCH_SIZE)
    seen = []
    for rank in ranks:
        share = rank["share"]
        assert len(share) == len(plan)
        for mini, planned_mini in zip(share, plan):
            planned = planned_mini[rank["dp_rank"]]
            assert len(mini) == len(planned)
            for got, micro in zip(mini, planned):
                expected = micro_batch(micro, **LAYOUT)
                for field, value in vars(expected).items():
                    if value is not None:
                        assert torch.equal(got[field], value), (layout, field)
                if rank is next(r for r in ranks if r["dp_rank"] == rank["dp_rank"]):
                    seen += (got["tokens"][:, 0] - 1000).tolist()
    assert sorted(seen) == list(range(COUNT))  # each sample once, over the DP ranks


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_rank_0_sends_each_other_dp_rank_its_compact_share_once(received, layout):
    ranks = received[layout]
    dp_size = len({r["dp_rank"] for r in ranks})
    plan = plan_step(numbered_samples(COUNT), mini_batches=MINI_BATCHES, dp_size=dp_size,
                     micro_batch_size=MICRO_BATCH_SIZE)
    others = sum(compact_bytes(s) for mini in plan for dp_rank, share in enumerate(mini) if dp_rank != 0
                 for micro in share for s in micro)
    assert ranks[0]["compact"] == sum(compact_bytes(s) for s in numbered_samples(COUNT))
    assert others < ranks[0]["sent"] <= 1.2 * others + 4096 * dp_size  # the data once, plus a header each
