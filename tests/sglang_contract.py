"""SGLang's own code for the contract tests, at the release the project supports.

SGLang cannot serve on a CPU machine, but its pure-Python modules import here: the pinned
wheel and the light packages its import chain needs go, without their dependencies (the CUDA
torch among them), into a folder of their own (`pip install --no-deps --target`), kept between
runs; the project's CPU torch serves them. Code that uses them runs in a subprocess with that
folder on PYTHONPATH, so that nothing of SGLang enters the test process. In CI (CI=true) a
failed install fails the tests; elsewhere (offline) they are skipped with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dppo_megatron.rollout.protocol import SGLANG_RELEASE

# What `sglang.srt.utils.common` imports at module level, besides torch and numpy.
LIGHT_PACKAGES = ["orjson", "pybase64", "requests", "urllib3", "certifi", "triton", "starlette", "msgspec", "pyzmq",
                  "ipython", "traitlets"]


def sglang_dir() -> Path:
    """The folder holding the pinned SGLang and its light packages (installed on first use)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dppo-megatron"
    target = cache / f"sglang-{SGLANG_RELEASE}-py{sys.version_info.major}{sys.version_info.minor}"
    if (target / ".complete").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", str(target),
               f"sglang=={SGLANG_RELEASE}", *LIGHT_PACKAGES]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        reason = f"SGLang {SGLANG_RELEASE} could not be installed for the contract tests: {result.stderr[-2000:]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    (target / ".complete").write_text(SGLANG_RELEASE)
    return target


def run_with_sglang(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """Start `python -c code args...` with the pinned SGLang importable."""
    path = os.pathsep.join([str(sglang_dir()), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ if env is None else env, PYTHONPATH=path))
