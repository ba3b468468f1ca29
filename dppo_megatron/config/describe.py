"""What `dppo-megatron validate` prints besides the resolved recipe: the model, the process
layout and a per-GPU memory estimate."""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from dppo_megatron.config.placement import expert_tp, learner_world_size, rank_coordinates, server_placements
from dppo_megatron.config.schema import Recipe
from dppo_megatron.config.validate import recipe_arch
from dppo_megatron.model.arch import Qwen3Arch, parameter_counts


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per learner GPU for the states that scale with the model (activations excluded)."""

    weights: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def memory_estimate(recipe: Recipe, arch: Qwen3Arch) -> MemoryEstimate:
    learner = recipe.learner
    world = learner_world_size(recipe)
    dense, experts = parameter_counts(arch)
    dense_local = dense / (learner.tp * learner.pp)
    etp = expert_tp(learner)
    expert_local = experts / (learner.ep * etp * learner.pp)
    dense_dp = world // (learner.tp * learner.pp)
    expert_dp = world // (learner.ep * etp * learner.pp)
    bf16 = recipe.model.dtype == "bfloat16"
    weight_bytes = 2 if bf16 else 4
    # Adam moments in fp32, plus fp32 master weights when training in bf16; gradients are
    # reduced in fp32 (Megatron's main_grad).
    optimizer_bytes = 12 if bf16 else 8
    shard_dense = dense_dp if learner.distributed_optimizer else 1
    shard_expert = expert_dp if learner.distributed_optimizer else 1
    return MemoryEstimate(
        weights=(dense_local + expert_local) * weight_bytes,
        grads=(dense_local + expert_local) * 4,
        optimizer=optimizer_bytes * (dense_local / shard_dense + expert_local / shard_expert),
    )


def describe(recipe: Recipe, resolved: dict) -> str:
    """The text of `dppo-megatron validate`."""
    arch = recipe_arch(recipe)
    learner, rollout = recipe.learner, recipe.rollout
    world = learner_world_size(recipe)
    lines = ["# resolved recipe", yaml.safe_dump(resolved, sort_keys=False).rstrip(), "", "# model"]
    dense, experts = parameter_counts(arch)
    lines.append(f"{arch.architecture}: {(dense + experts) / 1e9:.2f}B parameters ({experts / 1e9:.2f}B in experts), "
                 f"{arch.num_layers} layers, vocab {arch.vocab_size} (padded {arch.padded_vocab_size})")
    lines += ["", f"# learner: {world} ranks on {learner.nodes} node(s); TP {learner.tp} (sequence parallel "
              f"{'on' if learner.tp > 1 else 'off'}), PP {learner.pp}, "
              + (f"EP {learner.ep}, ETP {expert_tp(learner)}, " if arch.is_moe else "")
              + f"DP {world // (learner.tp * learner.pp)}"]
    rows = rank_coordinates(recipe)
    shown = rows if len(rows) <= 32 else rows[:16] + rows[-4:]
    lines.append("rank  node  tp  pp  dp  ep  expert-dp")
    for i, row in enumerate(shown):
        if len(rows) > 32 and i == 16:
            lines.append(f"  ... {len(rows) - 20} more ranks ...")
        lines.append(f"{row['rank']:>4}  {row['node']:>4}  {row['tp']:>2}  {row['pp']:>2}  {row['dp']:>2}  "
                     f"{row['ep']:>2}  {row['edp']:>9}")
    lines += ["", f"# rollout: {rollout.servers} {rollout.engine} server(s), R3 {'on' if rollout.r3 else 'off'}, "
              f"weight sync {rollout.weight_sync}"]
    for index, server in enumerate(server_layout(recipe)):
        lines.append(f"server {index}: {server}")
    estimate = memory_estimate(recipe, arch)
    gib = 1024**3
    lines += ["", "# memory per learner GPU (weights, fp32 gradients, optimizer; activations not included)",
              f"weights {estimate.weights / gib:.2f} GiB, gradients {estimate.grads / gib:.2f} GiB, "
              f"optimizer {estimate.optimizer / gib:.2f} GiB, total {estimate.total / gib:.2f} GiB"]
    return "\n".join(lines)


def server_layout(recipe: Recipe) -> list[str]:
    rollout = recipe.rollout
    out = []
    for placement in server_placements(recipe):
        if rollout.engine == "embedded":
            where = f"{'rollout' if rollout.nodes else 'learner'} node 0 (CPU)"
            out.append(f"embedded engine on {where}, {rollout.host}:{placement.port}")
            continue
        where = f"rollout node {placement.node}" if rollout.nodes else f"learner node {placement.node}"
        out.append(f"sglang on {where}, GPUs {placement.gpus[0]}-{placement.gpus[-1]}, port {placement.port}, "
                   f"tp {rollout.server_tp} dp {rollout.server_dp} ep {rollout.server_ep}")
    return out
