"""Asynchronous rollouts against the synchronous loop: the quickstart recipe with its rollout
side (the engine, rank 0's rollout process and its reward worker) pinned to one core and its
one learner rank to the other, trainer.max_staleness 0 and 1 over the same steps and seeds.
Prints steps per second and the reward curves' gap; writes a plot.

    python benchmarks/async_rollouts.py                  # 3 seeds x 60 steps
    python benchmarks/async_rollouts.py --seeds 1 --steps 20

Steps per second count the loop's own time (`time/step`, step 0 left out: it pays for the
start), not the servers' start. With max_staleness 1 the engine generates step k + 1 while the
learner trains step k, so a step costs max(rollout, learner) instead of their sum.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dppo_megatron.processes import free_port
from dppo_megatron.run.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "tiny" / "quickstart.yaml"
ONE_RANK = ["learner.ranks_per_node=1", "learner.ep=1", "trainer.eval_every=0", "trainer.save_every=0",
            "trainer.tensorboard=false"]


def pin(pid: int, cores: set[int]) -> None:
    """Every thread of `pid` to `cores` (a process's threads each have their own mask)."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            os.sched_setaffinity(int(task.name), cores)
        except (OSError, ValueError):
            pass


def rollout_side_pids() -> list[int]:
    """The engine, and rank 0's rollout process with its reward workers (the processes it
    starts with multiprocessing's spawn: nothing else in a run does)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"serve-embedded" in command or b"multiprocessing.spawn" in command:
            pids.append(int(proc.name))
    return pids


def train(run_dir: Path, seed: int, steps: int, staleness: int) -> list[dict]:
    command = [sys.executable, "-m", "dppo_megatron", "train", str(QUICKSTART), "--run-dir", str(run_dir),
               f"trainer.steps={steps}", f"trainer.seed={seed}", f"trainer.max_staleness={staleness}",
               f"rollout.base_port={free_port()}", "reward.workers=1", *ONE_RANK]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = open(run_dir.parent / f"{run_dir.name}.log", "wb")  # noqa: SIM115 - closed below
    # The learner on core 1; the rollout side (the engine, the client's process and the reward
    # worker) is moved to core 0 as it comes up.
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                               preexec_fn=lambda: os.sched_setaffinity(0, {1}))
    while process.poll() is None:
        for pid in rollout_side_pids():
            pin(pid, {0})
        time.sleep(0.5)
    log.close()
    if process.returncode != 0:
        raise SystemExit(f"training failed; see {run_dir.parent / (run_dir.name + '.log')}")
    return read_metrics(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "ablations" / "async_reward.png")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs 2 cores: one for the engine, one for the learner")
    runs: dict[int, list[list[dict]]] = {0: [], 1: []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(1, args.seeds + 1):
            for staleness in (0, 1):
                metrics = train(Path(tmp) / f"s{staleness}-seed{seed}", seed, args.steps, staleness)
                runs[staleness].append(metrics)
    print(f"\nquickstart, 1 learner rank on core 1, the rollout side on core 0, {args.steps} steps x {args.seeds} seeds")
    print("| max_staleness | steps/s | rollout wait (s/step) | learner (s/step) | final reward (mean of last 10 steps) |")
    print("|---|---|---|---|---|")
    rates, finals = {}, {}
    for staleness, seeds in runs.items():
        step_times = [m["time/step"] for metrics in seeds for m in metrics[1:]]
        rates[staleness] = 1 / np.mean(step_times)
        finals[staleness] = [np.mean([m["reward/mean"] for m in metrics[-10:]]) for metrics in seeds]
        rollout = np.mean([m["time/rollout"] for metrics in seeds for m in metrics[1:]])
        learner = np.mean([m["time/learner"] for metrics in seeds for m in metrics[1:]])
        print(f"| {staleness} | {rates[staleness]:.2f} | {rollout:.3f} | {learner:.3f} | "
              f"{np.mean(finals[staleness]):.3f} +- {np.std(finals[staleness]):.3f} |")
    curves = {s: np.array([[m["reward/mean"] for m in metrics] for metrics in seeds]) for s, seeds in runs.items()}
    gap = np.abs(curves[1].mean(0) - curves[0].mean(0))
    noise = np.concatenate([curves[0].std(0), curves[1].std(0)]).mean() if args.seeds > 1 else float("nan")
    print(f"\nspeed-up {rates[1] / rates[0]:.2f}x (target >= 1.5x); reward curves: mean |gap| {gap.mean():.3f}, "
          f"seed std {noise:.3f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for staleness, curve in curves.items():
        mean, low, high = curve.mean(0), curve.min(0), curve.max(0)
        label = "synchronous (max_staleness 0)" if staleness == 0 else "asynchronous (max_staleness 1)"
        axes.plot(mean, label=label)
        axes.fill_between(range(len(mean)), low, high, alpha=0.25)
    axes.set_xlabel("step")
    axes.set_ylabel("mean reward")
    axes.set_title(f"quickstart reward, {args.seeds} seeds (line: mean, band: min-max)")
    axes.legend()
    figure.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
