"""The `serve-node` agent (`dppo-megatron serve-node LAYOUT`): on one node of a cluster job, run
the rollout servers the job's layout placed there, and restart one when the trainer asks.

The job script starts one agent per server node (`srun ... serve-node`). The trainer, on
another node perhaps, cannot start processes here, so its `RemoteServers.restart(url)` asks
the agent: `POST /restart {"port": P}` answers 200 once the server is healthy again (500 with
the server's log tail when it is not). `GET /health` lists the node's servers. `POST /shutdown`
(the trainer, when it is done) or SIGTERM stops the servers and the agent; SIGUSR1 (SLURM's warning, which may reach every process of a job)
is the trainer's business and is ignored here. Both POSTs ask for the servers' control key
(keys.py) as a Bearer token, 401 otherwise; /health is open.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from dppo_megatron.keys import KeyFileError, bearer_matches, refuse_open_interface
from dppo_megatron.rollout.job_layout import LOOPBACK, JobLayout
from dppo_megatron.rollout.protocol import UNAUTHORIZED
from dppo_megatron.rollout.servers import ServerManager, ServerStartError

log = logging.getLogger(__name__)


def this_node() -> str:
    """The node's name as SLURM lists it (the layout's names come from the job's node list)."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def make_agent(manager: ServerManager, node: str, host: str, port: int) -> ThreadingHTTPServer:
    control_key = manager.keys.for_control()
    refuse_open_interface(host, manager.keys, f"the node agent of {node}")
    restart_lock = threading.Lock()  # one restart at a time: two for the same server would race

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):
            log.debug("%s - %s", self.address_string(), format % args)

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.split("?", 1)[0] != "/health":
                return self._send(HTTPStatus.NOT_FOUND, {"error": {"message": f"no GET endpoint {self.path}"}})
            servers = [{"url": url, "pid": p.pid, "running": p.poll() is None, "restarts": manager.restarts[url]}
                       for url, p in manager.processes.items()]
            return self._send(HTTPStatus.OK, {"node": node, "servers": servers})

        def do_POST(self):
            if control_key and not bearer_matches(self.headers.get("Authorization"), control_key):
                self.close_connection = True  # its body is not read
                return self._send(HTTPStatus.UNAUTHORIZED, UNAUTHORIZED)
            if self.path.split("?", 1)[0] == "/shutdown":  # the trainer is done with the servers
                self._send(HTTPStatus.OK, {"success": True, "node": node, "stopping": manager.urls})
                threading.Thread(target=self.server.shutdown, daemon=True).start()
                return None
            if self.path.split("?", 1)[0] != "/restart":
                return self._send(HTTPStatus.NOT_FOUND, {"error": {"message": f"no POST endpoint {self.path}"}})
            length = int(self.headers.get("Content-Length") or 0)
            try:
                port_wanted = int(json.loads(self.rfile.read(length) or b"{}")["port"])
            except (ValueError, KeyError, TypeError) as error:
                return self._send(HTTPStatus.BAD_REQUEST, {"error": {"message": f"expected {{\"port\": N}}: {error}"}})
            url = next((u for u, spec in manager.specs.items() if spec.port == port_wanted), None)
            if url is None:
                ports = sorted(spec.port for spec in manager.specs.values())
                return self._send(HTTPStatus.NOT_FOUND,
                                  {"error": {"message": f"no server on port {port_wanted} here; ports {ports}"}})
            with restart_lock:
                try:
                    manager.restart(url)
                except ServerStartError as error:
                    return self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": {"message": str(error)}})
            return self._send(HTTPStatus.OK, {"success": True, "url": url, "restarts": manager.restarts[url]})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve_node(layout_path: Path, node: str | None = None) -> int:
    layout = JobLayout.load(layout_path)
    node = node or this_node()
    specs = layout.specs_on(node)
    if not specs:
        known = sorted({s["node"] for s in layout.servers})
        print(f"error: the layout {layout_path} places no server on {node}; servers are on {known}", flush=True)
        return 2
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        manager = ServerManager(specs, layout.log_dir)
    except KeyFileError as error:
        print(f"error: {node}: {error}", flush=True)
        return 1
    # The control port is as reachable as the servers themselves.
    host = "127.0.0.1" if all(spec.host in LOOPBACK for spec in specs) else "0.0.0.0"
    try:
        agent = make_agent(manager, node, host, layout.agent_port)
        manager.start()
        reached_at = [url for url, server in zip(layout.urls, layout.servers) if server["node"] == node]
        print(f"{node}: {len(specs)} server(s) healthy: {', '.join(reached_at)}; agent on {host}:{layout.agent_port}",
              flush=True)
        agent.serve_forever()
        print(f"{node}: the trainer is done; stopping the servers", flush=True)
    except (OSError, ServerStartError, KeyFileError) as error:  # the port taken, a server that would not start
        print(f"error: {node}: {error}", flush=True)
        return 1
    except SystemExit:
        print(f"{node}: stopping the servers", flush=True)
    finally:
        manager.stop()
    return 0


def _exit_on_sigterm(signum, frame):
    raise SystemExit(0)
