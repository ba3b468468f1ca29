"""The embedded engine behind SGLang's HTTP endpoints (`dppo-megatron serve-embedded`).

Binds 127.0.0.1 by default; on any other interface it needs keys (keys.py), which it checks as
SGLang's `--api-key` / `--admin-api-key` do: 401 without the right Bearer token, on every
endpoint but the health checks, before anything else happens. Malformed requests get 400 with
the reason, in SGLang's error shape ({"error": {"message": ...}}).
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from dppo_megatron.keys import NO_KEYS, ApiKeys, bearer_matches, refuse_open_interface
from dppo_megatron.rollout.engine import EmbeddedEngine, RequestError
from dppo_megatron.rollout.protocol import UNAUTHORIZED
from dppo_megatron.rollout.sglang_release import SGLANG_RELEASE

log = logging.getLogger(__name__)


# SGLang 0.5.23's auth (utils/auth.py, entrypoints/http_server.py's @auth_level marks): the
# endpoints marked ADMIN_OPTIONAL among those the project calls or the embedded engine serves;
# every other endpoint is "normal". Paths under these prefixes are open whatever the keys.
ADMIN_OPTIONAL_PATHS = frozenset({
    "/flush_cache", "/abort_request", "/update_weights_from_disk", "/init_weights_update_group",
    "/update_weights_from_distributed", "/destroy_weights_update_group", "/begin_weight_update",
    "/end_weight_update", "/update_weights_from_tensor", "/release_memory_occupation", "/resume_memory_occupation",
})
OPEN_PREFIXES = ("/health", "/ready", "/metrics")


def request_authorized(method: str, path: str, authorization: str | None, api_key: str | None,
                       admin_api_key: str | None) -> bool:
    """Whether SGLang lets this request through: health, readiness and metrics always; an
    ADMIN_OPTIONAL endpoint with the admin key where one is set (the generation key does not
    open it then), else with the generation key, else open; any other endpoint with the
    generation key where one is set, else open."""
    if method == "OPTIONS" or path.startswith(OPEN_PREFIXES):
        return True
    wanted = (admin_api_key or api_key) if path in ADMIN_OPTIONAL_PATHS else api_key
    return not wanted or bearer_matches(authorization, wanted)


# A /generate body of 4096 prompts of 2k tokens is about 60 MB of JSON; nothing the trainer
# sends comes near this, and a bigger one would only exhaust the engine's memory.
MAX_BODY_BYTES = 64 * 1024**2


# /health answers 503 when the engine has made no progress for this long: a forward of the
# models it serves takes milliseconds.
STALL_SECONDS = 120.0


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON value")


class _Server(ThreadingHTTPServer):
    # The listen backlog: a client opens up to max_in_flight_per_server connections at once,
    # and the default (5) resets the rest.
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            log.debug("%s went away", client_address)  # a client that left is not a server error
            return
        super().handle_error(request, client_address)


def make_server(engine: EmbeddedEngine, host: str = "127.0.0.1", port: int = 30000, *,
                stall_seconds: float = STALL_SECONDS, keys: ApiKeys = NO_KEYS) -> ThreadingHTTPServer:
    refuse_open_interface(host, keys, "the embedded engine")
    handler = type("EngineHandler", (_Handler,), {"engine": engine, "stall_seconds": stall_seconds, "keys": keys})
    server = _Server((host, port), handler)
    server.daemon_threads = True
    return server


class _Handler(BaseHTTPRequestHandler):
    engine: EmbeddedEngine
    stall_seconds: float
    keys: ApiKeys
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # route access logs through logging, quietly
        log.debug("%s - %s", self.address_string(), format % args)

    # --- plumbing -------------------------------------------------------------------------

    def _send(self, status: int, payload) -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client left: nobody to answer
            self.close_connection = True
            log.debug("%s left before its answer", self.address_string())

    @contextlib.contextmanager
    def _client_gone(self):
        """An event set when the client closes its connection (checked twice a second while the
        block runs): the engine then stops the request."""
        gone, done = threading.Event(), threading.Event()
        connection = self.connection

        def watch() -> None:
            while not done.wait(0.5):
                try:
                    readable, _, _ = select.select([connection], [], [], 0)
                    if readable and not connection.recv(1, socket.MSG_PEEK):
                        gone.set()
                        return
                except (OSError, ValueError):
                    gone.set()
                    return

        threading.Thread(target=watch, daemon=True).start()
        try:
            yield gone
        finally:
            done.set()

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message}})

    def _body(self) -> dict | None:
        header = self.headers.get("Content-Length") or "0"
        if not header.isdigit():
            self.close_connection = True  # the body's end is unknown: nothing more can be read
            self._error(HTTPStatus.BAD_REQUEST, f"Content-Length must be a byte count, got {header!r:.40}")
            return None
        length = int(header)
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # not read: the connection cannot be reused
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"request body of {length} bytes is over the limit of {MAX_BODY_BYTES} bytes")
            return None
        raw = self.rfile.read(length) if length else b"{}"
        try:
            # NaN and Infinity are not JSON (RFC 8259). SGLang's parser takes them and its checks
            # refuse them where they matter (a NaN temperature: 400); here they stop at the door.
            body = json.loads(raw or b"{}", parse_constant=_not_json)
        except (ValueError, UnicodeDecodeError) as error:
            self._error(HTTPStatus.BAD_REQUEST, f"request body is not JSON: {error}")
            return None
        except RecursionError:
            self._error(HTTPStatus.BAD_REQUEST, "request body is not JSON this server reads: nested too deeply")
            return None
        if not isinstance(body, dict):
            self._error(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
            return None
        return body

    # --- endpoints ------------------------------------------------------------------------

    def do_GET(self):
        self._route(get=True)

    def do_POST(self):
        self._route(get=False)

    def _route(self, get: bool) -> None:
        path = self.path.split("?", 1)[0]
        engine = self.engine
        if not request_authorized(self.command, path, self.headers.get("Authorization"), self.keys.api_key,
                                  self.keys.admin_api_key):
            self.close_connection = True  # its body is not read: the connection cannot be reused
            return self._send(HTTPStatus.UNAUTHORIZED, UNAUTHORIZED)
        if path == "/health":
            stalled = engine.stalled_for()
            if stalled > self.stall_seconds:
                return self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"no progress for {stalled:.0f} s (a generation "
                                                                    f"or weight load is stuck)")
            return self._send(HTTPStatus.OK, "OK")
        if path == "/health_generate":
            try:
                engine.generate({"input_ids": [0], "sampling_params": {"max_new_tokens": 1}})
            except Exception as error:  # noqa: BLE001 - any failure means unhealthy
                return self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"generation failed: {error}")
            return self._send(HTTPStatus.OK, "OK")
        if path == "/model_info":
            return self._send(HTTPStatus.OK, {"model_path": engine.model_path, "is_generation": True,
                                              "weight_version": engine.weight_version})
        if path == "/server_info":
            return self._send(HTTPStatus.OK, {
                "model_path": engine.model_path, "weight_version": engine.weight_version,
                "dtype": str(engine.dtype).removeprefix("torch."), "engine": "dppo-megatron embedded",
                "version": SGLANG_RELEASE,  # the SGLang release whose protocol it serves
                "enable_return_routed_experts": engine.enable_routed_experts,
                "memory_released": sorted(engine.released),  # the embedded engine's own (SGLang's has none)
            })
        if path == "/flush_cache":
            return self._send(HTTPStatus.OK, "Cache flushed.")  # no prefix cache to flush
        if get:
            return self._error(HTTPStatus.NOT_FOUND, f"no GET endpoint {path}")
        body = self._body()
        if body is None:
            return None
        if path == "/generate":
            try:
                with self._client_gone() as gone:
                    answer = engine.generate(body, cancelled=gone)
                return self._send(HTTPStatus.OK, answer)
            except RequestError as error:
                return self._error(HTTPStatus.BAD_REQUEST, str(error))
            except Exception as error:  # noqa: BLE001 - answer, do not drop the connection
                log.exception("generation failed")
                return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {type(error).__name__}: {error}")
        if path == "/update_weights_from_disk":
            model_path = body.get("model_path")
            if not model_path:
                return self._send(HTTPStatus.BAD_REQUEST, {"success": False, "message": "model_path is required"})
            try:
                engine.update_weights_from_disk(model_path, body.get("weight_version"))
            except (OSError, ValueError) as error:
                return self._send(HTTPStatus.BAD_REQUEST, {"success": False, "message": f"failed to load {model_path}: {error}"})
            return self._send(HTTPStatus.OK, {"success": True, "message": f"loaded {model_path}",
                                              "weight_version": engine.weight_version})
        if path in ("/init_weights_update_group", "/update_weights_from_distributed", "/destroy_weights_update_group",
                    "/begin_weight_update", "/end_weight_update", "/update_weights_from_tensor"):
            return self._weights_over_group(path, body)
        if path in ("/release_memory_occupation", "/resume_memory_occupation"):
            return self._memory(path, body)
        if path == "/abort_request":
            engine.abort(body.get("rid"), bool(body.get("abort_all")))
            return self._send(HTTPStatus.OK, {"success": True})
        return self._error(HTTPStatus.NOT_FOUND, f"no POST endpoint {path}")


    def _weights_over_group(self, path: str, body: dict) -> None:
        engine = self.engine
        try:
            if path == "/init_weights_update_group":
                engine.init_weights_update_group(body["master_address"], body["master_port"], body["rank_offset"],
                                                 body["world_size"], body["group_name"], body.get("backend", "gloo"))
            elif path == "/begin_weight_update":
                if body.get("selector", "all") not in ("target", "draft", "all"):  # SGLang's Literal
                    raise RequestError(f"selector must be target, draft or all, got {body.get('selector')!r}")
                engine.begin_weight_update()
            elif path == "/end_weight_update":
                engine.end_weight_update()
            elif path == "/update_weights_from_tensor":
                engine.update_weights_from_tensor(body["serialized_named_tensors"], body.get("load_format"),
                                                  body.get("weight_version"))
            elif path == "/update_weights_from_distributed":
                engine.update_weights_from_distributed(body["names"], body["dtypes"], body["shapes"],
                                                       body["group_name"], body.get("weight_version"),
                                                       body.get("load_format"))
            else:
                engine.destroy_weights_update_group(body["group_name"])
        except KeyError as missing:
            return self._send(HTTPStatus.BAD_REQUEST, {"success": False, "message": f"missing field {missing}"})
        except (RequestError, RuntimeError, ValueError) as error:
            return self._send(HTTPStatus.BAD_REQUEST, {"success": False, "message": str(error)})
        return self._send(HTTPStatus.OK, {"success": True, "message": "ok", "weight_version": engine.weight_version})


    def _memory(self, path: str, body: dict) -> None:
        """Release or resume memory; as SGLang, a success answers `null`, a failure SGLang's error
        shape."""
        tags = body.get("tags")
        if tags is not None and not (isinstance(tags, list) and all(isinstance(tag, str) for tag in tags)):
            return self._error(HTTPStatus.BAD_REQUEST, f"tags is a list of memory tags, got {tags!r:.80}")
        try:
            (self.engine.release_memory if path == "/release_memory_occupation" else self.engine.resume_memory)(tags)
        except RequestError as error:
            return self._error(HTTPStatus.BAD_REQUEST, str(error))
        return self._send(HTTPStatus.OK, None)


# --- command line -------------------------------------------------------------------------

def serve(model_path: str, *, host: str, port: int, dtype: torch.dtype, routed_experts: bool, seed: int,
          float8_weights: bool = False, keys: ApiKeys = NO_KEYS) -> int:
    """Load the model and serve it until interrupted."""
    refuse_open_interface(host, keys, "the embedded engine")  # before the model is loaded
    engine = EmbeddedEngine(model_path, dtype=dtype, enable_routed_experts=routed_experts, seed=seed,
                            float8_weights=float8_weights)
    server = make_server(engine, host, port, keys=keys)
    print(f"embedded engine serving {model_path} on http://{host}:{server.server_port}"
          f"{' (keys asked)' if keys else ''}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
