"""The `dppo-megatron` command."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

from dppo_megatron import __version__
from dppo_megatron.commands import convert, evaluate, job, plot, preflight, serve, submit, train, validate

# In the order `--help` lists them: the user's commands, then those jobs run for themselves.
COMMANDS = (train, validate, preflight, evaluate, submit, plot, convert, serve, job)

DESCRIPTION = """\
Fine-tune Qwen3 dense and MoE models with DPPO (Divergence Proximal Policy Optimization) on
Megatron Core learners, with SGLang servers (or the embedded CPU engine) producing rollouts."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dppo-megatron", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"dppo-megatron {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Megatron Core announces at import that it falls back to torch without TE / Apex: that is
    # the expected CPU path, not news for every command. Its checkpointing calls torch APIs that
    # torch has deprecated (ShardedTensor, load_state_dict, all_gather_into_tensor): warnings for
    # Megatron's maintainers, repeated by every rank of every command.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message="Apex is not installed. Falling back to Torch Norm")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch\.distributed|megatron\.core)\.")
    # With TP > 1 and expert TP 1 (the usual MoE layout) every expert linear layer says that it
    # does not split its sequence: as intended.
    warnings.filterwarnings("ignore", message="`sequence_parallel` is set to `True`, but tensor model parallel size is 1")
    # transformers draws a progress bar for every checkpoint it writes or reads: dozens per run
    # in the trainer's output and a server's log, none of them informative.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Megatron's tensor/sequence parallel overlap relies on one CUDA work queue (its own
    # training scripts set this; it asks for it at every parallel layer otherwise).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    # Megatron Core wraps its fused-kernel helpers in torch.compile at import, which imports
    # torch's compiler stack: 3 s of every process's start on a CPU, where those kernels are
    # not compiled anyway. Without CUDA, torch.compile hands the functions back as they are.
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
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
