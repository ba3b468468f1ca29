"""The `dppo-megatron` command."""

from __future__ import annotations

import argparse
import sys

from dppo_megatron import __version__

DESCRIPTION = """\
Fine-tune Qwen3 dense and MoE models with DPPO (Divergence Proximal Policy Optimization) on
Megatron Core learners, with SGLang servers (or the embedded CPU engine) producing rollouts."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dppo-megatron", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"dppo-megatron {__version__}")
    parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
