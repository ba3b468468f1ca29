"""Rank program: one DPPO step, then broadcast the weights to a rollout server from rank 0.

argv: OUT_DIR TP EP HF_DIR SERVER_URL MASTER_PORT VERSION [MODE]. MODE "rank0" (default): rank 0
gathers and sends everything; "owners": each expert is sent by the rank that holds it, each
sending rank in a group of its own (port MASTER_PORT + rank). Also writes the same weights to
OUT_DIR/reference (HF format) for comparison with what the server then serves."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learner_train import stepped_learner  # noqa: E402

from dppo_megatron.learner.weights import iter_hf_tensors, save_hf, sends_weights  # noqa: E402
from dppo_megatron.rollout.weight_sync import DistributedWeightSync  # noqa: E402


def main(out_dir, tp, ep, hf_dir, server, master_port, version, mode="rank0") -> None:
    learner, arch = stepped_learner(hf_dir, tp, ep)
    rank = dist.get_rank()
    if mode == "owners":
        tensors, sending = iter_hf_tensors(learner.module, arch, experts_from_owners=True), sends_weights(arch)
    else:
        tensors, sending = iter_hf_tensors(learner.module, arch), rank == 0
    if sending:  # every rank runs the iterator through: it is a collective
        sync = DistributedWeightSync([server], master_address="127.0.0.1", master_port=int(master_port) + rank,
                                     group_name=f"dppo-weights-r{rank}", bucket_bytes=64 * 1024)
        sync.connect()
        sent = sync.publish(tensors, int(version))
        sync.close()
        Path(out_dir, f"sent-rank{rank}.json").write_text(json.dumps({"bytes": sent, "names": sync.sent_names}))
    else:
        for _ in tensors:
            pass
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    save_hf(learner.module, arch, Path(out_dir) / "reference", config=config, dtype=torch.float32)


if __name__ == "__main__":
    main(*sys.argv[1:])
