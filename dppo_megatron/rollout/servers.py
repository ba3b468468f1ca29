"""Starting, watching and restarting rollout servers: SGLang on GPUs, the embedded engine
elsewhere, as subprocesses with their logs in the run directory."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dppo_megatron.launch_utils import die_with_parent

log = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    """A server did not become healthy."""


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
    dtype: str | None = None  # None: the engine's default
    gpus: tuple[int, ...] = ()  # CUDA_VISIBLE_DEVICES for this server
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


def server_command(spec: ServerSpec) -> list[str]:
    """The command line that starts one server."""
    if spec.engine == "sglang":
        command = [
            sys.executable, "-m", "sglang.launch_server", "--model-path", spec.model_path,
            "--host", spec.host, "--port", str(spec.port), "--tp-size", str(spec.tp), "--dp-size", str(spec.dp),
            "--ep-size", str(spec.ep), "--mem-fraction-static", str(spec.mem_fraction), "--skip-tokenizer-init",
        ]
        if spec.dtype:
            command += ["--dtype", spec.dtype]
    elif spec.engine == "embedded":
        command = [sys.executable, "-m", "dppo_megatron", "serve-embedded", "--model-path", spec.model_path,
                   "--host", spec.host, "--port", str(spec.port), "--dtype", spec.dtype or "float32"]
    else:
        raise ValueError(f"unknown rollout engine {spec.engine!r}; choose sglang or embedded")
    if spec.routed_experts:
        command.append("--enable-return-routed-experts")
    return command + list(spec.extra_args)


class ServerManager:
    """Runs the servers of `specs`; `restart(url)` is what the client calls on a dead one."""

    def __init__(self, specs: list[ServerSpec], log_dir: str | Path, *, health_timeout: float = 900.0):
        if len({spec.port for spec in specs}) != len(specs):
            raise ValueError("rollout servers need distinct ports")
        self.specs = {spec.url: spec for spec in specs}
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
        deadline = time.monotonic() + self.health_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerStartError(f"{url} exited with {process.returncode} while starting; "
                                       f"log tail:\n{self.log_tail(url)}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise ServerStartError(f"{url} not healthy after {self.health_timeout:.0f}s; log tail:\n{self.log_tail(url)}")

    def log_tail(self, url: str, lines: int = 30) -> str:
        path = self.log_dir / f"server-{self.specs[url].port}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"

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
