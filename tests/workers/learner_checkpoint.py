"""Rank program: resume a learner from a checkpoint at this layout and take one step.

argv: OUT_DIR TP EP HF_DIR LOAD. LOAD is a checkpoint directory, or "-" to start from HF_DIR
and take one warm-up step first (so that the optimizer has state). Saves the checkpoint
before the step in OUT_DIR/before, after it in OUT_DIR/after, and on rank 0 the logits before
and after and the step's metrics in OUT_DIR/result.pt."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learner_train import toy_micro_batches  # noqa: E402
from tiny_models import parity_tokens  # noqa: E402

from dppo_megatron.learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from dppo_megatron.learner.forward import full_vocab_logits  # noqa: E402
from dppo_megatron.learner.learner import Learner, LossConfig, OptimizerConfig  # noqa: E402
from dppo_megatron.learner.model import ModelOptions  # noqa: E402
from dppo_megatron.learner.parallel import init_parallel  # noqa: E402
from dppo_megatron.learner.weights import load_hf_weights  # noqa: E402
from dppo_megatron.model.arch import Qwen3Arch  # noqa: E402
from dppo_megatron.model.layout import ParallelLayout  # noqa: E402


def main(out_dir: str, tp: str, ep: str, hf_dir: str, load: str) -> None:
    from megatron.core import parallel_state as ps

    arch = Qwen3Arch.from_hf(hf_dir)
    layout = ParallelLayout(tp=int(tp), ep=int(ep))
    init_parallel(layout, arch)
    learner = Learner(arch, layout, ModelOptions(), OptimizerConfig(lr=1e-3), LossConfig(mode="dppo_binary_tv"))
    batches = toy_micro_batches(hf_dir, arch, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    out = Path(out_dir)
    if load == "-":
        load_hf_weights(learner.module, arch, hf_dir)
        learner.train_step(batches)
        trainer_state = {"note": "warm-up done"}
    else:
        trainer_state = load_checkpoint(latest_checkpoint(load), learner)
    save_checkpoint(out / "before", learner, trainer_state)
    tokens = parity_tokens(arch.vocab_size)
    before = full_vocab_logits(learner.module, arch.vocab_size, tokens)
    metrics = learner.train_step(batches)
    after = full_vocab_logits(learner.module, arch.vocab_size, tokens)
    hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
    save_checkpoint(out / "after", learner, trainer_state, hf_config=hf_config)
    if dist.get_rank() == 0:
        torch.save({"before": before, "after": after, "metrics": metrics, "step": learner.step,
                    "trainer_state": trainer_state}, out / "result.pt")
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
