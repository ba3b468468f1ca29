"""A running cluster job's layout: which node runs the learner and which runs each rollout
server, with the servers' specs. Written once by the job script (`dppo-megatron job-layout`),
read by the trainer (to find its servers) and by each node's `serve-node` agent (to start them)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from dppo_megatron.keys import LOOPBACK
from dppo_megatron.rollout.servers import ServerSpec


@dataclass
class JobLayout:
    learner_nodes: list[str]
    server_nodes: list[str]  # the nodes that run at least one server
    master_addr: str
    master_port: int
    agent_port: int
    log_dir: str
    servers: list[dict]  # {"node": name, "spec": ServerSpec fields}

    def specs_on(self, node: str) -> list[ServerSpec]:
        return [spec_from_json(s["spec"]) for s in self.servers if s["node"] == node]

    @property
    def urls(self) -> list[str]:
        return [self._address(s, s["spec"]["port"]) for s in self.servers]

    @property
    def agents(self) -> dict[str, str]:
        """Each server's URL -> the URL of the `serve-node` agent that runs it."""
        return {self._address(s, s["spec"]["port"]): self._address(s, self.agent_port) for s in self.servers}

    @staticmethod
    def _address(server: dict, port: int) -> str:
        return f"http://{reach(server['spec']['host'], server['node'])}:{port}"

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "JobLayout":
        return cls(**json.loads(Path(path).read_text()))


def reach(host: str, node: str) -> str:
    """How the trainer reaches a server that binds `host` on `node`."""
    return "127.0.0.1" if host in LOOPBACK else node


def spec_to_json(spec: ServerSpec) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}


def spec_from_json(fields: dict) -> ServerSpec:
    return ServerSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
