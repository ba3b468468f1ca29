"""Rank program: one optimizer step per loss case on the same global batch, from the same
weights, at one layout; the loss and gradient norm of each.

argv: OUT_DIR TP EP HF_DIR BATCH_FILE CASES R3. BATCH_FILE: a torch file with the global
batch (tokens, response_mask, rollout_logprobs, advantages, topk_ids, topk_logprobs and, for
R3, routed_experts), split here over the data-parallel ranks and into micro-batches of 2
sequences. CASES: JSON list of {name, mode, low, high, ratio_cap, relax_below, aggregation,
max_response_len}. R3: "on" replays routed_experts. Rank 0 writes OUT_DIR/results.json:
{name: {loss, grad_norm, tokens_masked}}."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dppo_megatron.algo import needs_old_logprob
from dppo_megatron.learner.learner import Learner, LossConfig, MicroBatch, OptimizerConfig
from dppo_megatron.learner.model import ModelOptions
from dppo_megatron.learner.parallel import init_parallel
from dppo_megatron.learner.weights import load_hf_weights
from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.model.layout import ParallelLayout

MICRO_BATCH = 2


def rank_micro_batches(batch: dict, dp_rank: int, dp_size: int) -> list[MicroBatch]:
    rows = batch["tokens"].shape[0] // dp_size
    mine = {k: v[dp_rank * rows : (dp_rank + 1) * rows] for k, v in batch.items()}
    return [MicroBatch(**{k: v[i : i + MICRO_BATCH] for k, v in mine.items()}) for i in range(0, rows, MICRO_BATCH)]


def main(out_dir, tp, ep, hf_dir, batch_file, cases, r3) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.router_replay import RouterReplay

    arch = Qwen3Arch.from_hf(hf_dir)
    layout = ParallelLayout(tp=int(tp), ep=int(ep))
    init_parallel(layout, arch)
    batch = torch.load(batch_file)
    if r3 != "on":
        batch.pop("routed_experts", None)
    results = {}
    for case in json.loads(cases):
        RouterReplay.clear_global_router_replay_instances()  # one model at a time in this process
        loss_config = LossConfig(**{k: v for k, v in case.items() if k != "name"})
        learner = Learner(arch, layout, ModelOptions(routing_replay=r3 == "on"),
                          OptimizerConfig(lr=1e-3, clip_grad=1.0), loss_config)
        load_hf_weights(learner.module, arch, hf_dir)
        micro_batches = rank_micro_batches(batch, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        if needs_old_logprob(loss_config.mode):
            learner.anchor_old_logprobs(micro_batches)
        metrics = learner.train_step(micro_batches)
        results[case["name"]] = {k: metrics[k] for k in ("loss", "grad_norm", "tokens_masked", "tokens")}
    if dist.get_rank() == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
