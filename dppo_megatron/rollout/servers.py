"""Starting, watching and restarting rollout servers: SGLang on GPUs, the embedded engine
elsewhere, as subprocesses with their logs in the run directory.

`ServerManager` runs the servers of this machine. `RemoteServers` is the trainer's handle on the
servers of a cluster job, which each node's `serve-node` agent runs (rollout/node_agent.py).
Both are `Servers`: the one way the run layer talks to its servers' processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dppo_megatron.keys import NO_KEYS, ApiKeys, KeyFileError, headers, keys_of, refuse_open_interface
from dppo_megatron.processes import die_with_parent
from dppo_megatron.rollout.protocol import error_message
from dppo_megatron.rollout.sglang_release import SGLANG_RELEASE

log = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    """A server did not become healthy."""


class ServerReleaseError(ServerStartError):
    """A server runs another SGLang release than the one the project speaks."""


@dataclass(frozen=True)
class ServerSpec:
    model_path: str
    port: int
    engine: str = "sglang"  # "sglang" | "embedded"
    host: str = "127.0.0.1"
    tp: int = 1
    dp: int = 1
    ep: int = 1
    mem_fraction: float = 0.85
    routed_experts: bool = False  # R3: --enable-return-routed-experts
    deterministic: bool = False  # SGLang: --enable-deterministic-inference (honours sampling seeds)
    memory_saver: bool = False  # SGLang: --enable-memory-saver (colocated: memory released for the learner)
    dtype: str | None = None  # None: the engine's default
    gpus: tuple[int, ...] = ()  # CUDA_VISIBLE_DEVICES for this server
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    python: str | None = None  # SGLang's interpreter where it is not the trainer's
    keys_file: str | None = None  # the run's API keys (keys.py): SGLang reads it as its --config

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


def server_command(spec: ServerSpec) -> list[str]:
    """The command line that starts one server."""
    if spec.engine == "sglang":
        command = [
            spec.python or sys.executable, "-m", "sglang.launch_server", "--model-path", spec.model_path,
            "--host", spec.host, "--port", str(spec.port), "--tp-size", str(spec.tp), "--dp-size", str(spec.dp),
            "--ep-size", str(spec.ep), "--mem-fraction-static", str(spec.mem_fraction), "--skip-tokenizer-init",
            # The trainer counts versions from 0, the initial model (SGLang's default is "default").
            "--weight-version", "0",
        ]
        if spec.dtype == "float8":  # FP8 weights, per-channel scales, computed from the checkpoint at load
            command += ["--quantization", "fp8"]
        elif spec.dtype:
            command += ["--dtype", spec.dtype]
        if spec.deterministic:
            command.append("--enable-deterministic-inference")
        if spec.memory_saver:
            command.append("--enable-memory-saver")
    elif spec.engine == "embedded":  # always deterministic: seeded sampling on CPU
        command = [sys.executable, "-m", "dppo_megatron", "serve-embedded", "--model-path", spec.model_path,
                   "--host", spec.host, "--port", str(spec.port), "--dtype", spec.dtype or "float32"]
    else:
        raise ValueError(f"unknown rollout engine {spec.engine!r}; choose sglang or embedded")
    if spec.routed_experts:
        command.append("--enable-return-routed-experts")
    if spec.keys_file:  # the keys by file: a command line is for every user of the node to read
        command += ["--config" if spec.engine == "sglang" else "--api-key-file", spec.keys_file]
    return command + list(spec.extra_args)


class Servers(Protocol):
    """Rollout servers, wherever they run."""

    @property
    def urls(self) -> list[str]: ...

    @property
    def keys(self) -> ApiKeys:
        """The keys the servers ask for (NO_KEYS: none)."""

    def start(self) -> list[str]:
        """Return once every server answers /health."""

    def healthy(self, url: str) -> bool:
        """Whether the server at `url` answers /health now."""

    def restart(self, url: str) -> None:
        """Start the server at `url` again (it starts from its initial weights); return once healthy."""

    def stop(self) -> None: ...


class ServerManager:
    """Runs the servers of `specs`; `restart(url)` is what the client calls on a dead one."""

    def __init__(self, specs: list[ServerSpec], log_dir: str | Path, *, health_timeout: float = 900.0):
        if len({spec.port for spec in specs}) != len(specs):
            raise ValueError("rollout servers need distinct ports")
        if len({spec.keys_file for spec in specs}) > 1:
            raise ValueError("rollout servers of one run share one key file")
        self.specs = {spec.url: spec for spec in specs}
        self.keys = keys_of(specs[0].keys_file) if specs else NO_KEYS
        self.log_dir = Path(log_dir)
        self.health_timeout = health_timeout
        self.processes: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {url: 0 for url in self.specs}
        # Every server is started from this one long-lived thread: the kernel ties a child's
        # parent-death signal to the thread that started it, and restarts are requested from
        # the client's short-lived worker threads.
        self._launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="server-launcher")

    @property
    def urls(self) -> list[str]:
        return list(self.specs)

    def __enter__(self) -> "ServerManager":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> list[str]:
        for url in self.specs:
            self._launch(url)
        for url in self.specs:
            self._wait_healthy(url)
        return self.urls

    def _launch(self, url: str) -> None:
        self._launcher.submit(self._start_process, url).result()

    def _start_process(self, url: str) -> None:
        spec = self.specs[url]
        try:
            refuse_open_interface(spec.host, self.keys, f"the {spec.engine} server on port {spec.port}")
        except KeyFileError as error:
            raise ServerStartError(str(error)) from None
        if not port_is_free(spec.host, spec.port):
            # A health check would find whatever answers there: never train against a stranger.
            raise ServerStartError(f"port {spec.port} on {spec.host} is already in use (another server or run?); "
                                   f"stop it or choose another rollout.base_port")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_dir / f"server-{spec.port}.log", "ab")  # noqa: SIM115 - owned by the process
        env = dict(os.environ)
        if spec.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, spec.gpus))
        command = server_command(spec)
        log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log_file.flush()
        # Own session (stopped as a group), and killed with the trainer if that dies first.
        self.processes[url] = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True, preexec_fn=die_with_parent)
        log_file.close()
        log.info("started %s server %s (pid %d)", spec.engine, url, self.processes[url].pid)

    def _wait_healthy(self, url: str) -> None:
        process = self.processes[url]

        def check_alive() -> None:
            if process.poll() is not None:
                raise ServerStartError(f"{url} exited with {process.returncode} while starting; "
                                       f"log tail:\n{self.log_tail(url)}")

        if not wait_healthy(url, self.health_timeout, check_alive):
            raise ServerStartError(f"{url} not healthy after {self.health_timeout:.0f}s; log tail:\n{self.log_tail(url)}")

    def log_tail(self, url: str, lines: int = 30) -> str:
        path = self.log_dir / f"server-{self.specs[url].port}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"

    def healthy(self, url: str) -> bool:
        return is_healthy(url)

    def restart(self, url: str) -> None:
        """Stop the server at `url` if it still runs, start it again, wait until healthy."""
        self._kill(url)
        self.restarts[url] += 1
        log.warning("restarting %s (restart %d)", url, self.restarts[url])
        self._launch(url)
        self._wait_healthy(url)

    def _kill(self, url: str, grace: float = 10.0) -> None:
        process = self.processes.get(url)
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop(self) -> None:
        for url in list(self.processes):
            self._kill(url)
        self._launcher.shutdown(wait=False)


class RemoteServers:
    """Servers run by `serve-node` agents on a cluster job's nodes. `agents` maps each server's
    URL to its agent's URL; a restart is asked of the agent, which answers once the server is
    healthy again."""

    def __init__(self, agents: dict[str, str], *, keys: ApiKeys = NO_KEYS, health_timeout: float = 1800.0,
                 agent_grace: float = 120.0):
        """`keys`: the servers' keys; the agents take the control key."""
        self.agents = dict(agents)
        self.keys = keys
        self.health_timeout = health_timeout
        self.agent_grace = agent_grace  # an agent may take this long to answer at all (srun, imports)

    @property
    def urls(self) -> list[str]:
        return list(self.agents)

    def __enter__(self) -> "RemoteServers":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> list[str]:
        """Wait until every server answers /health (the agents start them with the job). An
        agent that stops answering (it failed to start its servers and exited) ends the wait."""
        for url in self.agents:
            agent = self.agents[url]
            refused_since = [None]

            def check_agent() -> None:
                if is_healthy(agent):
                    refused_since[0] = None
                    return
                refused_since[0] = refused_since[0] or time.monotonic()
                if time.monotonic() - refused_since[0] > self.agent_grace:
                    raise ServerStartError(f"the agent {agent} that runs {url} has not answered for "
                                           f"{self.agent_grace:.0f}s: it failed to start (see the job log)")

            if not wait_healthy(url, self.health_timeout, check_agent):
                raise ServerStartError(f"{url} not healthy after {self.health_timeout:.0f}s; its agent is "
                                       f"{agent}; see the server logs of the run")
        return self.urls

    def healthy(self, url: str) -> bool:
        return is_healthy(url)

    def restart(self, url: str) -> None:
        agent = self.agents[url]
        log.warning("asking %s to restart %s", agent, url)
        answer = post_json(agent + "/restart", {"port": int(url.rsplit(":", 1)[1])}, self.health_timeout,
                           key=self.keys.for_control())
        if not answer.get("success"):
            raise ServerStartError(f"{agent} could not restart {url}: {answer.get('message')}")

    def stop(self) -> None:
        """Tell every agent that the trainer is done: it stops its servers and exits, and so
        does the job's server step. An agent that does not answer is left to the job script."""
        for agent in sorted(set(self.agents.values())):
            answer = post_json(agent + "/shutdown", {}, 30, key=self.keys.for_control())
            if not answer.get("success"):
                log.warning("could not stop the servers' agent %s: %s", agent, answer.get("message"))


