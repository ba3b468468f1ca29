"""Where a run's processes go: learner ranks on nodes, rollout servers on nodes, GPUs and ports.

One plan for `validate` (what it prints), `train` (the servers of one machine) and cluster jobs
(`python -m dppo_megatron.placement`: the job's node names in, a layout file out, which the
trainer reads to find its servers and each node's `serve-node` reads to start them).

Servers go on the rollout nodes (`rollout.nodes` > 0) or, with `rollout.nodes: 0`, on the
learner nodes, on the GPUs the learner leaves free: a learner node runs its
`learner.ranks_per_node` ranks on GPUs 0..R-1 and its servers on the `rollout.gpus_per_node`
GPUs after them. A server never straddles two nodes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dppo_megatron.rollout.servers import ServerSpec
from dppo_megatron.run_dir import model_dir

if TYPE_CHECKING:  # config imports this module
    from dppo_megatron.config.schema import Recipe

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class LayoutError(ValueError):
    """A job's nodes cannot hold the recipe's processes."""


@dataclass(frozen=True)
class ServerPlacement:
    index: int
    node: int  # among the server nodes: the rollout nodes, or the learner nodes when colocated
    gpus: tuple[int, ...]  # node-local GPU ids (none for the embedded engine)
    port: int


def server_room(recipe: Recipe) -> tuple[int, int, int]:
    """(nodes the servers may use, GPUs for servers on each, the first of those GPUs)."""
    rollout, learner = recipe.rollout, recipe.learner
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


def wants_routes(recipe: Recipe) -> bool:
    """Whether the engines return routed experts: to replay them (R3), or to measure how often
    the learner's own routing agrees."""
    return recipe.rollout.r3 or recipe.rollout.record_routes


def server_specs(recipe: Recipe, run_dir: Path) -> list[ServerSpec]:
    rollout = recipe.rollout
    return [
        ServerSpec(model_path=str(model_dir(recipe, run_dir)), port=p.port, engine=rollout.engine, host=rollout.host,
                   tp=rollout.server_tp, dp=rollout.server_dp, ep=rollout.server_ep, mem_fraction=rollout.mem_fraction,
                   routed_experts=wants_routes(recipe),
                   dtype=None if rollout.dtype == "auto" else rollout.dtype, gpus=p.gpus,
                   extra_args=tuple(rollout.extra_args))
        for p in server_placements(recipe)
    ]


def job_nodes(recipe: Recipe) -> int:
    return recipe.learner.nodes + recipe.rollout.nodes


# --- a cluster job's layout ---------------------------------------------------------------


@dataclass
class JobLayout:
    """A running job's nodes and servers, written once by the job script."""

    learner_nodes: list[str]
    server_nodes: list[str]  # the nodes that run at least one server
    master_addr: str
    master_port: int
    agent_port: int
    log_dir: str
    servers: list[dict]  # {"node": name, "spec": ServerSpec fields}

    def specs_on(self, node: str) -> list[ServerSpec]:
        return [_spec(s["spec"]) for s in self.servers if s["node"] == node]

    @property
    def urls(self) -> list[str]:
        return [self._address(s, s["spec"]["port"]) for s in self.servers]

    @property
    def agents(self) -> dict[str, str]:
        """Each server's URL -> the URL of the `serve-node` agent that runs it."""
        return {self._address(s, s["spec"]["port"]): self._address(s, self.agent_port) for s in self.servers}

    @staticmethod
    def _address(server: dict, port: int) -> str:
        return f"http://{_reach(server['spec']['host'], server['node'])}:{port}"

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "JobLayout":
        return cls(**json.loads(Path(path).read_text()))


def _reach(host: str, node: str) -> str:
    """How the trainer reaches a server that binds `host` on `node`."""
    return "127.0.0.1" if host in LOOPBACK else node


def _spec(fields: dict) -> ServerSpec:
    return ServerSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def job_layout(recipe: Recipe, run_dir: Path, nodes: list[str]) -> JobLayout:
    """Learners on the first `learner.nodes` of the job's nodes, servers on the rest (or on
    the learner nodes when `rollout.nodes` is 0)."""
    learner = recipe.learner
    if len(nodes) != job_nodes(recipe):
        raise LayoutError(f"the job has {len(nodes)} node(s) ({', '.join(nodes)}); the recipe needs "
                          f"{job_nodes(recipe)}: learner.nodes {learner.nodes} + rollout.nodes {recipe.rollout.nodes}")
    learner_nodes = nodes[: learner.nodes]
    candidates = nodes[learner.nodes:] or learner_nodes
    servers = []
    for placement, spec in zip(server_placements(recipe), server_specs(recipe, run_dir)):
        node = candidates[placement.node]
        if spec.host in LOOPBACK and node != learner_nodes[0]:
            raise LayoutError(f"rollout.host {spec.host} is reachable only from its own node, and server "
                              f"{placement.index} runs on {node}, not with learner rank 0 on {learner_nodes[0]}: "
                              "set rollout.host: 0.0.0.0")
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}  # as JSON has them
        servers.append({"node": node, "spec": fields})
    used = [n for n in candidates if any(s["node"] == n for s in servers)]
    slurm = recipe.slurm
    return JobLayout(learner_nodes=learner_nodes, server_nodes=used, master_addr=learner_nodes[0],
                     master_port=slurm.master_port, agent_port=slurm.agent_port,
                     log_dir=str((run_dir / "logs").resolve()), servers=servers)


def main(argv: list[str] | None = None) -> int:
    """In a job script: write the layout and print it as shell variables."""
    from dppo_megatron.config.loading import RecipeError
    from dppo_megatron.config.validate import load_recipe
    from dppo_megatron.run_dir import RECIPE_FILE

    parser = argparse.ArgumentParser(prog="python -m dppo_megatron.placement", description=main.__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="where to write the layout (JSON)")
    parser.add_argument("nodes", nargs="+", help="the job's node names, in the job's order")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.run_dir / RECIPE_FILE)
        layout = job_layout(recipe, args.run_dir, args.nodes)
    except (RecipeError, LayoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    layout.save(args.out)
    values = {"LEARNER_NODES": ",".join(layout.learner_nodes), "NUM_LEARNER_NODES": len(layout.learner_nodes),
              "SERVER_NODES": ",".join(layout.server_nodes), "NUM_SERVER_NODES": len(layout.server_nodes),
              "MASTER_ADDR": layout.master_addr, "MASTER_PORT": layout.master_port}
    for name, value in values.items():
        print(f"{name}={shlex.quote(str(value))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
