"""The `dppo-megatron` command."""

from __future__ import annotations

import argparse
import sys
import warnings

from dppo_megatron import __version__

DESCRIPTION = """\
Fine-tune Qwen3 dense and MoE models with DPPO (Divergence Proximal Policy Optimization) on
Megatron Core learners, with SGLang servers (or the embedded CPU engine) producing rollouts."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dppo-megatron", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"dppo-megatron {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    from dppo_megatron.convert.commands import add_parser as add_convert
    from dppo_megatron.rollout.node_agent import add_parser as add_serve_node
    from dppo_megatron.rollout.server import add_parser as add_serve_embedded
    from dppo_megatron.slurm import add_parser as add_submit
    from dppo_megatron.plot import add_parser as add_plot
    from dppo_megatron.train_command import add_parser as add_train

    add_train(commands)
    add_submit(commands)
    add_plot(commands)
    add_convert(commands)
    add_serve_embedded(commands)
    add_serve_node(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Megatron Core announces at import that it falls back to torch without TE / Apex: that is
    # the expected CPU path, not news for every command.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    parser = build_parser()
    # key=value overrides may come after options (`train R.yaml --run-dir D loss.mode=grpo`),
    # which argparse alone does not take for a positional list.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
