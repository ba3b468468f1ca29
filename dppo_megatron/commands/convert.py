"""`dppo-megatron convert`: hf-to-mcore, mcore-to-hf, verify (convert/checkpoints.py).

Each runs as an SPMD program over the ranks its layout needs: the command checks the config and
the layout, then relaunches itself on those ranks when it is not already running under a launcher."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as dist

from dppo_megatron.commands.args import EXIT_INVALID
from dppo_megatron.convert.checkpoints import DEFAULT_TOLERANCE, hf_to_mcore, mcore_to_hf, resolve_checkpoint, verify
from dppo_megatron.model.arch import ArchError, Qwen3Arch
from dppo_megatron.model.hf_io import CheckpointError, open_matching_checkpoint
from dppo_megatron.model.layout import LayoutError, ParallelLayout
from dppo_megatron.processes import run_ranks


def add_parser(subparsers) -> None:
    convert = subparsers.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron")
    commands = convert.add_subparsers(dest="convert_command", metavar="WHAT", required=True)

    def layout_args(p, with_pp=True):
        p.add_argument("--tp", type=int, default=1, help="tensor parallel size (default 1)")
        p.add_argument("--ep", type=int, default=1, help="expert parallel size (default 1)")
        if with_pp:
            p.add_argument("--pp", type=int, default=1, help="pipeline parallel size (default 1)")

    p = commands.add_parser("hf-to-mcore", help="HF safetensors -> Megatron distributed checkpoint")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--out", required=True)
    layout_args(p)
    p.set_defaults(handler=_run)

    p = commands.add_parser("mcore-to-hf", help="Megatron checkpoint -> sharded HF safetensors",
                            description="Streams a checkpoint saved at any layout into Hugging Face safetensors, "
                                        "in this one process, one layer at a time (no GPU, no model built).")
    p.add_argument("--ckpt", required=True, help="a checkpoint directory, or a run's checkpoint root")
    p.add_argument("--out", required=True)
    p.add_argument("--hf-config", help="HF directory for config.json, tokenizer and generation_config.json")
    p.set_defaults(handler=_export)

    p = commands.add_parser("verify", help="compare a Megatron checkpoint's logits with transformers")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    layout_args(p, with_pp=False)
    p.set_defaults(handler=_run, pp=1)


def _export(args) -> int:
    try:
        mcore_to_hf(args.ckpt, args.out, args.hf_config)
    except (CheckpointError, ArchError) as error:
        print(f"dppo-megatron convert mcore-to-hf: error: {error}", file=sys.stderr)
        return EXIT_INVALID
    return 0


def _run(args) -> int:
    layout = ParallelLayout(tp=args.tp, ep=args.ep, pp=args.pp)
    try:
        if "RANK" not in os.environ:
            _preflight(args, layout)  # refuse a bad config or layout before any process starts
            return _relaunch(layout)
        return _convert(args, layout)
    except (CheckpointError, ArchError, LayoutError) as error:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"dppo-megatron convert {args.convert_command}: error: {error}", file=sys.stderr)
        return EXIT_INVALID
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _preflight(args, layout: ParallelLayout) -> None:
    if args.convert_command == "verify":
        resolve_checkpoint(args.ckpt)
    arch = Qwen3Arch.from_hf(Path(args.hf_dir))
    open_matching_checkpoint(args.hf_dir, arch)
    layout.validate(layout.fewest_ranks, arch)


def _convert(args, layout: ParallelLayout) -> int:
    if args.convert_command == "hf-to-mcore":
        hf_to_mcore(args.hf_dir, args.out, layout)
        return 0
    value = verify(args.hf_dir, args.ckpt, layout, tolerance=args.tolerance, batch=args.batch,
                   seq_len=args.seq_len, seed=args.seed)
    return 0 if value <= args.tolerance else 1


def _relaunch(layout: ParallelLayout) -> int:
    """Run this same command on the ranks the layout needs (as torchrun would start them)."""
    return run_ranks(["-m", "dppo_megatron", *sys.argv[1:]], layout.fewest_ranks)
