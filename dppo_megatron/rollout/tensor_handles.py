"""Weights passed to a server by handle, as SGLang's /update_weights_from_tensor takes them.

Each server TP rank's payload is the base64 of a pickle (torch's ForkingPickler: SGLang's
MultiprocessingSerializer) of a flattened bucket: {"flattened_tensor": uint8 tensor, "metadata":
[one record per tensor: name, shape, dtype, start_idx, end_idx, numel (bytes)]}, SGLang's
load_format "flattened_bucket". The tensor travels as a handle to memory the sender keeps until
the server has answered: a CUDA IPC handle on a GPU (its device named by UUID, as SGLang's
patched reductions expect, since the server sees other device indices), a named shared-memory
segment of this machine on a CPU. The HTTP body carries handles, never the bytes.

The metadata records are SimpleNamespaces: SGLang reads their fields by attribute, and its safe
unpickler admits them, where the learner cannot import SGLang's own FlattenedTensorMetadata.
`read_payload` (the embedded engine) unpickles with only what such a payload needs allowed, so a
request body cannot run code, as SGLang's SafeUnpickler.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import pickle
import sys
import types
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing as torch_mp
from torch.multiprocessing import reductions

LOAD_FORMAT = "flattened_bucket"
_CUDA_DEVICE_ARG = 6  # the device index among rebuild_cuda_tensor's arguments (SGLang's patch_torch)


class PayloadError(ValueError):
    """A payload that is not a flattened bucket of tensor handles."""


class BucketMemory:
    """Where buckets are made. On a CPU one segment of shared memory, reused bucket after bucket
    and version after version (a receiver has copied a bucket before it answers), so that its
    pages are faulted in once, not for every bucket; on a GPU a fresh tensor for each (there a
    receiver's copy may still run on its own stream when it answers; torch's CUDA IPC counts the
    holders of a fresh one)."""

    def __init__(self):
        self.segment: torch.Tensor | None = None

    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        if self.segment is None or self.segment.numel() < nbytes:
            self.segment = None  # the old one goes before the new one is made
            segment = torch.empty(nbytes, dtype=torch.uint8)
            with _shared_by_name():
                segment.share_memory_()
            self.segment = segment
        return self.segment[:nbytes]


def in_buckets(named_tensors, bucket_bytes: int):
    """(name, tensor) pairs in lists of about `bucket_bytes` (a list closes at the tensor that
    reaches it)."""
    bucket, size = [], 0
    for name, tensor in named_tensors:
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def aligned_order(bucket: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The order of a flattened bucket: wider dtypes first, so that every tensor starts at a
    multiple of its own size, which SGLang's receiver requires."""
    return sorted(bucket, key=lambda item: -item[1].element_size())


def shared_bucket(named_tensors: list[tuple[str, torch.Tensor]], memory: BucketMemory | None = None
                  ) -> tuple[torch.Tensor, list]:
    """The tensors back to back in one uint8 tensor that can be shared (on a CPU: in shared
    memory, `memory`'s segment where given, so that handing it over copies nothing more), wider
    dtypes first so that each starts aligned to its own size; and the metadata records, in that
    order."""
    ordered = aligned_order(named_tensors)
    total = sum(tensor.numel() * tensor.element_size() for _, tensor in ordered)
    device = ordered[0][1].device if ordered else torch.device("cpu")
    flat = (memory or BucketMemory()).take(total, device)
    metadata, start = [], 0
    for name, tensor in ordered:
        size = tensor.numel() * tensor.element_size()
        flat[start:start + size].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
        metadata.append(types.SimpleNamespace(name=name, shape=torch.Size(tensor.shape), dtype=tensor.dtype,
                                              start_idx=start, end_idx=start + size, numel=size))
        start += size
    return flat, metadata


def bucket_payload(flat: torch.Tensor, metadata: list) -> str:
    """One TP rank's payload: base64 of the pickled bucket, its tensor a handle. The sender keeps
    `flat` until the server has answered. A payload is for one receiver: each pickling lends the
    segment once (torch counts who holds it, and frees it when the last lets go), so a second
    receiver of the same payload may find it gone: make one per receiving TP rank."""
    buffer = io.BytesIO()
    with _shared_by_name():
        _HandlePickler(buffer).dump({"flattened_tensor": flat, "metadata": metadata})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@contextlib.contextmanager
def _shared_by_name():
    """CPU storages shared as named segments (torch's file_system strategy), which any process of
    this machine can open; torch's default passes a file descriptor that only a process it
    started can receive."""
    before = torch_mp.get_sharing_strategy()
    torch_mp.set_sharing_strategy("file_system")
    try:
        _start_segment_manager()
        yield
    finally:
        torch_mp.set_sharing_strategy(before)


