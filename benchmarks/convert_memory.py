"""Peak memory of `convert mcore-to-hf`: the streaming export (one process, one layer at a time)
against the old path (build the model at the checkpoint's layout on its ranks, gather every
tensor on rank 0), side by side, for checkpoints saved at TP=2+EP=2 and at PP=2, at two model
sizes, with the outputs compared tensor by tensor.

    python benchmarks/convert_memory.py                 # two Qwen3-MoE sizes, float32
    python benchmarks/convert_memory.py --sizes small   # quick

Memory is each process's peak RSS during the export (sampled every 2 ms) above what it held
once its imports were done (the interpreter, torch and torch.distributed.checkpoint; Megatron
too for the old path, which needs it); the old path's is summed over its ranks, since one
machine holds them all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

SIZES = {  # Qwen3-MoE shapes: name -> (hidden, layers, experts, expert ffn)
    "small": (256, 4, 16, 256),
    "large": (512, 8, 32, 512),
}


def make_model(directory: Path, hidden: int, layers: int, experts: int, ffn: int) -> int:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=4096, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=hidden // 8, intermediate_size=4 * hidden,
                            moe_intermediate_size=ffn, num_experts=experts, num_experts_per_tok=2,
                            max_position_embeddings=512, tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(config)
    model.save_pretrained(directory)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def child(mode: str, checkpoint: str, out: str, report: str, layout: str) -> None:
    """One measured process (a rank of the old path, or the whole streaming export)."""
    import psutil
    import torch.distributed as dist

    from dppo_megatron.convert.checkpoints import mcore_to_hf, mcore_to_hf_via_model
    from dppo_megatron.model.layout import ParallelLayout

    # What each path imports before it starts: the stream torch.distributed.checkpoint, the old
    # path Megatron as well.
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.checkpoint.planner_helpers  # noqa: F401

    if mode != "stream":
        import megatron.core.dist_checkpointing  # noqa: F401
        import megatron.core.models.gpt  # noqa: F401

    process = psutil.Process()
    started = peak = process.memory_info().rss // 1024
    done = threading.Event()

    def sample() -> None:  # the peak of the work itself (ru_maxrss keeps import-time peaks)
        nonlocal peak
        while not done.wait(0.002):
            peak = max(peak, process.memory_info().rss // 1024)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tic = time.perf_counter()
    if mode == "stream":
        mcore_to_hf(checkpoint, out, None)
    else:
        tp, ep, pp = (int(x) for x in layout.split(","))
        mcore_to_hf_via_model(checkpoint, out, None, ParallelLayout(tp=tp, ep=ep, pp=pp))
    done.set()
    sampler.join()
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(f"{report}.{rank}").write_text(json.dumps({"start_kib": started, "peak_kib": peak,
                                                    "seconds": time.perf_counter() - tic}))
    if dist.is_initialized():
        dist.destroy_process_group()


def measure(mode: str, checkpoint: Path, out: Path, layout: tuple[int, int, int]) -> dict:
    report = out.with_suffix(".report")
    script = [__file__, "--child", mode, str(checkpoint), str(out), str(report), ",".join(map(str, layout))]
    ranks = 1 if mode == "stream" else max(layout[0] * layout[2], layout[1] * layout[2])
    if mode == "stream":
        run([sys.executable, *script])
    else:
        from dppo_megatron.processes import free_port

        run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
             f"--master_port={free_port()}", *script])
    reports = [json.loads(Path(f"{report}.{rank}").read_text()) for rank in range(ranks)]
    return {"extra_mib": sum(r["peak_kib"] - r["start_kib"] for r in reports) / 1024,
            "seconds": max(r["seconds"] for r in reports), "ranks": ranks}


def same_tensors(a: Path, b: Path) -> bool:
    from dppo_megatron.model.hf_io import HFCheckpointReader

    left, right = HFCheckpointReader(a), HFCheckpointReader(b)
    return sorted(left.names()) == sorted(right.names()) and all(
        torch.equal(left.get(n), right.get(n)) for n in left.names())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    exe = [sys.executable, "-m", "dppo_megatron", "convert"]
    print(f"convert mcore-to-hf memory: Qwen3-MoE float32, {platform.machine()} CPU, {os.cpu_count()} cores, "
          f"torch {torch.__version__}")
    print("| model | weights MiB | saved at | old path extra MiB (ranks) | stream extra MiB | stream / weights | "
          "old s | stream s | outputs identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    root = Path(tempfile.mkdtemp(prefix="convert-memory-"))
    try:
        for size in args.sizes:
            hidden, layers, experts, ffn = SIZES[size]
            hf = root / size / "hf"
            weights = make_model(hf, hidden, layers, experts, ffn) / 2**20
            for name, layout in (("TP2+EP2", (2, 2, 1)), ("PP2", (1, 1, 2))):
                checkpoint = root / size / f"mcore-{name}"
                tp, ep, pp = layout
                run([*exe, "hf-to-mcore", "--hf-dir", str(hf), "--out", str(checkpoint), "--tp", str(tp),
                     "--ep", str(ep), "--pp", str(pp)])
                old = measure("model", checkpoint, root / size / f"old-{name}", layout)
                new = measure("stream", checkpoint, root / size / f"new-{name}", layout)
                identical = (same_tensors(root / size / f"old-{name}", root / size / f"new-{name}")
                             and same_tensors(hf, root / size / f"new-{name}"))
                print(f"| {size} | {weights:.0f} | {name} | {old['extra_mib']:.0f} ({old['ranks']}) | "
                      f"{new['extra_mib']:.0f} | {new['extra_mib'] / weights:.2f} | {old['seconds']:.1f} | "
                      f"{new['seconds']:.1f} | {'yes' if identical else 'NO'} |", flush=True)
                shutil.rmtree(checkpoint)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
