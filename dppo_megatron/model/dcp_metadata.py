"""A checkpoint's `.metadata` (torch.distributed.checkpoint's index of the shards) is a pickle,
which torch reads with `pickle.load`: a tampered one could run any code on every rank. Before
torch reads it, `check` unpickles it with only the globals torch writes there (its checkpoint
metadata classes, torch.Size, dtypes, layouts); anything else is refused, naming it, before
it runs."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from dppo_megatron.model.hf_io import CheckpointError

METADATA_FILE = ".metadata"
CHECKPOINT_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                      "torch.distributed.checkpoint.filesystem")
ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
           ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in CHECKPOINT_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type):  # its dataclasses and enums, no function
                return found
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which torch does not write there")


def check(checkpoint: str | Path) -> None:
    """Refuse a checkpoint whose `.metadata` names anything but torch's own metadata types."""
    path = Path(checkpoint) / METADATA_FILE
    if not path.is_file():
        return  # torch then says what is missing
    try:
        _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path} is refused: {error} (a tampered or foreign file; it was not run)") from None
