"""Where a run's numbers go: metrics.jsonl (one line per step), TensorBoard events, optional
wandb, and a progress line on the console."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Rank 0's writer. Opening a resumed run drops the lines of steps at or after
    `first_step`, which the resumed run is about to redo: no step appears twice."""

    def __init__(self, run_dir: str | Path, *, first_step: int, total_steps: int, tensorboard: bool = True,
                 wandb_project: str | None = None, run_name: str = "run", config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        kept = [m for m in read_metrics(run_dir) if m.get("step", 0) < first_step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
        tmp.replace(self.path)
        self.file = self.path.open("a")
        self.first_step, self.total_steps = first_step, total_steps
        self.started = time.monotonic()
        self.tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=first_step)
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as error:
                raise RuntimeError("trainer.wandb_project is set but wandb is not installed: pip install wandb") from error
            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config, dir=str(self.run_dir),
                                    resume="allow", id=run_name)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(name, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def progress(self, step: int, metrics: dict[str, float]) -> str:
        """One console line: step, reward, the trust region's effect, timings, ETA."""
        done = step + 1 - self.first_step
        per_step = (time.monotonic() - self.started) / max(done, 1)
        eta = per_step * (self.total_steps - step - 1)
        parts = [f"step {step + 1}/{self.total_steps}", f"reward {metrics.get('reward/mean', float('nan')):.3f}",
                 f"len {metrics.get('response/length_mean', float('nan')):.1f}"]
        for name, label in (("train/masked_frac", "masked"), ("train/mismatch_tv", "mismatch"),
                            ("train/entropy", "entropy"), ("eval/mean_reward", "eval")):
            if name in metrics:
                parts.append(f"{label} {metrics[name]:.4f}")
        parts.append(" ".join(f"{k.removeprefix('time/')} {metrics[k]:.1f}s"
                              for k in ("time/rollout", "time/learner", "time/sync") if k in metrics))
        parts.append(f"ETA {_duration(eta)}")
        return " | ".join(parts)

    def summary(self) -> str:
        """The end of a run: how far it got, where everything is, and what to run next."""
        metrics = read_metrics(self.run_dir)
        last = metrics[-1] if metrics else {}
        evals = [m for m in metrics if "eval/mean_reward" in m]
        lines = [f"finished {self.total_steps} steps in {_duration(time.monotonic() - self.started)}"
                 + (f" | last reward {last['reward/mean']:.3f}" if "reward/mean" in last else "")
                 + (f" (truncated {last['response/truncated_frac']:.2f})" if "response/truncated_frac" in last else "")
                 + (f" | eval {evals[-1]['eval/mean_reward']:.3f} after step {evals[-1]['step'] + 1}" if evals else ""),
                 f"metrics: {self.path}" + (f" (TensorBoard: {self.run_dir / 'tensorboard'})" if self.tensorboard else ""),
                 f"plot:    dppo-megatron plot {self.run_dir}"]
        return "\n".join(lines)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def mean_over_mini_batches(per_mini_batch: list[dict]) -> dict[str, float]:
    """The learner's metrics of a step, as `train/...`: token counts summed, the rest averaged."""
    if not per_mini_batch:
        return {}
    out = {}
    for name in per_mini_batch[0]:
        values = [m[name] for m in per_mini_batch]
        out[f"train/{name}"] = sum(values) if name.startswith("tokens") else sum(values) / len(values)
    return out


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return value


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
