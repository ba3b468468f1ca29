"""Moving whole tensors in and out of a model sharded over TP / EP / PP ranks.

Every local parameter is matched to its entry of the conversion table (`convert.mapping`) by
its global name (global layer index, global expert index); Megatron's own parameter
attributes say how it is split over the (expert-)tensor-parallel group. Loading reads one HF
tensor set at a time and keeps this rank's slice; gathering assembles one whole tensor at a
time on rank 0. Memory stays bounded by the few tensors in flight, plus the local shards.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.model.hf_io import CheckpointError, HFCheckpointWriter, open_matching_checkpoint
from dppo_megatron.model.mapping import MEGATRON_LAYER, TensorMap, hf_tensor_names, tensor_map, to_hf, to_megatron

_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


@dataclass
class LocalShard:
    """This rank's piece of one table entry."""

    global_name: str
    param: torch.nn.Parameter
    split_dim: int | None  # dim split over `group`; None when every rank holds it whole
    group: dist.ProcessGroup | None
    rank: int
    size: int
    gated_fc1: bool  # [gate; up] stacked: each half is split on its own

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the unsharded tensor."""
        if self.split_dim is None or self.size == 1:
            return full
        if self.gated_fc1:
            gate, up = full.chunk(2, dim=self.split_dim)
            return torch.cat([gate.chunk(self.size, self.split_dim)[self.rank],
                              up.chunk(self.size, self.split_dim)[self.rank]], dim=self.split_dim)
        return full.chunk(self.size, dim=self.split_dim)[self.rank]

    def assemble(self) -> torch.Tensor:
        """The unsharded tensor from every member of the group (a collective on `group`). Held
        whole by this rank, it is the parameter's own memory, not a copy (the weight sync and the
        export only read it, between steps): read it, never change it."""
        local = self.param.detach().contiguous()
        if self.split_dim is None or self.size == 1:
            return local
        pieces = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(pieces, local, group=self.group)
        if self.gated_fc1:
            halves = [p.chunk(2, dim=self.split_dim) for p in pieces]
            return torch.cat([torch.cat([h[0] for h in halves], self.split_dim),
                              torch.cat([h[1] for h in halves], self.split_dim)], dim=self.split_dim)
        return torch.cat(pieces, dim=self.split_dim)


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def local_shards(model) -> dict[str, LocalShard]:
    """This rank's parameters, keyed by their global table name."""
    from megatron.core import parallel_state as ps

    model = unwrap(model)
    layer_offset = {}
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        for local_index, layer in enumerate(decoder.layers):
            layer_offset[local_index] = layer.layer_number - 1
    ep_rank = ps.get_expert_model_parallel_rank()
    shards = {}
    for name, param in model.named_parameters():
        is_expert = ".mlp.experts." in name
        if is_expert:
            num_local = _num_local_experts(model, name)
            name = _EXPERT.sub(lambda m: f".mlp.experts.local_experts.{ep_rank * num_local + int(m.group(1))}.", name)
            group, rank, size = (ps.get_expert_tensor_parallel_group(), ps.get_expert_tensor_parallel_rank(),
                                 ps.get_expert_tensor_parallel_world_size())
        else:
            group, rank, size = (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(),
                                 ps.get_tensor_model_parallel_world_size())
        name = MEGATRON_LAYER.sub(lambda m: f"decoder.layers.{layer_offset[int(m.group(1))]}.", name)
        if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
            # Tied embeddings under PP: the last stage keeps its own copy of the embedding.
            name = "embedding.word_embeddings.weight"
        split = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        shards[name] = LocalShard(
            global_name=name, param=param, split_dim=split, group=group, rank=rank, size=size,
            gated_fc1=name.endswith("linear_fc1.weight") and model.config.gated_linear_unit,
        )
    return shards


def _num_local_experts(model, param_name: str) -> int:
    layer_index = int(MEGATRON_LAYER.match(param_name).group(1))
    return len(model.decoder.layers[layer_index].mlp.experts.local_experts)


