"""Rank program: load HF checkpoints into Megatron at several layouts in turn, run a batch,
export back.

argv: OUT_DIR RUNS, RUNS a JSON list of {"tp", "pp", "ep", "models": [HF_DIR, ...]}. For each
layout and HF_DIR, writes OUT_DIR/<layout_name>/<name>/logits.pt (the full-vocabulary logits,
from the last stage) and OUT_DIR/<layout_name>/<name>/export/ (HF safetensors gathered from
every rank)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import parity_tokens  # noqa: E402

from dppo_megatron.learner.forward import full_vocab_logits  # noqa: E402
from dppo_megatron.learner.model import build_model  # noqa: E402
from dppo_megatron.learner.parallel import init_parallel  # noqa: E402
from dppo_megatron.learner.weights import iter_hf_tensors, load_hf_weights  # noqa: E402
from dppo_megatron.model.arch import Qwen3Arch  # noqa: E402
from dppo_megatron.model.hf_io import HFCheckpointWriter  # noqa: E402
from dppo_megatron.model.layout import ParallelLayout  # noqa: E402


def layout_name(tp: int, pp: int, ep: int) -> str:
    return f"tp{tp}-pp{pp}-ep{ep}"


def main(out_dir: str, runs: str) -> None:
    for run in json.loads(runs):
        layout = ParallelLayout(tp=run["tp"], pp=run["pp"], ep=run["ep"])
        check_layout(Path(out_dir) / layout_name(run["tp"], run["pp"], run["ep"]), layout, run["models"])


def check_layout(out_dir: Path, layout: ParallelLayout, hf_dirs: list[str]) -> None:
    from megatron.core import parallel_state as ps

    for hf_dir in hf_dirs:
        arch = Qwen3Arch.from_hf(hf_dir)
        init_parallel(layout, arch)
        model = build_model(arch, layout)
        load_hf_weights(model, arch, hf_dir)
        target = Path(out_dir) / Path(hf_dir).name
        logits = full_vocab_logits(model, arch.vocab_size, parity_tokens(arch.vocab_size))
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            target.mkdir(parents=True, exist_ok=True)
            torch.save(logits, target / "logits.pt")
        writer = HFCheckpointWriter(target / "export", max_shard_bytes=200_000) if dist.get_rank() == 0 else None
        for name, tensor in iter_hf_tensors(model, arch):
            writer.add(name, tensor)
        if writer is not None:
            writer.close(config=json.loads((Path(hf_dir) / "config.json").read_text()), side_files_from=hf_dir)
        dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
