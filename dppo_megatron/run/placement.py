"""A recipe's placement plan (config/placement.py) made concrete: the server specs of a run
directory, and a cluster job's layout with SLURM's node names."""

from __future__ import annotations

from pathlib import Path

from dppo_megatron.config.placement import job_nodes, server_placements, wants_routes
from dppo_megatron.config.schema import Recipe
from dppo_megatron.keys import KEYS_FILE
from dppo_megatron.rollout.job_layout import LOOPBACK, JobLayout, spec_to_json
from dppo_megatron.rollout.servers import ServerSpec
from dppo_megatron.run.run_dir import model_dir


class PlacementError(ValueError):
    """A job's nodes cannot hold the recipe's processes."""


def keys_file(recipe: Recipe, run_dir: Path) -> Path:
    """The run's API keys (keys.py): `rollout.api_key_file`, else the run directory's own."""
    return Path(recipe.rollout.api_key_file) if recipe.rollout.api_key_file else run_dir / KEYS_FILE


def server_specs(recipe: Recipe, run_dir: Path) -> list[ServerSpec]:
    rollout = recipe.rollout
    keys = str(keys_file(recipe, run_dir).resolve())
    return [
        ServerSpec(model_path=str(model_dir(recipe, run_dir)), port=p.port, engine=rollout.engine, host=rollout.host,
                   tp=rollout.server_tp, dp=rollout.server_dp, ep=rollout.server_ep, mem_fraction=rollout.mem_fraction,
                   routed_experts=wants_routes(recipe), deterministic=rollout.deterministic, memory_saver=rollout.colocate,
                   dtype=None if rollout.dtype == "auto" else rollout.dtype, gpus=p.gpus,
                   extra_args=tuple(rollout.extra_args), python=rollout.sglang_python, keys_file=keys)
        for p in server_placements(recipe)
    ]


def tensor_ranks(recipe: Recipe) -> list[list[int]]:
    """For each server, the learner ranks that hand its TP ranks the weights by handle, in TP order:
    colocated on GPUs, the rank on the same GPU of the same node (learner ranks run on GPUs
    0..R-1 of their node); CPU engines, rank 0 for all (its memory is shared by name)."""
    rollout, per_node = recipe.rollout, recipe.learner.ranks_per_node
    return [[0] * rollout.server_tp if not p.gpus else [p.node * per_node + gpu for gpu in p.gpus]
            for p in server_placements(recipe)]


def job_layout(recipe: Recipe, run_dir: Path, nodes: list[str]) -> JobLayout:
    """Learners on the first `learner.nodes` of the job's nodes, servers on the rest (or on
    the learner nodes when `rollout.nodes` is 0)."""
    learner = recipe.learner
    if len(nodes) != job_nodes(recipe):
        raise PlacementError(f"the job has {len(nodes)} node(s) ({', '.join(nodes)}); the recipe needs "
                             f"{job_nodes(recipe)}: learner.nodes {learner.nodes} + rollout.nodes "
                             f"{recipe.rollout.nodes}")
    learner_nodes = nodes[: learner.nodes]
    candidates = nodes[learner.nodes:] or learner_nodes
    servers = []
    for placement, spec in zip(server_placements(recipe), server_specs(recipe, run_dir)):
        node = candidates[placement.node]
        if spec.host in LOOPBACK and node != learner_nodes[0]:
            raise PlacementError(f"rollout.host {spec.host} is reachable only from its own node, and server "
                                 f"{placement.index} runs on {node}, not with learner rank 0 on {learner_nodes[0]}: "
                                 "set rollout.host: 0.0.0.0")
        servers.append({"node": node, "spec": spec_to_json(spec)})
    used = [n for n in candidates if any(s["node"] == n for s in servers)]
    slurm = recipe.slurm
    return JobLayout(learner_nodes=learner_nodes, server_nodes=used, master_addr=learner_nodes[0],
                     master_port=slurm.master_port, agent_port=slurm.agent_port,
                     log_dir=str((run_dir / "logs").resolve()), servers=servers)
