"""Rank program: rank 0 hands a step's samples to the ranks with SampleScatter, under a
pretended layout (`dp_of`: how a global rank maps to its data-parallel rank), and every rank
saves what it received for the test to compare with the plan.

argv: OUT_DIR DP_OF (python expression of `rank` and `world`) SAMPLES MINI_BATCHES MICRO_BATCH_SIZE"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dppo_megatron.run.scatter import SampleScatter  # noqa: E402
from tests.test_batches import numbered_samples  # noqa: E402


def main(out_dir: str, dp_of: str, count: str, mini_batches: str, micro_batch_size: str) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_rank_of = [eval(dp_of, {}, {"rank": r, "world": world}) for r in range(world)]  # noqa: S307 - test input
    scatter = SampleScatter(dist.group.WORLD, dp_rank=dp_rank_of[rank], dp_size=len(set(dp_rank_of)),
                            mini_batches=int(mini_batches), micro_batch_size=int(micro_batch_size),
                            layout=dict(pad_multiple=2, topk=3, routing=(2, 2)))
    samples = numbered_samples(int(count)) if rank == 0 else None
    share = scatter.share(samples)
    received = [[{k: v for k, v in vars(mb).items() if v is not None} for mb in mini] for mini in share]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"dp_rank": dp_rank_of[rank], "share": received, "sent": scatter.last_bytes_sent,
                "compact": scatter.last_compact_bytes}, out / f"rank{rank}.pt")
