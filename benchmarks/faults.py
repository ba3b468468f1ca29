"""Fault runs on the quickstart: what a run does when its checkpoint is torn, its trainer is
killed while saving, its disk fills up, or its rollout server dies, and what our servers answer
a caller without the key. Prints a table (docs/reliability.md keeps the results).

    python benchmarks/faults.py                      # everything: ~30 min on 2 cores
    python benchmarks/faults.py --kill-points 5 --server-kills 5   # a shorter pass

Each fault run is compared with an uninterrupted run of the same settings: the metrics of
every step (times left out) must be equal, number for number, and no step may be missing or
counted twice. The disk-full run mounts a small tmpfs over the run's checkpoints (root only;
skipped otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "tiny" / "quickstart.yaml"
STEPS = 10
FAULTS = ("torn", "killed-saving", "disk-full", "server-killed", "keys")
SETTINGS = [f"trainer.steps={STEPS}", "trainer.save_every=2", "trainer.keep_checkpoints=3", "trainer.eval_every=0"]


# --- runs ----------------------------------------------------------------------------------------

def free_port() -> int:
    from dppo_megatron.processes import free_port as free

    return free()


def start(run_dir: Path, *overrides: str, resume: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-m", "dppo_megatron", "train"]
    command += ["--run-dir", str(run_dir), "--resume"] if resume else [str(QUICKSTART), "--run-dir", str(run_dir)]
    command += list(overrides) + ([] if resume else [f"rollout.base_port={free_port()}"])
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))


def finish(process: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def kill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    subprocess.run(["pkill", "-9", "-f", "serve-embedded.*" + str(process.args[process.args.index("--run-dir") + 1])])


def metrics(run_dir: Path) -> list[dict]:
    from dppo_megatron.run.metrics import read_metrics

    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in read_metrics(run_dir)]


def resumed_from(run_dir: Path) -> str:
    """The step the last resume started from, as the log says it ('fresh' when none)."""
    text = (run_dir.parent / f"{run_dir.name}.log").read_text(errors="replace")
    marks = [line for line in text.splitlines() if line.startswith("resumed from ")]
    return marks[-1].rsplit(" ", 1)[1] if marks else "fresh"


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def newest(run_dir: Path) -> Path:
    from dppo_megatron.learner.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir / "checkpoints")


class Table:
    def __init__(self):
        self.rows = []

    def add(self, fault: str, resumed: bool, start: str, equal: bool | None, note: str = "") -> None:
        row = (fault, "yes" if resumed else "NO", start, {True: "yes", False: "NO", None: "-"}[equal], note)
        self.rows.append(row)
        print(" | ".join(row), flush=True)

    def print(self) -> None:
        print("\n| fault | resumed | from step | metrics equal | note |\n|---|---|---|---|---|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")


# --- the faults ----------------------------------------------------------------------------------

def torn(root: Path, plain: list[dict], table: Table, how: str) -> None:
    """Six steps, the newest checkpoint (step 6) torn `how`, then the resume to the end."""
    run_dir = root / f"torn-{how}"
    code = finish(start(run_dir, *SETTINGS[1:], "trainer.steps=6"))
    step6 = newest(run_dir)
    if how == "shard truncated":
        largest = max((f for f in step6.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
        largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    else:
        (step6 / "manifest.json").unlink()
    code = code or finish(start(run_dir, *SETTINGS, resume=True))
    table.add(how, code == 0, resumed_from(run_dir), metrics(run_dir) == plain,
              "set aside as step_00000006.torn" if (run_dir / "checkpoints" / "step_00000006.torn").is_dir() else "")


def killed_while_saving(root: Path, plain: list[dict], table: Table, points: int, save_seconds: float) -> None:
    """The trainer SIGKILLed `points` times at evenly spread moments of the step-4 checkpoint
    (from the moment its temporary directory appears), each time resumed to the end."""
    outcomes = []
    for point in range(points):
        run_dir = root / f"killed-saving-{point}"
        process = start(run_dir, *SETTINGS)
        partial = run_dir / "checkpoints" / "step_00000004.partial"
        if not wait_for(partial.exists, process):
            outcomes.append((False, "?", False))
            kill(process)
            continue
        time.sleep(point / points * save_seconds * 1.2)  # a little past the save's end, too
        kill(process)
        code = finish(start(run_dir, *SETTINGS, resume=True))
        outcomes.append((code == 0, resumed_from(run_dir), metrics(run_dir) == plain))
    starts = sorted({start for _, start, _ in outcomes})
    table.add(f"trainer killed during a save ({points} kill points over {save_seconds:.1f} s)",
              all(ok for ok, _, _ in outcomes), ", ".join(f"{s} ({sum(1 for o in outcomes if o[1] == s)}x)"
                                                         for s in starts),
              all(equal for _, _, equal in outcomes))


def disk_full(root: Path, plain: list[dict], table: Table) -> None:
    """The checkpoints on a tmpfs with room for one checkpoint and a half: the second save
    fails (ENOSPC), the run stops saying so; with room made, the resume goes on from step 2."""
    if os.geteuid() != 0:
        table.add("disk full during a save", False, "-", None, "skipped: mounting a tmpfs needs root")
        return
    run_dir = root / "disk-full"
    (run_dir / "checkpoints").mkdir(parents=True)
    size = int(sum(f.stat().st_size for f in newest(root / "plain").rglob("*") if f.is_file()) * 1.5)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(run_dir / "checkpoints")], check=True)
    try:
        first = finish(start(run_dir, *SETTINGS))
        failed_line = [line for line in (root / "disk-full.log").read_text().splitlines() if line.startswith("error:")]
        subprocess.run(["mount", "-o", "remount,size=256m", str(run_dir / "checkpoints")], check=True)
        code = finish(start(run_dir, *SETTINGS, resume=True))
        table.add("disk full during a save", first != 0 and code == 0, resumed_from(run_dir),
                  metrics(run_dir) == plain, (failed_line[0][:90] + "...") if failed_line else "")
    finally:
        subprocess.run(["umount", "-l", str(run_dir / "checkpoints")])


def server_killed(root: Path, table: Table, kills: int, sync: str) -> None:
    """The server SIGKILLed `kills` times, at spread moments of the steps (rollout, training,
    publish), synchronous rollouts; compared with the same run uninterrupted."""
    settings = [f"trainer.steps={kills + 4}", f"rollout.weight_sync={sync}", "trainer.max_staleness=0",
                "trainer.eval_every=0", "trainer.save_every=0"]
    plain_dir = root / f"plain-{sync}"
    finish(start(plain_dir, *settings))
    run_dir = root / f"server-killed-{sync}"
    process = start(run_dir, *settings)
    pattern = f"serve-embedded.*{run_dir}"
    from dppo_megatron.run.metrics import read_metrics

    step_seconds = 0.45  # the quickstart's step on 2 cores
    for kill_number in range(kills):
        if not wait_for(lambda: len(read_metrics(run_dir)) >= kill_number + 2, process):
            break
        time.sleep((kill_number % 5) / 5 * step_seconds)
        subprocess.run(["pkill", "-9", "-f", pattern])
    code = finish(process)
    log = (root / f"{run_dir.name}.log").read_text()
    restarts, in_rollout = log.count("restarting http://127.0.0.1:"), log.count("making the batch again")
    at_publish = log.count("did not answer /health: restarting")
    table.add(f"server killed {kills} times ({sync} sync)", code == 0, "- (no restart of the trainer)",
              metrics(run_dir) == metrics(plain_dir),
              f"{restarts} restarts: {in_rollout} batches made again, {at_publish} found dead at the publish")


def unkeyed_requests(root: Path, table: Table) -> None:
    """Every endpoint of the embedded engine and of a node agent, without the key and with a
    wrong one: 401 but on the open ones; the weights untouched and the server healthy after."""
    from dppo_megatron.keys import make_keys_file, read_keys
    from dppo_megatron.rollout.node_agent import make_agent
    from dppo_megatron.rollout.servers import ServerManager, ServerSpec, is_healthy
    import threading

    keys_file = root / "keys" / "keys.yaml"
    keys_file.parent.mkdir(mode=0o700)
    make_keys_file(keys_file)
    keys = read_keys(keys_file)
    model = root / "plain" / "init_model"
    spec = ServerSpec(str(model), free_port(), engine="embedded", keys_file=str(keys_file))
    with ServerManager([spec], root / "keys" / "logs") as manager:
        url = spec.url
        posts = ["/generate", "/update_weights_from_disk", "/init_weights_update_group",
                 "/update_weights_from_distributed", "/destroy_weights_update_group", "/begin_weight_update",
                 "/end_weight_update", "/flush_cache", "/abort_request", "/update_weights_from_tensor",
                 "/release_memory_occupation", "/resume_memory_occupation"]
        gets = ["/model_info", "/server_info", "/get_weight_version"]
        body = {"model_path": str(model), "weight_version": "99", "input_ids": [1, 2]}
        answers = [call(url + path, body, header) for path in posts for header in (None, "Bearer wrong", "Basic x")]
        answers += [call(url + path, None, header) for path in gets for header in (None, "Bearer wrong")]
        with urllib.request.urlopen(url + "/health", timeout=30) as response:
            healthy = response.status == 200
        version = call(url + "/model_info", None, f"Bearer {keys.api_key}")
        unchanged = json.loads(version[1]).get("weight_version") == "0"
        table.add(f"embedded engine: {len(answers)} requests without the right key", True, "-", None,
                  f"{sum(code == 401 for code, _ in answers)} answered 401; healthy after: {healthy}; "
                  f"weights unchanged: {unchanged}")

        agent = make_agent(manager, "node", "127.0.0.1", 0)
        threading.Thread(target=agent.serve_forever, daemon=True).start()
        agent_url = f"http://127.0.0.1:{agent.server_address[1]}"
        answers = [call(agent_url + path, {"port": spec.port}, header) for path in ("/restart", "/shutdown")
                   for header in (None, "Bearer wrong", f"Bearer {keys.api_key}")]
        alive = is_healthy(agent_url) and is_healthy(url) and manager.restarts[url] == 0
        table.add(f"node agent: {len(answers)} requests without the control key", True, "-", None,
                  f"{sum(code == 401 for code, _ in answers)} answered 401 (the generation key included); "
                  f"healthy after, nothing restarted: {alive}")
        agent.shutdown()


def call(url: str, body: dict | None, authorization: str | None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **({"Authorization": authorization} if authorization else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kill-points", type=int, default=20)
    parser.add_argument("--server-kills", type=int, default=20)
    parser.add_argument("--only", nargs="+", choices=FAULTS, help="run only these faults")
    parser.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    args = parser.parse_args()
    only = set(args.only or FAULTS)
    root = Path(tempfile.mkdtemp(prefix="dppo-faults-"))
    print(f"fault runs of the quickstart on {platform.node()} ({os.cpu_count()} cores), in {root}", flush=True)
    table = Table()
    try:
        plain_dir = root / "plain"
        assert finish(start(plain_dir, *SETTINGS)) == 0, f"the uninterrupted run failed: see {root}/plain.log"
        plain = metrics(plain_dir)
        from dppo_megatron.run.metrics import read_metrics

        save_seconds = max(m.get("time/checkpoint", 0.0) for m in read_metrics(plain_dir)[:-1])
        if "torn" in only:
            torn(root, plain, table, "shard truncated")
            torn(root, plain, table, "manifest missing")
        if "killed-saving" in only:
            killed_while_saving(root, plain, table, args.kill_points, save_seconds)
        if "disk-full" in only:
            disk_full(root, plain, table)
        if "server-killed" in only:
            for sync in ("distributed", "disk"):
                server_killed(root, table, args.server_kills, sync)
        if "keys" in only:
            unkeyed_requests(root, table)
    finally:
        table.print()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
