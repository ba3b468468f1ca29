"""A pass-through HTTP proxy in front of one rollout server that records the calls the project
makes to it, in the order the server received them, with its answers: the sequence a contract
test replays through SGLang's own scheduler code."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NOT_RECORDED = ("/generate", "/health", "/health_generate", "/server_info", "/model_info")  # the data plane


class RecordingProxy:
    def __init__(self, target: str):
        self.target = target.rstrip("/")
        self.calls: list[dict] = []  # {"path", "body", "status", "answer"}, in arrival order
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            def _forward(self, body: bytes | None):
                path = self.path.split("?", 1)[0]
                record = path not in NOT_RECORDED
                if record:  # recorded on arrival: the order the server sees
                    call = {"path": path, "body": json.loads(body or b"{}") if body is not None else None}
                    with lock:
                        proxy.calls.append(call)
                request = urllib.request.Request(proxy.target + self.path, data=body, method=self.command,
                                                 headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=600) as response:
                        status, payload = response.status, response.read()
                except urllib.error.HTTPError as error:
                    status, payload = error.code, error.read()
                except OSError as error:  # the server is gone: answer as a dead server would not
                    status, payload = 502, json.dumps({"success": False, "message": str(error)}).encode()
                if record:
                    try:
                        call["status"], call["answer"] = status, json.loads(payload)
                    except ValueError:
                        call["status"], call["answer"] = status, payload.decode(errors="replace")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def __enter__(self) -> "RecordingProxy":
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
