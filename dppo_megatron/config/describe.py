"""What `dppo-megatron validate` prints besides the resolved recipe: the model, the process
layout, a per-GPU memory estimate and, for colocated SGLang servers, the memory plan of both
phases (memory_plan.py)."""

from __future__ import annotations

import yaml

from dppo_megatron.config.memory_plan import learner_states, memory_plan, plan_applies, plan_table
from dppo_megatron.config.placement import expert_tp, learner_world_size, rank_coordinates, server_placements
from dppo_megatron.config.schema import Recipe
from dppo_megatron.config.validate import recipe_arch
from dppo_megatron.model.arch import parameter_counts

memory_estimate = learner_states  # the learner's weights, gradients and optimizer state per GPU


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
              f"weight sync {rollout.weight_sync}" + (", colocated with the learner" if rollout.colocate else "")]
    for index, server in enumerate(server_layout(recipe)):
        lines.append(f"server {index}: {server}")
    estimate = memory_estimate(recipe, arch)
    gib = 1024**3
    lines += ["", "# memory per learner GPU (weights, fp32 gradients, optimizer; activations not included)",
              f"weights {estimate.weights / gib:.2f} GiB, gradients {estimate.grads / gib:.2f} GiB, "
              f"optimizer {estimate.optimizer / gib:.2f} GiB, total {estimate.total / gib:.2f} GiB"]
    if plan_applies(recipe):
        lines += ["", "# memory plan per GPU, GiB (colocated: the servers generate, then the learner trains)",
                  *plan_table(memory_plan(recipe, arch))]
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
