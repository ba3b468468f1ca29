"""Where a recipe's processes go, in node indices: learner ranks on nodes, rollout servers on
nodes and GPUs, their ports. One plan for `validate` (what it prints), `train` (the servers of
one machine) and cluster jobs (`run/placement.py` turns it into a job's layout with node names).

Servers go on the rollout nodes (`rollout.nodes` > 0) or, with `rollout.nodes: 0`, on the
learner nodes, on the GPUs the learner leaves free: a learner node runs its
`learner.ranks_per_node` ranks on GPUs 0..R-1 and its servers on the `rollout.gpus_per_node`
GPUs after them. Colocated servers (`rollout.colocate`) share the learner's own GPUs instead,
from GPU 0: one server per `server_tp x server_dp` of a node's `learner.ranks_per_node` GPUs.
A server never straddles two nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from dppo_megatron.config.schema import LearnerConfig, Recipe
from dppo_megatron.model.layout import expert_tp_default


@dataclass(frozen=True)
class ServerPlacement:
    index: int
    node: int  # among the server nodes: the rollout nodes, or the learner nodes when colocated
    gpus: tuple[int, ...]  # node-local GPU ids (none for the embedded engine)
    port: int


def learner_world_size(recipe: Recipe) -> int:
    return recipe.learner.nodes * recipe.learner.ranks_per_node


def job_nodes(recipe: Recipe) -> int:
    return recipe.learner.nodes + recipe.rollout.nodes


def wants_routes(recipe: Recipe) -> bool:
    """Whether the engines return routed experts: to replay them (R3), or to measure how often
    the learner's own routing agrees."""
    return recipe.rollout.r3 or recipe.rollout.record_routes


def server_room(recipe: Recipe) -> tuple[int, int, int]:
    """(nodes the servers may use, GPUs for servers on each, the first of those GPUs)."""
    rollout, learner = recipe.rollout, recipe.learner
    if rollout.colocate:  # the learner's own GPUs, which the servers take turns with
        return learner.nodes, learner.ranks_per_node, 0
    if rollout.nodes:
        return rollout.nodes, rollout.gpus_per_node, 0
    return learner.nodes, rollout.gpus_per_node, learner.ranks_per_node


def server_placements(recipe: Recipe) -> list[ServerPlacement]:
    rollout = recipe.rollout
    if rollout.engine == "embedded":  # CPU processes: all on the first server node
        return [ServerPlacement(i, 0, (), rollout.base_port + i) for i in range(rollout.servers)]
    _, gpus_per_node, first_gpu = server_room(recipe)
    per_server = rollout.server_tp * rollout.server_dp
    per_node = max(1, gpus_per_node // per_server)
    placements = []
    for index in range(rollout.servers):
        node, slot = divmod(index, per_node)
        first = first_gpu + slot * per_server
        placements.append(ServerPlacement(index, node, tuple(range(first, first + per_server)),
                                          rollout.base_port + index))
    return placements


def expert_tp(learner: LearnerConfig) -> int:
    """learner.etp, or its default when the recipe leaves it out."""
    return learner.etp if learner.etp is not None else expert_tp_default(learner.tp, learner.ep)


def rank_coordinates(recipe: Recipe) -> list[dict]:
    """Each learner rank's place in Megatron's grids (order tp-cp-ep-dp-pp, TP fastest)."""
    learner = recipe.learner
    world = learner_world_size(recipe)
    dp = world // (learner.tp * learner.pp)
    etp = expert_tp(learner)
    edp = world // (learner.ep * etp * learner.pp)
    rows = []
    for rank in range(world):
        rows.append(dict(rank=rank, node=rank // learner.ranks_per_node, tp=rank % learner.tp,
                         dp=(rank // learner.tp) % dp, pp=rank // (learner.tp * dp),
                         ep=(rank // etp) % learner.ep, edp=(rank // (etp * learner.ep)) % edp))
    return rows
