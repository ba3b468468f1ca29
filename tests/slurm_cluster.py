"""A real SLURM cluster of several nodes on this one machine, for the tests.

Each node is a set of Linux namespaces held open by a `sleep` process: its own network stack
(an `eth0` on a private subnet, joined to the other nodes by a bridge in a namespace of its
own, so nothing of this machine's network is touched or addressed), its own hostname, and its
own /etc/hosts (bind-mounted in its own mount namespace) naming every node. Debian's
slurm-wlm runs for real: slurmctld on the first node (also the login node the tests submit
from), one `slurmd -N NAME` per node, one munged whose socket every node reaches through the
shared filesystem. Every file is under one temporary directory; everything is stopped by the
PIDs it started (and any process left in a node's namespace is killed), which also removes the
namespaces and their devices.

Installs slurm-wlm and munge with apt-get when they are missing (root only). Where that, or
making namespaces, cannot be done, `ClusterUnavailable` says why.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
SUBNET = "10.250.0"  # lives only inside the namespaces made here
SLURMCTLD_PORT, SLURMD_PORT = 6817, 6818  # each node has its own network stack: always free there


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


@dataclass
class Node:
    name: str
    address: str
    holder: subprocess.Popen  # `sleep infinity` in the node's namespaces: they live as long as it does

    def command(self, *argv: str, cwd: Path | str | None = None) -> list[str]:
        """`argv` run inside this node: its network, hostname and /etc/hosts."""
        return ["nsenter", f"--target={self.holder.pid}", "--net", "--uts", "--mount",
                f"--wd={cwd or os.getcwd()}", *argv]

    def net_namespace(self) -> str:
        return os.readlink(f"/proc/{self.holder.pid}/ns/net")


class SlurmCluster:
    """`with SlurmCluster(tmp, nodes=3) as cluster:` ... `cluster.run("sbatch", ...)` runs on the
    first node (the login node) with `cluster.env` (SLURM_CONF for sbatch & co.)."""

    def __init__(self, root: Path, nodes: int = 3):
        self.root = Path(root)
        self.names = [f"node{i}" for i in range(nodes)]
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge.sock"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.nodes: list[Node] = []
        self.switch: subprocess.Popen | None = None

    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def login(self) -> Node:
        return self.nodes[0]

    def start(self) -> None:
        ensure_installed()
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._make_network()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._run([_daemon("munged"), "--force", f"--socket={self.socket}", f"--key-file={key}",
                   f"--log-file={self.root / 'log' / 'munged.log'}", f"--pid-file={self.root / 'munged.pid'}",
                   f"--seed-file={self.root / 'munged.seed'}"])
        self.conf.write_text(self._config())
        self._run(self.login.command(_daemon("slurmctld"), "-f", str(self.conf)))
        for node in self.nodes:
            self._run(node.command(_daemon("slurmd"), "-N", node.name, "-f", str(self.conf)))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = self.run("sinfo", "--noheader", "--Node", "--format=%N %t", timeout=30).stdout.split("\n")
            if sorted(line.strip() for line in states if line.strip()) == [f"{n} idle" for n in self.names]:
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"the nodes did not all become idle ({states}); slurmctld log:\n"
                                 f"{self.log_tail('slurmctld')}")

    def _make_network(self) -> None:
        """A bridge in a namespace of its own; per node a veth pair from it into the node's
        namespace, an address on the private subnet, loopback, a hostname and /etc/hosts."""
        for tool in ("unshare", "nsenter", "ip", "mount"):
            if shutil.which(tool) is None:
                raise ClusterUnavailable(f"network namespaces need `{tool}`, which is not installed")
        if os.geteuid() != 0:
            raise ClusterUnavailable("network namespaces and a bridge between them need root")
        hosts = self.root / "hosts"
        hosts.write_text("127.0.0.1 localhost\n" + "".join(
            f"{SUBNET}.{i + 1} {name}\n" for i, name in enumerate(self.names)))
        self.switch = self._holder("--net")
        self._in(self.switch, "ip", "link", "add", "br0", "type", "bridge")
        self._in(self.switch, "ip", "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            node = Node(name, f"{SUBNET}.{i + 1}",
                        self._holder("--net", "--uts", "--mount", "--propagation", "private"))
            self.nodes.append(node)
            self._in(self.switch, "ip", "link", "add", f"port{i}", "type", "veth", "peer", "name", "eth0",
                     "netns", str(node.holder.pid))
            self._in(self.switch, "ip", "link", "set", f"port{i}", "master", "br0", "up")
            self._in(node.holder, "ip", "addr", "add", f"{node.address}/24", "dev", "eth0")
            self._in(node.holder, "ip", "link", "set", "eth0", "up")
            self._in(node.holder, "ip", "link", "set", "lo", "up")
            self._in(node.holder, "hostname", name, enter="--uts")
            self._in(node.holder, "mount", "--bind", str(hosts), "/etc/hosts", enter="--mount")

    def _holder(self, *namespaces: str) -> subprocess.Popen:
        holder = subprocess.Popen(["unshare", *namespaces, "sleep", "infinity"], start_new_session=True)
        deadline = time.monotonic() + 10
        mine = os.readlink("/proc/self/ns/net")
        while time.monotonic() < deadline:
            if holder.poll() is not None:
                raise ClusterUnavailable(f"`unshare {' '.join(namespaces)}` failed (exit {holder.returncode}): "
                                         "no network namespaces here")
            try:  # once unshare has exec'd sleep, the holder is in its own namespaces
                if os.readlink(f"/proc/{holder.pid}/ns/net") != mine:
                    return holder
            except OSError:
                pass
            time.sleep(0.02)
        holder.kill()
        raise ClusterUnavailable(f"`unshare {' '.join(namespaces)}` did not make a network namespace")

    def _in(self, holder: subprocess.Popen, *argv: str, enter: str = "--net") -> None:
        result = subprocess.run(["nsenter", f"--target={holder.pid}", enter, *argv], capture_output=True, text=True,
                                timeout=30)
        if result.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(argv)} (in a test node's namespace) failed: {result.stderr.strip()}")

    def _config(self) -> str:
        root = self.root
        return "\n".join([
            "ClusterName=dppotest", f"SlurmctldHost={self.names[0]}({self.login.address})",
            f"SlurmctldPort={SLURMCTLD_PORT}", f"SlurmdPort={SLURMD_PORT}", "SlurmUser=root", "SlurmdUser=root",
            # cred_expire: also how long SLURM holds a requeued job before it may start again
            # (120 s by default); a requeued job started sooner fails with "credential revoked".
            "AuthType=auth/munge", f"AuthInfo=socket={self.socket},cred_expire=10", "CredType=cred/munge",
            f"StateSaveLocation={root / 'state'}", f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            # %n: the node's name, so that the slurmds of one machine keep their files apart.
            f"SlurmdSpoolDir={root / 'spool' / '%n'}", f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}", "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none",
            "ReturnToService=2", "SchedulerType=sched/backfill", "JobCompType=jobcomp/none",
            # A pending job whose hold has ended starts at the next scheduling pass: every 2 s,
            # not SLURM's default 60 (a requeued job then waits cred_expire, not a minute more).
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "AccountingStorageType=accounting_storage/none",
            *(f"NodeName={node.name} NodeAddr={node.address} CPUs={os.cpu_count()} RealMemory=8000 State=UNKNOWN"
              for node in self.nodes),
            f"PartitionName=debug Nodes={','.join(self.names)} Default=YES MaxTime=INFINITE State=UP", "",
        ])

    def _run(self, command: list[str]) -> None:
        result = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60)
        if result.returncode != 0:
            name = next((part for part in command if Path(part).name in DAEMONS), command[0])
            raise ClusterUnavailable(f"{name} did not start: {result.stderr.strip()[-800:]}")

    def log_tail(self, daemon: str, lines: int = 30) -> str:
        path = self.root / "log" / f"{daemon}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"

    def command(self, *argv: str, cwd: Path | str | None = None) -> list[str]:
        """`argv` as run on the login node (the first node)."""
        return self.login.command(*argv, cwd=cwd)

    def run(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*command), capture_output=True, text=True, env=self.env, timeout=timeout)

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

    def processes_on(self, node: Node) -> list[int]:
        """The PIDs running in `node`'s network namespace (its holder included)."""
        namespace, pids = node.net_namespace(), []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "ns" / "net") == namespace:
                        pids.append(int(entry.name))
                except OSError:  # gone meanwhile
                    continue
        return pids

    def stop(self) -> None:
        if self.conf.is_file() and self.nodes:
            jobs = self.run("squeue", "--noheader", "--format=%i").stdout.split()
            if jobs:
                self.run("scancel", *jobs)
                for job in jobs:
                    self.wait_until_gone(job, timeout=60)
        pid_files = [self.root / f"slurmd-{name}.pid" for name in self.names]
        for pid_file in (*pid_files, self.root / "slurmctld.pid", self.root / "munged.pid"):
            _stop_daemon(pid_file)
        for node in self.nodes:  # whatever a job left behind, then the namespace itself
            if node.holder.poll() is None:
                for pid in self.processes_on(node):
                    _kill(pid)
            node.holder.wait(timeout=30)
        if self.switch is not None and self.switch.poll() is None:
            self.switch.kill()
            self.switch.wait(timeout=30)


def _stop_daemon(pid_file: Path) -> None:
    if not pid_file.is_file():
        return
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGTERM)
    except (ValueError, ProcessLookupError):
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        _kill(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A daemon we started but did not reap (it double-forked) shows as a zombie only briefly.
    status = Path(f"/proc/{pid}/status")
    return status.is_file() and "State:\tZ" not in status.read_text()
