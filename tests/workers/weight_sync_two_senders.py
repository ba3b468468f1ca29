"""Rank program: the run's WeightPublisher with `weight_sync: distributed` on 2 ranks at EP=2
(each rank sends the experts it owns, rank 0 the rest) to 2 servers, several versions in a
row; then the same weights to OUT_DIR/reference (HF format) for comparison.

argv: OUT_DIR HF_DIR SERVER_URLS(comma-separated) VERSIONS"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learner_train import stepped_learner  # noqa: E402

from dppo_megatron.learner.weights import save_hf  # noqa: E402
from dppo_megatron.run.publisher import WeightPublisher  # noqa: E402


def main(out_dir, hf_dir, urls, versions) -> None:
    learner, arch = stepped_learner(hf_dir, "1", "2")
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    publisher = WeightPublisher(learner, arch, urls.split(","), method="distributed", weights_dir=Path(out_dir) / "w",
                                hf_config=config, side_files_from=Path(hf_dir), server_tp=1)
    assert publisher.senders == [0, 1], publisher.senders
    for version in range(1, int(versions) + 1):
        publisher.publish(version)
    publisher.close()
    save_hf(learner.module, arch, Path(out_dir) / "reference", config=config, dtype=torch.float32)
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
