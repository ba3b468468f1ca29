"""`dppo-megatron convert`: hf-to-mcore, mcore-to-hf, verify.

Each runs as an SPMD program over the ranks its layout needs (the CLI relaunches itself with
torchrun when it is not already running under a launcher). Tensors move one at a time through
the conversion table, so memory is bounded by the local shards plus a few whole tensors.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dppo_megatron.convert.hf_io import CheckpointError, open_matching_checkpoint
from dppo_megatron.convert.qwen3_arch import Qwen3Arch
from dppo_megatron.learner.checkpoint import HF_CONFIG_FILE

DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        """The fewest ranks that hold this layout (data parallel 1 for the dense part)."""
        return math.lcm(self.tp * self.pp, self.ep * self.pp)


def hf_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"config.json dtype {name!r} is not a torch dtype")
    return dtype


def _say(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def _progress(label: str):
    marks = set()

    def report(done: int, total: int) -> None:
        percent = 100 * done // total
        if percent // 10 not in marks or done == total:
            marks.add(percent // 10)
            _say(f"{label}: {done}/{total} tensors ({percent}%)")

    return report


def _start(layout: Layout, arch: Qwen3Arch, dtype: torch.dtype):
    from dppo_megatron.learner.model import ModelOptions, build_model
    from dppo_megatron.learner.parallel import ParallelLayout, init_parallel

    parallel = ParallelLayout(tp=layout.tp, pp=layout.pp, ep=layout.ep)
    init_parallel(parallel, arch)
    return build_model(arch, parallel, ModelOptions(dtype=dtype))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a root of training checkpoints (its latest complete one)."""
    from dppo_megatron.learner.checkpoint import latest_checkpoint

    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: neither a Megatron checkpoint nor a directory of them")
    return found


def hf_to_mcore(hf_dir: str, out: str, layout: Layout) -> Path:
    from megatron.core import dist_checkpointing

    from dppo_megatron.learner.weights import load_hf_weights

    config = json.loads((Path(hf_dir) / "config.json").read_text())
    arch = Qwen3Arch.from_hf(config)
    model = _start(layout, arch, hf_dtype(config))
    _say(f"hf-to-mcore: {arch.architecture}, {arch.num_layers} layers, "
         f"{arch.num_experts or 'no'} experts, tp={layout.tp} ep={layout.ep} pp={layout.pp}")
    load_hf_weights(model, arch, hf_dir, progress=_progress("read"))
    final, partial = Path(out), Path(out + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(partial))
    if dist.get_rank() == 0:
        (partial / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    dist.barrier()
    _say(f"wrote Megatron checkpoint {final}")
    return final


def checkpoint_config_file(checkpoint: Path, hf_config: str | None) -> Path:
    """The config.json describing a Megatron checkpoint: --hf-config's, else the copy kept in it."""
    config_file = Path(hf_config) / "config.json" if hf_config else checkpoint / HF_CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} does not exist; pass --hf-config DIR (the model's HF directory)")
    return config_file


def _load_model(ckpt: str, hf_config: str | None, layout: Layout, dtype: torch.dtype | None = None):
    from megatron.core import dist_checkpointing

    path = resolve_checkpoint(ckpt)
    config = json.loads(checkpoint_config_file(path, hf_config).read_text())
    arch = Qwen3Arch.from_hf(config)
    model = _start(layout, arch, dtype or hf_dtype(config))
    state = model.sharded_state_dict()
    model.load_state_dict(dist_checkpointing.load({"model": state}, str(path))["model"])
    _say(f"loaded {path}")
    return model, arch, config


def mcore_to_hf(ckpt: str, out: str, hf_config: str | None, layout: Layout) -> Path:
    from dppo_megatron.learner.weights import save_hf

    model, arch, config = _load_model(ckpt, hf_config, layout)
    save_hf(model, arch, out, config=config, dtype=hf_dtype(config), side_files_from=hf_config,
            progress=_progress("write"))
    _say(f"wrote Hugging Face checkpoint {out}")
    return Path(out)


def verify(hf_dir: str, ckpt: str, layout: Layout, *, tolerance: float, batch: int, seq_len: int, seed: int) -> float:
    """max |logit difference| between the Megatron checkpoint and transformers on one random
    batch, both in float32 on the same weights."""
    from dppo_megatron.learner.forward import full_vocab_logits

    model, arch, _ = _load_model(ckpt, hf_dir, layout, dtype=torch.float32)
    tokens = torch.randint(0, arch.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    logits = full_vocab_logits(model, arch.vocab_size, tokens)
    diff = torch.full((1,), -1.0, dtype=torch.float64)
    if logits is not None and dist.get_rank() == dist.get_world_size() - 1:
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            diff[0] = (logits - reference(tokens).logits).abs().max().item()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    value = float(diff[0])
    _say(f"max_abs_logit_diff={value:.3e}")
    _say("OK" if value <= tolerance else f"FAILED: above the tolerance {tolerance:g}")
    return value


# --- command line ---------------------------------------------------------------------------

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

    p = commands.add_parser("mcore-to-hf", help="Megatron checkpoint -> sharded HF safetensors")
    p.add_argument("--ckpt", required=True, help="a checkpoint directory, or a run's checkpoint root")
    p.add_argument("--out", required=True)
    p.add_argument("--hf-config", help="HF directory for config.json, tokenizer and generation_config.json")
    layout_args(p)
    p.set_defaults(handler=_run)

    p = commands.add_parser("verify", help="compare a Megatron checkpoint's logits with transformers")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    layout_args(p, with_pp=False)
    p.set_defaults(handler=_run, pp=1)


def _run(args) -> int:
    from dppo_megatron.convert.qwen3_arch import ArchError
    from dppo_megatron.learner.parallel import LayoutError

    layout = Layout(tp=args.tp, ep=args.ep, pp=args.pp)
    try:
        if "RANK" not in os.environ:
            _preflight(args, layout)  # refuse a bad config or layout before any process starts
            return _relaunch(layout)
        return _convert(args, layout)
    except (CheckpointError, ArchError, LayoutError) as error:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"dppo-megatron convert {args.convert_command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _preflight(args, layout: Layout) -> None:
    from dppo_megatron.learner.parallel import ParallelLayout

    if args.convert_command == "mcore-to-hf":
        config = checkpoint_config_file(resolve_checkpoint(args.ckpt), args.hf_config)
    else:
        config = Path(args.hf_dir)
        if args.convert_command == "verify":
            resolve_checkpoint(args.ckpt)
    arch = Qwen3Arch.from_hf(config)
    if args.convert_command != "mcore-to-hf":
        open_matching_checkpoint(args.hf_dir, arch)
    ParallelLayout(tp=layout.tp, pp=layout.pp, ep=layout.ep).validate(layout.world_size, arch)


def _convert(args, layout: Layout) -> int:
    if args.convert_command == "hf-to-mcore":
        hf_to_mcore(args.hf_dir, args.out, layout)
        return 0
    if args.convert_command == "mcore-to-hf":
        mcore_to_hf(args.ckpt, args.out, args.hf_config, layout)
        return 0
    value = verify(args.hf_dir, args.ckpt, layout, tolerance=args.tolerance, batch=args.batch,
                   seq_len=args.seq_len, seed=args.seed)
    return 0 if value <= args.tolerance else 1


def _relaunch(layout: Layout) -> int:
    """Run this same command under torchrun on the ranks the layout needs."""
    import subprocess

    from dppo_megatron.launch_utils import free_port

    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={layout.world_size}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "dppo_megatron", *sys.argv[1:]]
    return subprocess.call(command)
