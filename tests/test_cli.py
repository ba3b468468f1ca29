"""The installed `dppo-megatron` command."""

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

