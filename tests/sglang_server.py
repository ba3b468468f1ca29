"""A real SGLang 0.5.23 server on this CPU machine, for tests/test_sglang_server.py.

SGLang serves on the CPU with its CPU engine (`SGLANG_USE_CPU_ENGINE=1`, `CPU_SERVER_ARGS`), in
its own environment (tests/sglang_environment.py, with the server chain). Two things stand
between that and a start on a machine without a GPU, both only in the server's process:

- The index has only the CUDA build of SGLang's kernel package, whose libraries need
  `libcuda.so.1` just to load (SGLang imports them at start; the CPU engine never calls their
  CUDA functions). A stub `libcuda.so.1` is compiled here from the `cu*` symbols those libraries
  import, each answering 100 (CUDA_ERROR_NO_DEVICE), and put on the server's LD_LIBRARY_PATH.
- With `--enable-return-routed-experts` SGLang pins its host buffer of routes through
  `torch.cuda.cudart().cudaHostRegister`, which the CPU build of torch lacks: a
  `sitecustomize.py` on the server's PYTHONPATH answers it (and its unregister) with success, as
  on a host without pinning.

`server_python()` returns an executable that runs SGLang's interpreter so: the
`rollout.sglang_python` of a recipe, or `ServerSpec.python`. Never on a machine with a GPU."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from pathlib import Path

from tests import sglang_environment

# SGLang's CPU engine: torch attention and sampling, a KV cache of 4096 tokens (by default it
# reserves 15 GB of RAM), no warm-up request, and no busy polling while idle (a core otherwise).
CPU_SERVER_ARGS = ["--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
                   "--max-total-tokens", "4096", "--skip-server-warmup", "--sleep-on-idle"]

HOST_RUNTIME = '''"""Test-only, for SGLang's CPU engine: torch.cuda.cudart() of the CPU build of torch has no
cudaHostRegister; SGLang's routed-experts buffer pins with it. Success, as on a host that cannot pin."""
import torch.cuda


class _HostRuntime:
    def cudaHostRegister(self, *args):
        return 0

    def cudaHostUnregister(self, *args):
        return 0

    def cudaGetErrorString(self, code):
        return "no CUDA device"


torch.cuda.cudart = lambda: _HostRuntime()
'''

WRAPPER = """#!/bin/sh
# SGLang {release} on its CPU engine, for the tests (tests/sglang_server.py).
export SGLANG_USE_CPU_ENGINE=1
export PYTHONPATH="{shim}"
export LD_LIBRARY_PATH="{stub}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"
exec "{python}" "$@"
"""


def server_dir() -> Path:
    return sglang_environment.venv_dir().with_name(sglang_environment.venv_dir().name + "-cpu-server")


def server_python() -> tuple[str | None, str | None]:
    """(the wrapper's path, None), or (None, why it cannot be made here)."""
    problem = sglang_environment.ensure(server=True)
    if problem:
        return None, problem
    for tool in ("gcc", "nm"):
        if shutil.which(tool) is None:
            return None, f"{tool} is not installed: cannot build the stub libcuda.so.1 SGLang's kernels load against"
    root = server_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wrapper = root / "python"
        if not wrapper.is_file():
            try:
                _build(root)
            except (subprocess.CalledProcessError, OSError) as error:
                output = getattr(error, "stderr", "") or ""
                return None, f"the stub libcuda.so.1 could not be built: {error}\n{output}"
    return str(wrapper), None


def cuda_symbols(kernel_dir: Path) -> list[str]:
    """The CUDA driver functions the kernel package's libraries import."""
    symbols = set()
    for library in sorted(kernel_dir.rglob("*.so")):
        listing = subprocess.run(["nm", "-D", "--undefined-only", str(library)], capture_output=True, text=True,
                                 check=True).stdout
        for line in listing.splitlines():
            name = line.split()[-1].split("@")[0]
            if re.fullmatch(r"cu[A-Z]\w*", name):
                symbols.add(name)
    return sorted(symbols)


def _build(root: Path) -> None:
    venv = sglang_environment.venv_dir()
    (kernel_dir,) = venv.glob("lib/python3*/site-packages/sgl_kernel")
    stub, shim = root / "stub", root / "shim"
    stub.mkdir(exist_ok=True)
    shim.mkdir(exist_ok=True)
    source = stub / "libcuda.c"
    source.write_text("/* CUDA_ERROR_NO_DEVICE from every driver call SGLang's kernels import */\n" + "".join(
        f"int {name}(void) {{ return 100; }}\n" for name in cuda_symbols(kernel_dir)))
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(stub / "libcuda.so.1"),
                    str(source)], check=True, capture_output=True, text=True)
    (shim / "sitecustomize.py").write_text(HOST_RUNTIME)
    wrapper = root / "python.tmp"
    wrapper.write_text(WRAPPER.format(release=sglang_environment.SGLANG_RELEASE, shim=shim, stub=stub,
                                      python=venv / "bin" / "python"))
    wrapper.chmod(0o755)
    os.replace(wrapper, root / "python")  # last: its presence means the rest is there
