"""`convert mcore-to-hf` without building the model: one process reads the checkpoint's sharded
tensors directly and writes size-bounded safetensors shards as it goes.

A Megatron distributed checkpoint (torch.distributed.checkpoint files under dist_checkpointing)
stores every model tensor as one global tensor, whatever the layout it was saved at: its chunks
are the ranks' shards, and the global tensor is the unsharded one of the conversion table (the
layout of a TP=1 model). Reading a key therefore merges its TP / EP / ETP / PP shards, and only
its own bytes are read. The names differ from the model's parameter names in two ways, both
Megatron's own so that checkpoints of the local and the TransformerEngine layer specs match:
the layer norms before attention and MLP are saved under the fused layer's name, and a layer's
experts are saved stacked in one [experts, ...] tensor. When every layer has the same tensors,
Megatron also stacks the layers: `decoder.layers.X` is then one [layers, ...] tensor whose
chunks are single layers. Reads ask for regions (one layer of such a tensor), so memory is
bounded by one layer's tensors (its experts, for a MoE layer) plus one output shard; the
optimizer state is never read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from dppo_megatron.model import dcp_metadata
from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.model.hf_io import CheckpointError, HFCheckpointWriter
from dppo_megatron.model.mapping import MEGATRON_LAYER, TensorMap, hf_tensor_names, tensor_map, to_hf

_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)local_experts\.(\d+)\.(.+)$")
# The model's name -> the name the checkpoint keeps it under.
_SAVED_AS = (
    (re.compile(r"\.input_layernorm\.weight$"), ".self_attention.linear_qkv.layer_norm_weight"),
    (re.compile(r"\.pre_mlp_layernorm\.weight$"), ".mlp.linear_fc1.layer_norm_weight"),
)


def saved_name(name: str) -> tuple[str, int | None]:
    """The name a table entry's tensor is saved under, per layer: (name, expert index in it or None)."""
    expert = _EXPERT.match(name)
    if expert is not None:
        return f"{expert.group(1)}experts.{expert.group(3)}", int(expert.group(2))
    for pattern, replacement in _SAVED_AS:
        name = pattern.sub(replacement, name)
    return name, None


class ShardedCheckpointReader:
    """Regions of the tensors of a Megatron distributed checkpoint, read in one process."""

    def __init__(self, path: str | Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.path = Path(path)
        dcp_metadata.check(self.path)  # torch unpickles it
        self.reader = FileSystemReader(str(self.path))
        metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(metadata, is_coordinator=True)
        self.metadata = metadata.state_dict_metadata

    def locate(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(checkpoint key, leading indices into it) of a per-layer name: the key itself, or the
        layers' stacked key and the layer's index."""
        if name in self.metadata:
            return name, ()
        layer = MEGATRON_LAYER.match(name)
        if layer is not None:
            stacked = "decoder.layers." + name[layer.end():]
            if stacked in self.metadata:
                return stacked, (int(layer.group(1)),)
        raise CheckpointError(f"{self.path}: no tensor {name!r} in the checkpoint (nor stacked over layers); "
                              "is it a checkpoint of the model its config describes?")

    def read(self, regions: list[tuple[str, tuple[int, ...]]]) -> dict[tuple[str, tuple[int, ...]], torch.Tensor]:
        """The tensors at (key, leading indices), distinct keys, reading only the bytes of the
        stored chunks that overlap them."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        if len({key for key, _ in regions}) != len(regions):
            raise ValueError("one region per checkpoint key and read")
        targets, items = {}, []
        for key, index in regions:
            meta = self.metadata[key]
            if not hasattr(meta, "chunks"):
                raise CheckpointError(f"{self.path}: {key!r} is not a tensor")
            shape = tuple(meta.size)
            offsets, sizes = (*index, *[0] * (len(shape) - len(index))), (*[1] * len(index), *shape[len(index):])
            targets[key] = torch.empty(sizes, dtype=meta.properties.dtype)
            region = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            items += create_read_items_for_chunk_list(key, meta, [region])
        self.reader.read_data(LoadPlan(items), _Into(targets)).wait()
        return {(key, index): targets[key].reshape(targets[key].shape[len(index):]) for key, index in regions}


class _Into:
    """The part of torch.distributed.checkpoint's LoadPlanner that a storage reader calls: where
    each read lands."""

    def __init__(self, targets: dict[str, torch.Tensor]):
        self.targets = targets

    def resolve_tensor(self, item) -> torch.Tensor:
        tensor = self.targets[item.dest_index.fqn]  # dest_offsets are relative to the region
        for dim, (offset, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            tensor = tensor.narrow(dim, offset, length)
        return tensor

    def commit_tensor(self, item, tensor: torch.Tensor) -> None:
        pass  # written in place


def _layer_groups(entries: list[TensorMap]) -> Iterator[list[TensorMap]]:
    """The table's entries, one group per decoder layer (and one for each tensor outside)."""
    group, layer = [], None
    for entry in entries:
        match = MEGATRON_LAYER.match(entry.megatron)
        this = int(match.group(1)) if match else None
        if group and (this is None or this != layer):
            yield group
            group = []
        group.append(entry)
        layer = this
    if group:
        yield group


def iter_checkpoint_hf_tensors(path: str | Path, arch: Qwen3Arch) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF tensor of the model in the checkpoint at `path`, in the table's order, reading one
    layer's tensors at a time."""
    reader = ShardedCheckpointReader(path)
    for group in _layer_groups(tensor_map(arch)):
        places = []
        for entry in group:
            name, expert = saved_name(entry.megatron)
            places.append((reader.locate(name), expert))
        tensors = reader.read(list(dict.fromkeys(region for region, _ in places)))
        for entry, (region, expert) in zip(group, places):
            tensor = tensors[region] if expert is None else tensors[region][expert]
            if tuple(tensor.shape) != entry.shape:
                raise CheckpointError(f"{path}: {region[0]} holds shape {tuple(tensor.shape)} for {entry.megatron}, "
                                      f"expected {entry.shape}: the config does not describe this checkpoint")
            for name, part in to_hf(entry, tensor, arch):
                yield name, part.clone()  # its own storage: the layer's tensors can go
        del tensors


def export_checkpoint(path: str | Path, out: str | Path, arch: Qwen3Arch, *, config: dict, dtype: torch.dtype,
                      side_files_from: str | Path | None = None, max_shard_bytes: int = 2 * 1024**3,
                      progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the checkpoint at `path` as a Hugging Face checkpoint into `out` (atomically)."""
    writer = HFCheckpointWriter(out, max_shard_bytes=max_shard_bytes, spool=True, manifest=True)
    total = len(hf_tensor_names(arch))
    for done, (name, tensor) in enumerate(iter_checkpoint_hf_tensors(path, arch), start=1):
        writer.add(name, tensor.to(dtype))
        if progress is not None:
            progress(done, total)
    return writer.close(config=config, side_files_from=side_files_from)
