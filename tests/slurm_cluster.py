"""A real one-node SLURM cluster for the tests: Debian's slurm-wlm (slurmctld + slurmd) with its
own munged, every file under one temporary directory, free ports, stopped by the PIDs it started.

Installs slurm-wlm and munge with apt-get when they are missing (root only); where that cannot
be done the tests that need the cluster are skipped, saying why.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from dppo_megatron.processes import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be installed or started here."""


def ensure_installed() -> None:
    if all(shutil.which(name) or Path(f"/usr/sbin/{name}").exists() for name in (*DAEMONS, "sbatch")):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ClusterUnavailable("slurm-wlm is not installed, and installing it needs root and apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """`with SlurmCluster(tmp) as cluster:` ... `cluster.env` has SLURM_CONF for sbatch & co."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge.sock"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        ensure_installed()
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._run([_daemon("munged"), "--force", f"--socket={self.socket}", f"--key-file={key}",
                   f"--log-file={self.root / 'log' / 'munged.log'}", f"--pid-file={self.root / 'munged.pid'}",
                   f"--seed-file={self.root / 'munged.seed'}"])
        self.conf.write_text(self._config())
        self._run([_daemon("slurmctld"), "-f", str(self.conf)])
        self._run([_daemon("slurmd"), "-f", str(self.conf)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True,
                                   env=self.env, timeout=30).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"the node did not become idle (state {state!r}); slurmctld log:\n"
                                 f"{self.log_tail('slurmctld')}")

    def _config(self) -> str:
        root = self.root
        return "\n".join([
            "ClusterName=dppotest", "SlurmctldHost=localhost", f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
            # cred_expire: also how long SLURM holds a requeued job before it may start again
            # (120 s by default); a requeued job started sooner fails with "credential revoked".
            f"AuthInfo=socket={self.socket},cred_expire=10", "CredType=cred/munge", f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}", f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}", f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd.log'}", "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none",
            "ReturnToService=2", "SchedulerType=sched/backfill", "JobCompType=jobcomp/none",
            # A pending job whose hold has ended starts at the next scheduling pass: every 2 s,
            # not SLURM's default 60 (a requeued job then waits cred_expire, not a minute more).
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "AccountingStorageType=accounting_storage/none",
            f"NodeName=localhost CPUs={os.cpu_count()} RealMemory=20000 State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP", "",
        ])

    def _run(self, command: list[str]) -> None:
        result = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60)
        if result.returncode != 0:
            raise ClusterUnavailable(f"{command[0]} did not start: {result.stderr.strip()[-800:]}")

    def log_tail(self, daemon: str, lines: int = 30) -> str:
        path = self.root / "log" / f"{daemon}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"

    def run(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), capture_output=True, text=True, env=self.env, timeout=timeout)

    def job_state(self, job_id: str) -> str | None:
        """PENDING, RUNNING, ... while in the queue; None once it has left it."""
        result = self.run("squeue", "--noheader", "--jobs", job_id, "--format=%T")
        if result.returncode != 0:  # slurmctld busy, or the job long gone
            return None if "Invalid job id" in result.stderr else "UNKNOWN"
        return result.stdout.strip() or None

    def wait_until_gone(self, job_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.job_state(job_id) is None:
                return True
            time.sleep(1)
        return False

    def stop(self) -> None:
        if self.conf.is_file():
            jobs = self.run("squeue", "--noheader", "--format=%i").stdout.split()
            if jobs:
                self.run("scancel", *jobs)
                for job in jobs:
                    self.wait_until_gone(job, timeout=60)
        for daemon in ("slurmd", "slurmctld", "munged"):
            pid_file = self.root / f"{daemon}.pid"
            if not pid_file.is_file():
                continue
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                continue
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A daemon we started but did not reap (it double-forked) shows as a zombie only briefly.
    status = Path(f"/proc/{pid}/status")
    return status.is_file() and "State:\tZ" not in status.read_text()
