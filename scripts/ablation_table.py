"""The table of docs/ablations.md from an ablation's run directories: RUNS/s<seed>/<loss>/.

    python scripts/ablation_table.py RUNS LOSS [LOSS ...]

Per loss, over the seeds: mean (min-max) of the reward of the last 10 steps and of the held-out
reward at steps 100 and 200, the first step with reward >= 0.8 per seed, and means over all
steps of |pi - mu|, the k3 KL, the masked fractions by advantage sign and, for the paper's two
cases, by bucket of the rollout probability mu (rare tokens pushed up: A > 0 with mu < 0.01;
likely tokens pushed down: A < 0 with mu > 0.9), each step weighted by its token count.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dppo_megatron.run.metrics import read_metrics


def spread(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    return f"{sum(values) / len(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def weighted(metrics: list[dict], value: str, count: str) -> float:
    pairs = [(m[value], m[count]) for m in metrics if value in m and count in m]
    total = sum(c for _, c in pairs)
    return sum(v * c for v, c in pairs) / total if total else float("nan")


def eval_at(metrics: list[dict], step: int) -> float | None:
    return next((m["eval/mean_reward"] for m in metrics if m["step"] + 1 == step and "eval/mean_reward" in m), None)


def finished(run_dir: Path) -> bool:
    status = run_dir / "status.json"
    return status.exists() and json.loads(status.read_text())["state"] == "finished"


def main(root: Path, losses: list[str]) -> None:
    seeds = sorted(p.name for p in root.glob("s*") if p.is_dir())
    print("| loss | seeds | reward, last 10 steps | eval @100 | eval @200 | first step with reward >= 0.8 | "
          "mismatch (mean abs pi - mu) | k3 KL | masked A>0 | masked A<0 | masked A>0, mu < 0.01 | "
          "masked A<0, mu > 0.9 |")
    print("|" + "---|" * 12)
    for loss in losses:
        runs = [read_metrics(root / seed / loss) for seed in seeds if finished(root / seed / loss)]
        if not runs:
            continue
        last10 = [sum(m["reward/mean"] for m in run[-10:]) / len(run[-10:]) for run in runs]
        evals = {step: [e for e in (eval_at(run, step) for run in runs) if e is not None] for step in (100, 200)}
        first = [next((str(m["step"] + 1) for m in run if m["reward/mean"] >= 0.8), "never") for run in runs]

        def mean_of(value: str, count: str, digits: int) -> str:
            return f"{sum(weighted(run, value, count) for run in runs) / len(runs):.{digits}f}"

        print(f"| `{loss}` | {len(runs)} | {spread(last10)} | {spread(evals[100])} | {spread(evals[200])} | "
              f"{', '.join(first)} | {mean_of('train/mismatch_tv', 'train/tokens', 4)} | "
              f"{mean_of('train/kl_k3', 'train/tokens', 5)} | {mean_of('train/masked_frac_pos', 'train/tokens_pos', 4)} | "
              f"{mean_of('train/masked_frac_neg', 'train/tokens_neg', 4)} | "
              f"{mean_of('train/masked_frac_by_mu/pos/0-0.01', 'train/tokens_by_mu/pos/0-0.01', 4)} | "
              f"{mean_of('train/masked_frac_by_mu/neg/0.9-1', 'train/tokens_by_mu/neg/0.9-1', 4)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
