"""Rank program: train and score one micro-batch of engine samples with perturbed routers.

argv: OUT_DIR TP PP EP HF_DIR SAMPLES R3 RECOMPUTE (R3, RECOMPUTE: "on" / "off"). SAMPLES is a
torch file: a list of (prompt_ids, response_ids, engine_logprobs, routes [rows, layers, k]).
Rank 0 writes OUT_DIR/agreement.json: the routing agreement with the engine in the train step
and in a forward-only pass."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dppo_megatron.learner.learner import Learner, LossConfig, MicroBatch, OptimizerConfig
from dppo_megatron.learner.model import ModelOptions
from dppo_megatron.learner.parallel import init_parallel
from dppo_megatron.learner.weights import load_hf_weights
from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.model.layout import ParallelLayout


def micro_batch(samples, arch: Qwen3Arch, multiple: int) -> MicroBatch:
    length = max(len(p) + len(r) for p, r, _, _ in samples)
    length += -length % multiple  # sequence parallel splits the sequence evenly
    b = len(samples)
    tokens = torch.zeros(b, length, dtype=torch.long)
    rollout = torch.zeros(b, length)
    mask = torch.zeros(b, length, dtype=torch.bool)
    routes = torch.full((b, length, arch.num_layers, arch.num_experts_per_tok), -1, dtype=torch.long)
    for row, (prompt, response, logprobs, sample_routes) in enumerate(samples):
        n = len(prompt) + len(response)
        tokens[row, :n] = torch.tensor(prompt + response)
        rollout[row, len(prompt) : n] = torch.tensor(logprobs)
        mask[row, len(prompt) : n] = True
        routes[row, : n - 1] = torch.as_tensor(sample_routes).long()
    return MicroBatch(tokens=tokens, response_mask=mask, rollout_logprobs=rollout,
                      advantages=torch.linspace(-1, 1, b), routed_experts=routes)


def main(out_dir, tp, pp, ep, hf_dir, samples_file, r3, recompute) -> None:
    arch = Qwen3Arch.from_hf(hf_dir)
    layout = ParallelLayout(tp=int(tp), pp=int(pp), ep=int(ep))
    init_parallel(layout, arch)
    learner = Learner(arch, layout, ModelOptions(routing_replay=r3 == "on", recompute=recompute == "on"),
                      OptimizerConfig(lr=1e-4), LossConfig())
    load_hf_weights(learner.module, arch, hf_dir)
    with torch.no_grad():  # the learner's routers drift away from the engine's
        for layer in learner.module.decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if router is not None:
                noise = torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(layer.layer_number))
                router.weight.add_(noise.to(router.weight.device))
    batch = micro_batch(torch.load(samples_file, weights_only=False), arch, int(tp))
    metrics = learner.train_step([batch])
    learner.logprobs([batch])
    forward_only = learner.routing.agreement()
    if dist.get_rank() == 0:
        Path(out_dir, "agreement.json").write_text(json.dumps({"train": metrics["routing_agreement"],
                                                               "forward": forward_only}))
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
