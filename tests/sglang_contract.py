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
