"""SGLang's own environment for the contract tests: the pinned wheel without its GPU
dependencies, and what its import chain needs at the versions SGLang's own metadata pins
(torch and torchvision among them: a CUDA build that runs on the CPU; PyPI's torchvision cannot
load its operators beside the project's CPU torch). A virtual environment of its own under the
user's cache, beside the project's. Standard library only: CI starts it
(`python3 tests/sglang_environment.py`) while the project itself installs. Several processes
may ask at once: one builds, the others wait for it (a file lock)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dppo_megatron.rollout.sglang_release import SGLANG_RELEASE  # noqa: E402 - after the path, stdlib only

# What the modules the contract tests use (server_args, utils.common, managers.io_struct,
# managers.tokenizer_manager, api.v1) import, by distribution: installed at the version SGLang's
# metadata pins where it pins one. dill is imported by SGLang but not declared by it.
IMPORT_CHAIN = ["torch", "torchvision", "numpy", "transformers", "tokenizers", "sentencepiece", "compressed-tensors",
                "apache-tvm-ffi", "openai", "gguf", "partial_json_parser", "aiohttp", "fastapi", "uvicorn", "uvloop",
                "einops", "xxhash", "zstandard", "orjson", "pybase64", "requests", "msgspec", "pyzmq", "IPython",
                "pydantic", "setproctitle", "dill"]

# What a real server on the CPU engine needs beyond that (tests/test_sglang_server.py): the kernel
# package (only its CUDA build is on the index: its libraries load against a stub libcuda.so.1,
# tests/sglang_server.py), grammar and audio modules imported at start, form parsing for
# FastAPI, and jsonschema, imported by SGLang's function-call parser but not declared by it.
SERVER_CHAIN = ["sglang-kernel", "xgrammar", "soundfile", "python-multipart", "jsonschema"]

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


def venv_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dppo-megatron"
    return cache / f"sglang-{SGLANG_RELEASE}-py{sys.version_info.major}{sys.version_info.minor}-venv"


def python() -> str:
    return str(venv_dir() / "bin" / "python")


def ensure(server: bool = False) -> str | None:
    """Make the environment unless it is there (with what a real server needs, if `server`).
    Returns None, or why it could not be made."""
    venv = venv_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or its process dies
        try:
            if not (venv / ".complete").is_file():
                shutil.rmtree(venv, ignore_errors=True)
                _install(venv)
                (venv / ".complete").write_text(SGLANG_RELEASE)
            if server and not (venv / ".server-complete").is_file():
                _install_chain(venv, SERVER_CHAIN)
                (venv / ".server-complete").write_text(SGLANG_RELEASE)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            output = f"{error.stdout or ''}{error.stderr or ''}"[-3000:]
            return f"SGLang {SGLANG_RELEASE} could not be installed for the contract tests: {error}\n{output}"
    return None


def _pip(venv: Path) -> list[str]:
    return [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]


def _install(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, text=True)
    subprocess.run([*_pip(venv), "--no-deps", f"sglang=={SGLANG_RELEASE}", "packaging"], check=True,
                   capture_output=True, text=True, timeout=600)
    _install_chain(venv, IMPORT_CHAIN)


def _install_chain(venv: Path, names: list[str]) -> None:
    pins = json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", PINS], check=True, capture_output=True,
                                     text=True).stdout)
    wanted = [pins.get(name.lower().replace("_", "-"), name) for name in names]
    subprocess.run([*_pip(venv), *wanted], check=True, capture_output=True, text=True, timeout=1800)


if __name__ == "__main__":
    problem = ensure(server="--server" in sys.argv)
    print(problem or f"SGLang {SGLANG_RELEASE}'s environment is ready: {venv_dir()}")
    sys.exit(1 if problem else 0)
