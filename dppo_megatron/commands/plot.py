"""`dppo-megatron plot RUN_DIR [RUN_DIR ...]`: PNG curves of a run's metrics.jsonl, several
runs overlaid (for ablations: R3 on/off, DPPO vs GRPO)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dppo_megatron.algo.policy_loss import MU_BUCKETS, mu_bucket_name
from dppo_megatron.run.masked_tokens import MASKED_TOKENS_FILE, SIDES
from dppo_megatron.run.metrics import read_metrics

# (file name, title, metric names: the first one a run has is drawn)
CURVES = [
    ("reward", "mean reward", ["reward/mean"]),
    ("eval_reward", "held-out mean reward", ["eval/mean_reward"]),
    ("mismatch", "mismatch |pi - mu| (mean TV on sampled tokens)", ["train/mismatch_tv"]),
    ("masked_fraction", "masked fraction of response tokens", ["train/masked_frac"]),
    ("masked_fraction_by_sign", "masked fraction: A>0 solid, A<0 dashed", ["train/masked_frac_pos"]),
    ("entropy", "policy entropy (nats)", ["train/entropy"]),
    ("length", "mean response length (tokens)", ["response/length_mean"]),
    ("kl_k3", "k3 estimate of KL(mu || pi)", ["train/kl_k3"]),
]


def plot_runs(run_dirs: list[Path], out_dir: Path, labels: list[str] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, empty, masked = [], [], []
    for index, run_dir in enumerate(run_dirs):
        metrics = read_metrics(run_dir)
        label = labels[index] if labels else run_dir.name
        if metrics:
            runs.append((label, metrics))
        else:
            empty.append(str(run_dir))
        if (run_dir / MASKED_TOKENS_FILE).exists():
            masked.append((label, json.loads((run_dir / MASKED_TOKENS_FILE).read_text())))
    if not runs:
        raise FileNotFoundError(f"no metrics.jsonl with any step in {', '.join(empty)}")
    if empty:  # `plot runs/quickstart-*` after a run that failed before its first step
        print(f"skipped (no steps yet): {', '.join(empty)}", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, title, names in CURVES:
        figure, axes = plt.subplots(figsize=(6.4, 4.0))
        drawn = False
        for color, (label, metrics) in enumerate(runs):
            for name in names:
                points = [(m["step"] + 1, m[name]) for m in metrics if name in m]
                if points:
                    axes.plot(*zip(*points), label=label, color=f"C{color}", marker="o" if len(points) < 12 else None)
                    drawn = True
                    break
            if file_name == "masked_fraction_by_sign":
                points = [(m["step"] + 1, m["train/masked_frac_neg"]) for m in metrics if "train/masked_frac_neg" in m]
                if points:
                    axes.plot(*zip(*points), color=f"C{color}", linestyle="--")
        if drawn:
            axes.set_title(title)
            axes.set_xlabel("step")
            axes.grid(alpha=0.3)
            axes.legend()
            written.append(_save(figure, out_dir, file_name))
        plt.close(figure)
    written += _by_mu_figures(runs, out_dir, plt)
    for label, summary in masked:
        written.append(_masked_tokens_figure(summary, label, out_dir, plt, one_run=len(run_dirs) == 1))
    return written


def _masked_tokens_figure(summary: dict, label: str, out_dir: Path, plt, *, one_run: bool, top: int = 20) -> Path:
    """The run's most often masked tokens, A > 0 and A < 0 side by side, as shares of the
    tokens masked on that side."""
    figure, axes = plt.subplots(1, 2, figsize=(12.8, 0.28 * top + 1.2))
    for axis, side in zip(axes, SIDES):
        rows = summary.get(side, [])[:top][::-1]  # the most frequent at the top
        axis.barh(range(len(rows)), [row["share"] for row in rows], color="C0" if side == "A>0" else "C3")
        axis.set_yticks(range(len(rows)), [repr(row["token"]) for row in rows], fontsize=8)
        axis.set_title(f"{label}: masked with {side} ({summary.get(f'{side} masked', 0)} tokens)")
        axis.set_xlabel("share of the masked tokens")
        axis.grid(alpha=0.3, axis="x")
    path = _save(figure, out_dir, "masked_tokens" if one_run else f"masked_tokens-{_file_safe(label)}")
    plt.close(figure)
    return path


def _file_safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _save(figure, out_dir: Path, file_name: str) -> Path:
    figure.tight_layout()
    path = out_dir / f"{file_name}.png"
    figure.savefig(path, dpi=100)
    return path


def _by_mu_figures(runs: list[tuple[str, list[dict]]], out_dir: Path, plt) -> list[Path]:
    """Bars by bucket of the rollout probability mu, one per run, averaged over the run's steps
    (weighted by each step's token count): the masked fraction for A > 0 and A < 0, and |pi - mu|."""
    buckets = [mu_bucket_name(*b) for b in MU_BUCKETS]

    def averaged(metrics: list[dict], value: str, count: str) -> list[float]:
        out = []
        for bucket in buckets:
            pairs = [(m[f"train/{value}/{bucket}"], m[f"train/{count}/{bucket}"]) for m in metrics
                     if f"train/{value}/{bucket}" in m]
            weight = sum(c for _, c in pairs)
            out.append(sum(v * c for v, c in pairs) / weight if weight else float("nan"))
        return out

    panels = {"masked_by_mu": [("masked fraction: A > 0", "masked_frac_by_mu/pos", "tokens_by_mu/pos"),
                               ("masked fraction: A < 0", "masked_frac_by_mu/neg", "tokens_by_mu/neg")],
              "mismatch_by_mu": [("mismatch: |pi - mu|", "mismatch_tv_by_mu", "tokens_by_mu")]}
    written = []
    for file_name, rows in panels.items():
        if not any(f"train/{rows[0][1]}/{buckets[0]}" in m for _, metrics in runs for m in metrics):
            continue  # runs from before these metrics
        figure, axes = plt.subplots(1, len(rows), figsize=(6.4 * len(rows), 4.0), squeeze=False)
        width = 0.8 / len(runs)
        for axis, (title, value, count) in zip(axes[0], rows):
            for index, (label, metrics) in enumerate(runs):
                positions = [b + (index - (len(runs) - 1) / 2) * width for b in range(len(buckets))]
                axis.bar(positions, averaged(metrics, value, count), width, label=label, color=f"C{index}")
            axis.set_xticks(range(len(buckets)), [f"mu {b}" for b in buckets])
            axis.set_title(title)
            axis.grid(alpha=0.3, axis="y")
            axis.legend()
        written.append(_save(figure, out_dir, file_name))
        plt.close(figure)
    return written


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("plot", help="PNG curves of one or more runs (overlaid)")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/plots of the first run)")
    parser.add_argument("--labels", nargs="+", help="legend labels, one per run (default: directory names)")
    parser.set_defaults(handler=_plot)


def _plot(args) -> int:
    if args.labels and len(args.labels) != len(args.run_dirs):
        print(f"error: {len(args.labels)} labels for {len(args.run_dirs)} runs", file=sys.stderr)
        return 2
    out = args.out or args.run_dirs[0] / "plots"
    try:
        written = plot_runs(args.run_dirs, out, args.labels)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
