"""Checkpoint conversion: hf-to-mcore, mcore-to-hf, verify (`dppo-megatron convert`).

Each runs as an SPMD program over the ranks its layout needs. Tensors move one at a time
through the conversion table, so memory is bounded by the local shards plus a few whole tensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from dppo_megatron.learner.checkpoint import HF_CONFIG_FILE, STATE_FILE
from dppo_megatron.model import dcp_metadata, manifest
from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.model.hf_io import CheckpointError
from dppo_megatron.model.layout import ParallelLayout
from dppo_megatron.processes import say

DEFAULT_TOLERANCE = 1e-4


def hf_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"config.json dtype {name!r} is not a torch dtype")
    return dtype


def _progress(label: str):
    marks = set()

    def report(done: int, total: int) -> None:
        percent = 100 * done // total
        if percent // 10 not in marks or done == total:
            marks.add(percent // 10)
            say(f"{label}: {done}/{total} tensors ({percent}%)")

    return report


def _start(layout: ParallelLayout, arch: Qwen3Arch, dtype: torch.dtype):
    from dppo_megatron.learner.model import ModelOptions, build_model
    from dppo_megatron.learner.parallel import init_parallel

    init_parallel(layout, arch)
    return build_model(arch, layout, ModelOptions(dtype=dtype))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a root of training checkpoints (its latest complete one),
    checked against its manifest: a torn one is refused, naming its bad files."""
    from dppo_megatron.learner.checkpoint import latest_checkpoint

    path = Path(path)
    found = path if (path / ".metadata").is_file() else latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: neither a Megatron checkpoint nor a directory of them")
    if problems := _torn(found):
        raise CheckpointError(f"{found} is torn ({manifest.summary(problems)}); use an earlier checkpoint")
    dcp_metadata.check(found)
    return found


def _torn(checkpoint: Path) -> list[str]:
    from dppo_megatron.learner.checkpoint import torn_files

    if (checkpoint / STATE_FILE).is_file():  # a training checkpoint: it always has a manifest
        return torn_files(checkpoint)
    return manifest.problems(checkpoint) if manifest.has_manifest(checkpoint) else []


def hf_to_mcore(hf_dir: str, out: str, layout: ParallelLayout) -> Path:
    from megatron.core import dist_checkpointing

    from dppo_megatron.learner.weights import load_hf_weights

    config = json.loads((Path(hf_dir) / "config.json").read_text())
    arch = Qwen3Arch.from_hf(config)
    model = _start(layout, arch, hf_dtype(config))
    say(f"hf-to-mcore: {arch.architecture}, {arch.num_layers} layers, "
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
        manifest.write_manifest(partial)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    dist.barrier()
    say(f"wrote Megatron checkpoint {final}")
    return final


def checkpoint_config_file(checkpoint: Path, hf_config: str | None) -> Path:
    """The config.json describing a Megatron checkpoint: --hf-config's, else the copy kept in it."""
    config_file = Path(hf_config) / "config.json" if hf_config else checkpoint / HF_CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} does not exist; pass --hf-config DIR (the model's HF directory)")
    return config_file


def _load_model(ckpt: str, hf_config: str | None, layout: ParallelLayout, dtype: torch.dtype | None = None):
    from megatron.core import dist_checkpointing

    path = resolve_checkpoint(ckpt)
    config = json.loads(checkpoint_config_file(path, hf_config).read_text())
    arch = Qwen3Arch.from_hf(config)
    model = _start(layout, arch, dtype or hf_dtype(config))
    state = model.sharded_state_dict()
    model.load_state_dict(dist_checkpointing.load({"model": state}, str(path))["model"])
    say(f"loaded {path}")
    return model, arch, config


def mcore_to_hf(ckpt: str, out: str, hf_config: str | None) -> Path:
    """In this one process, streaming (convert/streaming.py): from a checkpoint saved at any layout."""
    from dppo_megatron.convert.streaming import export_checkpoint

    path = resolve_checkpoint(ckpt)
    config_file = checkpoint_config_file(path, hf_config)
    config = json.loads(config_file.read_text())
    arch = Qwen3Arch.from_hf(config)
    say(f"mcore-to-hf: {path}, {arch.architecture}, {arch.num_layers} layers, {arch.num_experts or 'no'} experts")
    export_checkpoint(path, out, arch, config=config, dtype=hf_dtype(config),
                      side_files_from=hf_config,
                      progress=_progress("write"))
    say(f"wrote Hugging Face checkpoint {out}")
    return Path(out)


def mcore_to_hf_via_model(ckpt: str, out: str, hf_config: str | None, layout: ParallelLayout) -> Path:
    """The same export by building the model at `layout` (an SPMD program on its ranks) and
    gathering its tensors: the path `verify` takes, kept as the reference that
    benchmarks/convert_memory.py measures the stream against."""
    from dppo_megatron.learner.weights import save_hf

    model, arch, config = _load_model(ckpt, hf_config, layout)
    save_hf(model, arch, out, config=config, dtype=hf_dtype(config), side_files_from=hf_config,
            progress=_progress("write"), manifest=True)
    say(f"wrote Hugging Face checkpoint {out}")
    return Path(out)


def verify(hf_dir: str, ckpt: str, layout: ParallelLayout, *, tolerance: float, batch: int, seq_len: int, seed: int) -> float:
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
    say(f"max_abs_logit_diff={value:.3e}")
    say("OK" if value <= tolerance else f"FAILED: above the tolerance {tolerance:g}")
    return value
