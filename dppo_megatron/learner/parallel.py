"""Starting a learner rank's parallel state: torch.distributed, then Megatron's groups and RNG, for
a `ParallelLayout` (model/layout.py) checked first."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.model.layout import ParallelLayout


def init_parallel(layout: ParallelLayout, arch: Qwen3Arch, *, seed: int = 1234) -> None:
    """Start torch.distributed (gloo without CUDA, NCCL with it) from the launcher's
    environment (torchrun or srun), then Megatron's parallel state and RNG."""
    from megatron.core import parallel_state, tensor_parallel

    from dppo_megatron.learner.cpu_bridge import apply_cpu_bridge, apply_torch_adam_checkpoint_fix

    on_gpu = torch.cuda.is_available()
    if not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if on_gpu else "gloo")
    layout.validate(dist.get_world_size(), arch)
    if not on_gpu:
        apply_cpu_bridge()
    apply_torch_adam_checkpoint_fix()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
