"""The processes of a job: free ports, children that die with their parent, the ranks of one
torch.distributed job on this machine, and rank 0's console."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """In a child (as `preexec_fn`): get SIGKILL when the parent dies, so that a killed
    trainer leaves no ranks or servers behind holding ports (Linux; elsewhere a no-op)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_ranks(args: list[str], nproc: int, *, env: dict | None = None) -> int:
    """Run `python ARGS` as `nproc` ranks of one torch.distributed job on this machine (the
    environment torchrun would give them). SIGTERM, SIGUSR1 and SIGINT are passed on to every
    rank (the trainer saves a checkpoint on them); when a rank fails the others are stopped.
    Returns the first non-zero exit code, or 0."""
    import os
    import signal
    import subprocess
    import sys
    import time

    port = free_port()
    base = dict(os.environ if env is None else env)
    processes = []
    for rank in range(nproc):
        rank_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                        LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        processes.append(subprocess.Popen([sys.executable, *args], env=rank_env, preexec_fn=die_with_parent))

    def forward(signum, frame):
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                # Let the others report the collective that broke (they end within seconds),
                # then stop any still waiting.
                deadline = time.monotonic() + 5
                while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
                    time.sleep(0.1)
                for process in processes:
                    if process.poll() is None:
                        process.kill()
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def say(message: str) -> None:
    """Print on rank 0 of the torch.distributed job (or where there is none)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)
