"""Runs of `dppo-megatron train` for the tests: start one in the background, wait for its steps,
read its log; the settings of the suite's one 120-step quickstart run (the `quickstart` fixture
of conftest.py), which the training, export, resume and multi-node tests compare against."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dppo_megatron.processes import free_port
from dppo_megatron.run.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "tiny" / "quickstart.yaml"


def start_train(run_dir: Path, *overrides: str, recipe: Path | None = QUICKSTART) -> subprocess.Popen:
    command = [sys.executable, "-m", "dppo_megatron", "train"] + ([str(recipe)] if recipe else [])
    command += ["--run-dir", str(run_dir), *overrides]
    if recipe is not None and not any(o.startswith("rollout.base_port=") for o in overrides):
        command.append(f"rollout.base_port={free_port()}")
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")  # noqa: SIM115 - closed with the process
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def finish(process: subprocess.Popen, run_dir: Path, timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"training timed out after {timeout}s:\n{log_tail(run_dir)}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def log_tail(run_dir: Path) -> str:
    path = run_dir.parent / f"{run_dir.name}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-40:]) if path.is_file() else ""


def wait_for_steps(run_dir: Path, steps: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(read_metrics(run_dir)) < steps:
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"no step {steps} (exit {process.poll()}):\n{log_tail(run_dir)}")
        time.sleep(0.1)


def comparable(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in metrics]


def readme_main_command() -> list[str]:
    """The README's main set-up command, after its install step."""
    from tests.test_readme import readme_commands

    main = next(c for c in readme_commands() if c.startswith("pip install") and "pytest" not in c)
    return main.split("&&", 1)[1].split()


# The suite's quickstart run: evaluation and checkpoint at the end only (what its tests look at); and
# asynchronous rollouts (step k trains on samples of step k - 1's weights), so that learning
# and kill-and-resume are shown for the mode with the most state.
QUICKSTART_AT_THE_END = ["trainer.eval_every=120", "trainer.save_every=120", "trainer.max_staleness=1"]
# The README's run takes 200 steps; mastery (reward and held-out reward above 0.9, no response
# running out of room) comes by step ~100, so the suite stops at 120.
QUICKSTART_STEPS = 120
