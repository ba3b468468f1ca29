"""Run a script on N gloo ranks with torchrun, as a subprocess with a hard timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import json
import sys
from pathlib import Path

from dppo_megatron.processes import free_port


def run_torchrun(script: str, nproc: int, *args: str, timeout: float = 180.0) -> str:
    """Run `script` on `nproc` ranks; return its output, or fail the test with the output's
    tail. The ranks run in their own process group, killed whole on timeout or failure."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        script, *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"{script} on {nproc} ranks timed out after {timeout}s:\n{output[-4000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        raise AssertionError(f"{script} on {nproc} ranks exited {proc.returncode}:\n{output[-4000:]}")
    return output


def run_torchrun_each(script: str, nproc: int, runs: list[list[str]], timeout: float = 300.0) -> str:
    """Run `script`'s main(*args) for each args of `runs`, in turn, in one torchrun of `nproc`
    ranks (tests/workers/each.py): the ranks start once."""
    each = str(Path(__file__).parent / "workers" / "each.py")
    return run_torchrun(each, nproc, script, json.dumps([[str(a) for a in args] for args in runs]), timeout=timeout)
