"""Rank program: one DPPO step, then publish the weights as a version for the rollout servers.

argv: OUT_DIR TP EP HF_DIR SYNC_ROOT VERSION. Rank 0 also saves the learner's logits after
the step (OUT_DIR/learner_logits.pt) for comparison with what the engine then serves."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learner_train import stepped_learner  # noqa: E402
from tiny_models import parity_tokens  # noqa: E402

from dppo_megatron.learner.forward import full_vocab_logits  # noqa: E402
from dppo_megatron.learner.weights import save_hf  # noqa: E402
from dppo_megatron.rollout.weight_sync import DiskWeightSync  # noqa: E402


def main(out_dir, tp, ep, hf_dir, sync_root, version) -> None:
    learner, arch = stepped_learner(hf_dir, tp, ep)
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    save_hf(learner.module, arch, DiskWeightSync(sync_root).version_dir(int(version)), config=config,
            dtype=torch.float32)
    logits = full_vocab_logits(learner.module, arch.vocab_size, parity_tokens(arch.vocab_size))
    if dist.get_rank() == 0:
        torch.save(logits, Path(out_dir) / "learner_logits.pt")
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
