"""SGLang's own code for the contract tests, at the release the project supports.

SGLang cannot serve on a CPU machine, but its Python modules import here in an environment of
their own: a virtual environment beside the project's (kept between runs under the user's
cache) holding the pinned SGLang wheel without its GPU dependencies, and the packages its import
chain needs at the versions SGLang itself pins, torch and torchvision among them (a CUDA build of
torch that runs on the CPU: PyPI's torchvision cannot load its operators beside the project's CPU
torch, and `sglang.srt.managers.io_struct` imports torchvision). The project's own venv keeps its
CPU torch. Code that uses SGLang runs in a subprocess of that environment, so nothing of SGLang
enters the test process. In CI (CI=true) a failed install fails the tests; elsewhere (offline)
they are skipped with the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dppo_megatron.rollout.protocol import SGLANG_RELEASE

# What the modules the contract tests use (server_args, utils.common, managers.io_struct,
# managers.tokenizer_manager, api.v1) import, by distribution: installed at the version SGLang's
# metadata pins where it pins one. dill is imported by SGLang but not declared by it.
IMPORT_CHAIN = ["torch", "torchvision", "numpy", "transformers", "tokenizers", "sentencepiece", "compressed-tensors",
                "apache-tvm-ffi", "openai", "gguf", "partial_json_parser", "aiohttp", "fastapi", "uvicorn", "uvloop",
                "einops", "xxhash", "zstandard", "orjson", "pybase64", "requests", "msgspec", "pyzmq", "IPython",
                "pydantic", "setproctitle", "dill"]

PINS = """
import json
from importlib.metadata import requires
from packaging.requirements import Requirement
pins = {}
for line in requires("sglang"):
    requirement = Requirement(line)
    if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
        pins[requirement.name.lower().replace("_", "-")] = str(requirement)
print(json.dumps(pins))
"""


def _install(venv: Path) -> None:
    """Make the environment in `venv` (raises CalledProcessError with pip's output)."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, text=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", f"sglang=={SGLANG_RELEASE}", "packaging"], check=True, capture_output=True,
                   text=True, timeout=600)
    pins = json.loads(subprocess.run([python, "-c", PINS], check=True, capture_output=True, text=True).stdout)
    wanted = [pins.get(name.lower().replace("_", "-"), name) for name in IMPORT_CHAIN]
    subprocess.run([*pip, *wanted], check=True, capture_output=True, text=True, timeout=1800)


def _venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dppo-megatron"
    return cache / f"sglang-{SGLANG_RELEASE}-py{sys.version_info.major}{sys.version_info.minor}-venv"


_build: dict = {}  # "thread", and "error" once a build failed


def start_building() -> None:
    """Make the environment in the background, unless it is there or on its way: the suite's
    other tests run meanwhile (a few minutes of pip on a fresh machine)."""
    venv = _venv()
    if "thread" in _build or (venv / ".complete").is_file():
        return

    def build() -> None:
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        try:
            _install(venv)
            (venv / ".complete").write_text(SGLANG_RELEASE)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            output = f"{error.stdout or ''}{error.stderr or ''}"[-3000:]
            _build["error"] = f"SGLang {SGLANG_RELEASE} could not be installed for the contract tests: {error}\n{output}"

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
    return str(_venv() / "bin" / "python")


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
