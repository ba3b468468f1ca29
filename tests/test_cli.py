"""The installed `dppo-megatron` command."""

import json
import shutil
import subprocess
import sys

import pytest

from dppo_megatron import __version__


def command() -> list[str]:
    exe = shutil.which("dppo-megatron")
    return [exe] if exe else [sys.executable, "-m", "dppo_megatron"]


def test_version_prints_the_package_version():
    out = subprocess.run(command() + ["--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"dppo-megatron {__version__}"


@pytest.mark.parametrize("args", [["--help"], []])
def test_help_describes_the_tool(args):
    out = subprocess.run(command() + args, capture_output=True, text=True, check=True)
    assert "usage: dppo-megatron" in out.stdout and "DPPO" in out.stdout


def test_unknown_option_fails_with_usage():
    out = subprocess.run(command() + ["--no-such-flag"], capture_output=True, text=True)
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr



def test_plot_draws_the_runs_that_have_steps_and_names_those_skipped(tmp_path):
    good, failed = tmp_path / "quickstart-1", tmp_path / "quickstart-2"
    good.mkdir()
    failed.mkdir()  # a run that failed before its first step
    by_mu = {f"train/{name}/{bucket}": 0.1 for bucket in ("0-0.01", "0.01-0.1", "0.1-0.5", "0.5-0.9", "0.9-1")
             for name in ("masked_frac_by_mu/pos", "masked_frac_by_mu/neg", "mismatch_tv_by_mu", "tokens_by_mu/pos",
                          "tokens_by_mu/neg", "tokens_by_mu")}
    (good / "metrics.jsonl").write_text("".join(
        json.dumps({"step": step, "reward/mean": step / 10, "response/length_mean": 4.0, **by_mu}) + "\n"
        for step in range(5)))
    (good / "masked_tokens.json").write_text(json.dumps({
        "A>0": [{"id": 5, "token": " Wait", "count": 3, "share": 0.75}, {"id": 9, "token": "1", "count": 1, "share": 0.25}],
        "A>0 masked": 4, "A<0": [], "A<0 masked": 0}))
    result = subprocess.run([sys.executable, "-m", "dppo_megatron", "plot", str(good), str(failed), "--out",
                             str(tmp_path / "plots")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"skipped (no steps yet): {failed}" in result.stderr
    assert (tmp_path / "plots" / "reward.png").stat().st_size > 1000
    # By bucket of the rollout probability: bars per run.
    assert (tmp_path / "plots" / "masked_by_mu.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "mismatch_by_mu.png").stat().st_size > 1000
    # The run's most often masked tokens (of several runs, one figure each).
    assert (tmp_path / "plots" / "masked_tokens-quickstart-1.png").stat().st_size > 1000
