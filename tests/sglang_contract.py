"""SGLang's own code for the contract tests, at the release the project supports.

SGLang cannot serve on a CPU machine, but its Python modules import here in an environment of
their own (tests/sglang_environment.py). Code that uses SGLang runs in a subprocess of that
environment, so nothing of SGLang enters the test process. In CI (CI=true) a failed install
fails the tests; elsewhere (offline) they are skipped with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from dppo_megatron.processes import free_port
from tests import sglang_environment

_build: dict = {}  # "thread", and "error" once a build failed


def start_building() -> None:
    """Make the environment in the background, unless it is there or on its way: the suite's
    other tests run meanwhile (a few minutes of pip on a fresh machine; CI starts it earlier)."""
    if "thread" in _build or (sglang_environment.venv_dir() / ".server-complete").is_file():
        return

    def build() -> None:
        problem = sglang_environment.ensure(server=True)
        if problem:
            _build["error"] = problem

    _build["thread"] = threading.Thread(target=build, name="sglang-environment", daemon=True)
    _build["thread"].start()


def sglang_python() -> str:
    """The interpreter of the environment holding the pinned SGLang (made on first use)."""
    start_building()
    if "thread" in _build:
        _build["thread"].join()
    if "error" in _build:
        if os.environ.get("CI"):
            pytest.fail(_build["error"])
        pytest.skip(_build["error"])
    return sglang_environment.python()


def run_with_sglang(code: str, *args: str) -> subprocess.Popen:
    """Start `python -c code args...` in SGLang's environment (stdin and stdout piped)."""
    return subprocess.Popen([sglang_python(), "-W", "ignore", "-c", code, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


WORKER = """
import contextlib, io, json, sys, traceback
import sglang.srt.managers.tokenizer_manager, sglang.srt.server_args  # the slow imports, once
jobs, answers = sys.stdin, sys.stdout
for line in jobs:
    job, output, code = json.loads(line), io.StringIO(), 0
    sys.argv, sys.stdin = ["-c", *job["args"]], io.StringIO(job["stdin"])
    with contextlib.redirect_stdout(output):
        try:
            exec(compile(job["code"], "<contract test>", "exec"), {"__name__": "__main__"})
        except SystemExit as stop:
            code = 0 if stop.code in (None, 0) else 1
            if isinstance(stop.code, str):
                print(stop.code)
        except BaseException:
            code = 1
            traceback.print_exc(file=output)
    sys.stdin = jobs
    answers.write(json.dumps({"rc": code, "output": output.getvalue()}) + "\\n")
    answers.flush()
"""


class SGLangWorker:
    """One process of SGLang's environment that runs the contract tests' scripts one after
    another (`python -c` semantics: argv, stdin, stdout, exit code), so that SGLang's modules
    are imported once, not once per test."""

    def __init__(self, log: Path):
        self.log = log.open("w")
        self.process = subprocess.Popen([sglang_python(), "-W", "ignore", "-c", WORKER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True)

    def run(self, code: str, *args: str, stdin: str = "") -> tuple[int, str]:
        """(exit code, what the script printed)."""
        self.process.stdin.write(json.dumps({"code": code, "args": list(args), "stdin": stdin}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"SGLang's worker died:\n{self.log.name}")
        answer = json.loads(line)
        return answer["rc"], answer["output"]

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


# SGLang's own weight-update state machine: the scheduler's request dispatcher
# (Scheduler.init_request_dispatcher) over its SchedulerWeightUpdaterManager, each request read
# into the io_struct class that SGLang's HTTP endpoint for its path declares (tensor payloads
# normalised as its tokenizer manager does). Stood in for: the model runner's weight updater
# underneath (it needs a GPU: it records and succeeds), torch_memory_saver (it needs a GPU: it
# records the paused tags), the static state a weights release stashes, and the scheduler's other
# handlers (never reached). stdin: a list of sequences of [path, body]; one
# fresh manager per sequence; prints, per sequence, SGLang's answers, the weight versions it
# recorded and whether a session is left open.
SCHEDULER_REPLAY = """
import json, sys, typing
from types import SimpleNamespace
import torch
import torch.distributed as dist
from sglang.srt.disaggregation.utils import DisaggregationMode
from sglang.srt.entrypoints import http_server
from sglang.srt.utils.common import normalize_serialized_named_tensor_payloads
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.managers.scheduler_components import weight_updater
from sglang.srt.managers.scheduler_components.weight_updater import SchedulerWeightUpdaterManager
from sglang.srt.managers.tp_worker import TpModelWorker
from sglang.srt.runtime_context import get_parallel

port, sequences = int(sys.argv[1]), json.loads(sys.stdin.read())
if not dist.is_initialized():  # the scheduler's TP group: one rank
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0)

def request_class(path):
    for route in http_server.app.routes:
        if getattr(route, "path", None) == path and "POST" in getattr(route, "methods", ()):
            return typing.get_args(typing.get_type_hints(route.endpoint, include_extras=True)["obj"])[0]
    sys.exit(f"SGLang has no POST {path}")

class ModelRunnerWeights:
    def __init__(self):
        self.calls = []
    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append(name)
            return {"begin_weight_update": None, "end_weight_update": None,
                    "receive_weights_from_distributed": []}.get(name, (True, "loaded"))
        return call

class Versions:  # the scheduler, as the weight updater sees it
    _engine_paused = False  # /pause_generation not called
    disaggregation_mode = DisaggregationMode.NULL
    def __init__(self):
        self.versions = []
    def record_weight_version_change(self, new_version):
        if new_version is not None and new_version not in self.versions[-1:]:
            self.versions.append(new_version)

class NotReached:
    def __getattr__(self, name):
        def call(*args, **kwargs):
            raise AssertionError(f"the scheduler's {name} is not part of a weight update")
        return call

# A released model's static state (its buffers, on a GPU) and the CUDA IPC weight cache's check
# read SGLang's published model config, which only a running server has: stood in for.
weight_updater._export_static_state = lambda model: {"stashed": True}
weight_updater._import_static_state = lambda model, state: None
SchedulerWeightUpdaterManager._assert_weight_cache_inactive = lambda self, op: None
torch.get_device_module = lambda device=None: torch.cpu  # the release's synchronize, on no GPU

class MemorySaver:  # torch_memory_saver's adapter (a GPU's): which tags are paused, in order
    def __init__(self):
        self.paused = []
    def pause(self, tag):
        self.paused.append(tag)
    def resume(self, tag):
        self.paused.remove(tag)

def reply(scheduler, path, body):
    if path == "/update_weights_from_tensor":  # as SGLang's tokenizer manager hands it on
        body = dict(body, serialized_named_tensors=normalize_serialized_named_tensor_payloads(
            body["serialized_named_tensors"]))
    try:
        answer = scheduler.__dict__["_request_dispatcher"](request_class(path)(**body))
    except Exception as error:  # the scheduler process would die of it (SGLang's asserts)
        return {"success": False, "message": f"raised {type(error).__name__}: {error}"}
    # The memory endpoints answer nothing but their success (HTTP 200, null).
    return {"success": getattr(answer, "success", True), "message": getattr(answer, "message", None)}

answers = []
with get_parallel().override(tp_group=SimpleNamespace(cpu_group=dist.group.WORLD), tp_rank=0, tp_size=1):
    for sequence in sequences:
        worker = object.__new__(TpModelWorker)
        worker._model_runner = SimpleNamespace(weight_updater=ModelRunnerWeights())
        versions = Versions()
        worker._model_runner.model = torch.nn.Linear(2, 2)  # what a weights release stashes the state of
        manager = SchedulerWeightUpdaterManager(tp_worker=worker, draft_worker=None, memory_saver_adapter=MemorySaver(),
                                                flush_cache=lambda **kwargs: True, is_fully_idle=lambda **kwargs: True,
                                                scheduler=versions)
        scheduler = NotReached()
        scheduler.__dict__.update(weight_updater=manager, flush_wrapper=NotReached())
        Scheduler.init_request_dispatcher(scheduler)
        replies = [reply(scheduler, path, body) for path, body in sequence]
        answers.append({"answers": replies, "paused": manager.memory_saver_adapter.paused,
                        "versions": versions.versions, "session_open": manager._session is not None})
print(json.dumps(answers))
"""


def replay_in_sglangs_scheduler(worker: SGLangWorker, sequences: list[list[tuple[str, dict]]]) -> list[dict]:
    """What SGLang's own scheduler answers to each sequence of weight-update calls."""
    code, output = worker.run(SCHEDULER_REPLAY, str(free_port()), stdin=json.dumps(sequences))
    assert code == 0, output
    return json.loads(output.strip().splitlines()[-1])