def load_hf_weights(model, arch: Qwen3Arch, hf_dir, *, progress: Callable[[int, int], None] | None = None) -> None:
    """Fill this rank's shards from a Hugging Face checkpoint. Refuses a checkpoint with
    missing or unexpected tensors, listing them."""
    reader = open_matching_checkpoint(hf_dir, arch)
    entries = tensor_map(arch)
    shards = local_shards(model)
    known = {entry.megatron for entry in entries}
    stray = sorted(set(shards) - known)
    if stray:
        raise CheckpointError(f"model parameters with no conversion rule: {', '.join(stray)}")
    with torch.no_grad():
        for done, entry in enumerate(entries, start=1):
            shard = shards.get(entry.megatron)
            if shard is not None:
                full = to_megatron(entry, [reader.get(name) for name in entry.hf], arch)
                shard.param.copy_(shard.take(full))
            if progress is not None:
                progress(done, len(entries))


def gather_full(shards: dict[str, LocalShard], entry: TensorMap, dtype: torch.dtype, device, *,
                everywhere: bool = False) -> torch.Tensor | None:
    """The unsharded tensor of `entry` on global rank 0 (None elsewhere), or with `everywhere`
    on every rank. A collective: every rank calls it for every entry, in the same order."""
    shard = shards.get(entry.megatron)
    full = shard.assemble() if shard is not None else None
    rank, world = dist.get_rank(), dist.get_world_size()
    # The lowest rank holding the whole tensor sends it to rank 0.
    holder = torch.tensor([rank if full is not None else world], device=device)
    dist.all_reduce(holder, op=dist.ReduceOp.MIN)
    source = int(holder.item())
    if source == world:
        raise RuntimeError(f"no rank holds {entry.megatron}")
    if everywhere:
        full = full.to(dtype).contiguous() if rank == source else torch.empty(entry.shape, dtype=dtype, device=device)
        dist.broadcast(full, src=source)
        return full
    if source == 0:
        return full if rank == 0 else None
    if rank == source:
        dist.send(full.to(dtype).contiguous(), dst=0)
    elif rank == 0:
        full = torch.empty(entry.shape, dtype=dtype, device=device)
        dist.recv(full, src=source)
        return full
    return None


def iter_hf_tensors(model, arch: Qwen3Arch, *, experts_from_owners: bool = False, everywhere: bool = False
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF tensor of the model, whole, yielded on global rank 0 (with `everywhere`: on every
    rank, the same tensors in the same order; colocated servers take them from each GPU). With
    `experts_from_owners` (weight sync), experts instead come whole from the rank that holds
    them (its first expert data-parallel replica; expert-TP shards joined within their
    group), so that no expert crosses the network twice. A collective: every rank runs the
    generator to the end, whether or not it yields anything."""
    from megatron.core import parallel_state as ps

    shards = local_shards(model)
    param = next(unwrap(model).parameters())
    sends_experts = ps.get_expert_data_parallel_rank() == 0 and ps.get_expert_tensor_parallel_rank() == 0
    for entry in tensor_map(arch):
        if experts_from_owners and ".mlp.experts." in entry.megatron:
            shard = shards.get(entry.megatron)
            if shard is None:
                continue  # another EP rank's expert, or another pipeline stage's layer
            full = shard.assemble()  # a collective within the expert-TP group
            if sends_experts:
                yield from to_hf(entry, full, arch)
        else:
            full = gather_full(shards, entry, param.dtype, param.device, everywhere=everywhere)
            if full is not None:
                yield from to_hf(entry, full, arch)


def save_hf(model, arch: Qwen3Arch, out, *, config: dict, dtype: torch.dtype, side_files_from=None,
            progress: Callable[[int, int], None] | None = None, manifest: bool = False):
    """Write the model as a Hugging Face checkpoint (sharded safetensors, index, config.json)
    into `out`, atomically, from rank 0 (with a manifest of its files if `manifest`: an export
    that is kept). A collective: every rank calls it. Returns the directory on rank 0, None
    elsewhere."""
    writer = HFCheckpointWriter(out, manifest=manifest) if dist.get_rank() == 0 else None
    total = len(hf_tensor_names(arch))
    for done, (name, tensor) in enumerate(iter_hf_tensors(model, arch), start=1):
        writer.add(name, tensor.to(dtype))
        if progress is not None:
            progress(done, total)
    written = writer.close(config=config, side_files_from=side_files_from) if writer is not None else None
    dist.barrier()
    return written


def sends_weights(arch: Qwen3Arch) -> bool:
    """Whether this rank has tensors to send in `iter_hf_tensors(..., experts_from_owners=True)`."""
    from megatron.core import parallel_state as ps

    if dist.get_rank() == 0:
        return True
    return arch.is_moe and ps.get_expert_data_parallel_rank() == 0 and ps.get_expert_tensor_parallel_rank() == 0