_manager_started = False


def _start_segment_manager() -> None:
    """Start torch's segment manager (torch_shm_manager: it frees the segments once no process
    holds them) with its output on /dev/null. It is started by the first segment and outlives
    this process while a server holds one: with this process's stdout and stderr it would keep
    the pipes of whoever reads them (a launcher, a test) open after the process is gone."""
    global _manager_started
    if _manager_started:
        return
    saved = [os.dup(1), os.dup(2)]
    quiet = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(quiet, 1), os.dup2(quiet, 2)
        torch.empty(1).share_memory_()
        _manager_started = True
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for descriptor in (*saved, quiet):
            os.close(descriptor)


class _HandlePickler(ForkingPickler):
    """ForkingPickler, with CUDA tensors' devices named by UUID (as SGLang's
    `monkey_patch_torch_reductions` does on the sender's side)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dispatch_table[torch.Tensor] = _reduce_tensor


def _reduce_tensor(tensor: torch.Tensor):
    rebuild, args = reductions.reduce_tensor(tensor)
    if tensor.is_cuda:
        uuid = str(torch.cuda.get_device_properties(args[_CUDA_DEVICE_ARG]).uuid)
        args = (*args[:_CUDA_DEVICE_ARG], uuid, *args[_CUDA_DEVICE_ARG + 1:])
    return rebuild, args


# What a CPU payload of this module holds, and nothing else: containers, torch's dtypes and
# sizes, and torch's functions that open a shared-memory segment by name.
_ALLOWED = {
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("types", "SimpleNamespace"),
    ("torch", "Size"), ("torch", "Tensor"), ("torch", "UntypedStorage"), ("torch.storage", "UntypedStorage"),
    ("torch.multiprocessing.reductions", "rebuild_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
    ("torch.multiprocessing.reductions", "rebuild_storage_filename"),
    ("torch.multiprocessing.reductions", "rebuild_storage_empty"),
}


class _PayloadUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise PayloadError(f"a tensor payload may not load {module}.{name}")


def read_payload(payload: str, load_format: str | None = LOAD_FORMAT) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of one TP rank's payload, views of the sender's shared memory
    (copy them before the sender may free it: once the server has answered). `load_format`:
    "flattened_bucket", or None for a plain list of (name, tensor) pairs, as SGLang reads them."""
    if load_format not in (LOAD_FORMAT, None):
        raise PayloadError(f"load_format {load_format!r}: this engine reads flattened_bucket or none")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError, TypeError) as error:
        raise PayloadError(f"a payload is base64 text: {error}") from None
    try:
        bucket = _PayloadUnpickler(io.BytesIO(raw)).load()
    except PayloadError:
        raise
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, TypeError, ValueError) as error:
        raise PayloadError(f"the payload's tensors could not be opened: {type(error).__name__}: {error}") from None
    if load_format is None:
        if not (isinstance(bucket, list) and all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                                                 and isinstance(item[1], torch.Tensor) for item in bucket)):
            raise PayloadError("a payload without load_format is a list of (name, tensor) pairs")
        return bucket
    if not (isinstance(bucket, dict) and isinstance(bucket.get("flattened_tensor"), torch.Tensor)
            and isinstance(bucket.get("metadata"), list)):
        raise PayloadError('a payload is a flattened bucket: {"flattened_tensor": tensor, "metadata": [...]}')
    flat = bucket["flattened_tensor"]
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise PayloadError(f"the flattened tensor is 1-d uint8, got {flat.dtype} of shape {list(flat.shape)}")
    tensors = []
    for meta in bucket["metadata"]:
        try:
            start, end, dtype, shape = int(meta.start_idx), int(meta.end_idx), meta.dtype, torch.Size(meta.shape)
        except (AttributeError, TypeError, ValueError) as error:
            raise PayloadError(f"a metadata record has name, shape, dtype, start_idx, end_idx: {error}") from None
        if not isinstance(dtype, torch.dtype):
            raise PayloadError(f"{meta.name}: dtype {dtype!r} is not a torch dtype")
        if not (0 <= start <= end <= flat.numel()) or end - start != shape.numel() * dtype.itemsize \
                or start % dtype.itemsize:
            raise PayloadError(f"{meta.name}: bytes {start}..{end} do not hold an aligned {dtype} of shape "
                               f"{list(shape)} inside the bucket's {flat.numel()}")
        tensors.append((meta.name, flat[start:end].view(dtype).reshape(shape)))
    return tensors
