"""Rank program: one DPPO step, then broadcast the weights to a rollout server from rank 0.

argv: OUT_DIR TP EP HF_DIR SERVER_URL MASTER_PORT VERSION [MODE]. MODE "rank0" (default): rank 0
gathers and sends everything, in a weight-update session of its own, on a server where a
trainer that stopped mid-update left a session open (rank 0 opens one first, as that trainer
did); "owners": each expert is sent by the rank that holds it, each sending rank in a group of
its own (port MASTER_PORT + rank), inside one session that rank 0 holds around both. Also
writes the same weights to OUT_DIR/reference (HF format) for comparison with what the server
then serves, and rank 0's log lines to OUT_DIR/log.json."""

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learner_train import stepped_learner  # noqa: E402

from dppo_megatron.learner.weights import iter_hf_tensors, save_hf, sends_weights  # noqa: E402
from dppo_megatron.rollout.servers import post_json  # noqa: E402
from dppo_megatron.rollout.weight_sync import (  # noqa: E402
    DistributedWeightSync,
    begin_weight_update,
    end_weight_update,
)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record) -> None:
        self.lines.append(record.getMessage())


def main(out_dir, tp, ep, hf_dir, server, master_port, version, mode="rank0") -> None:
    learner, arch = stepped_learner(hf_dir, tp, ep)
    rank, owners = dist.get_rank(), mode == "owners"
    lines = Lines()
    logging.getLogger("dppo_megatron").addHandler(lines)
    if owners:
        tensors, sending = iter_hf_tensors(learner.module, arch, experts_from_owners=True), sends_weights(arch)
        if rank == 0:
            begin_weight_update([server])
        dist.barrier()
    else:
        tensors, sending = iter_hf_tensors(learner.module, arch), rank == 0
        if rank == 0:  # what a trainer that stopped during an update leaves behind
            assert post_json(server + "/begin_weight_update", {"selector": "all"}, 60)["success"]
    if sending:  # every rank runs the iterator through: it is a collective
        sync = DistributedWeightSync([server], master_address="127.0.0.1", master_port=int(master_port) + rank,
                                     group_name=f"dppo-weights-r{rank}", bucket_bytes=64 * 1024)
        sync.connect()
        sent = sync.publish(tensors, int(version), session=not owners)
        sync.close()
        Path(out_dir, f"sent-rank{rank}.json").write_text(json.dumps({"bytes": sent, "names": sync.sent_names}))
    else:
        for _ in tensors:
            pass
    if owners:
        dist.barrier()
        if rank == 0:
            assert end_weight_update([server]) == {}
    if rank == 0:
        Path(out_dir, "log.json").write_text(json.dumps(lines.lines))
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    save_hf(learner.module, arch, Path(out_dir) / "reference", config=config, dtype=torch.float32)


if __name__ == "__main__":
    main(*sys.argv[1:])