def post_json(url: str, body: dict, timeout: float, *, key: str | None = None) -> dict:
    """POST `body` as JSON (with `key` as its Bearer token); the JSON answer, or {"success":
    False, "message": why} when the call fails (an error status, with the server's own message,
    or no answer at all)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **headers(key)})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read() or b"{}")
        # SGLang's memory endpoints answer a success with `null`.
        return answer if isinstance(answer, dict) else {"success": True, "answer": answer}
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        try:
            answer = json.loads(text)
        except ValueError:
            answer = {}
        message = answer.get("message") if isinstance(answer, dict) else None
        return {"success": False, "message": message or error_message(error.code, text)}
    except (urllib.error.URLError, OSError) as error:
        return {"success": False, "message": f"unreachable ({error})", "unreachable": True}


def server_release(url: str, timeout: float = 30.0, *, key: str | None = None) -> str | None:
    """The SGLang release a server reports in /server_info ("version"), None if it names none."""
    request = urllib.request.Request(url + "/server_info", headers=headers(key))
    with urllib.request.urlopen(request, timeout=timeout) as response:
        version = json.loads(response.read()).get("version")
    return str(version) if version is not None else None


def check_release(urls: list[str], keys: ApiKeys = NO_KEYS) -> None:
    """Refuse servers of another SGLang release: its weight-update session, request bodies and
    answers are the ones the project was checked against (tests/test_sglang_contract.py)."""
    for url in urls:
        try:
            found = server_release(url, key=keys.api_key)
        except (OSError, ValueError) as error:
            raise ServerReleaseError(f"{url}/server_info did not answer ({error}); cannot tell its SGLang release"
                                     ) from error
        if found != SGLANG_RELEASE:
            raise ServerReleaseError(
                f"{url} runs SGLang {found or '(no version in /server_info)'}; dppo-megatron supports SGLang "
                f"{SGLANG_RELEASE} (its weight-update session and request bodies): install "
                f"sglang=={SGLANG_RELEASE} in the servers' environment (pip install 'dppo-megatron[gpu]')")


def wait_healthy(url: str, timeout: float, check_alive=None) -> bool:
    """Poll `url`/health until it answers 200 (True) or `timeout` passes (False).
    `check_alive()` may raise to give up early (the server's process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check_alive is not None:
            check_alive()
        if is_healthy(url):
            return True
        time.sleep(0.5)
    return False


def is_healthy(url: str, timeout: float = 5.0) -> bool:
    """Whether `url`/health answers 200 within `timeout` seconds."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could bind `host:port` now (with SO_REUSEADDR, as servers do)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
