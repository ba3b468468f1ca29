"""Reading and writing Hugging Face safetensors checkpoints tensor by tensor."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dppo_megatron.model.manifest import write_manifest

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files that travel with the weights when a checkpoint is exported.
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)


class CheckpointError(ValueError):
    """A Hugging Face checkpoint directory that is missing something or holds something else."""


class HFCheckpointReader:
    """Tensors of a single-file or sharded (index.json) safetensors checkpoint, read one at a
    time so that memory stays bounded by the tensors in use."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.directory / SINGLE_NAME).is_file():
            with safe_open(self.directory / SINGLE_NAME, "pt") as f:
                weight_map = {name: SINGLE_NAME for name in f.keys()}
        else:
            raise CheckpointError(f"{self.directory}: no {SINGLE_NAME} or {INDEX_NAME}")
        self.weight_map: dict[str, str] = weight_map
        self._open: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        try:
            filename = self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is missing") from None
        if filename not in self._open:
            self._open[filename] = safe_open(self.directory / filename, "pt")
        return self._open[filename].get_tensor(name)


def open_matching_checkpoint(directory: str | Path, arch) -> HFCheckpointReader:
    """A reader for `directory`, after checking that it holds exactly the tensors the
    architecture needs; the error lists what is missing and what is unexpected."""
    from dppo_megatron.model.mapping import hf_tensor_names

    reader = HFCheckpointReader(directory)
    expected, present = set(hf_tensor_names(arch)), set(reader.names())
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory} does not match its {arch.architecture} config: "
            f"missing {_listing(missing)}; unexpected {_listing(unexpected)}"
        )
    return reader


def _listing(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return f"{len(names)} ({shown}{', ...' if len(names) > limit else ''})"


def _file_mode() -> int:
    """The mode a new file gets here (0644 under the usual umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# safetensors' names of the dtypes a checkpoint holds
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class _SpooledShard:
    """A safetensors file written as its tensors arrive: their bytes go to a data file at once,
    and `finish` writes the header (which needs every tensor's place) and then the data, copied
    in blocks. Memory holds one tensor at a time, not the shard."""

    def __init__(self, data_path: Path):
        self.data_path = data_path
        self.data = data_path.open("wb")
        self.header: dict = {"__metadata__": {"format": "pt"}}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        self.header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [self.size, self.size + len(raw)]}
        self.data.write(raw)
        self.size += len(raw)

    def finish(self, path: Path) -> None:
        self.data.close()
        header = json.dumps(self.header, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
        with path.open("wb") as out, self.data_path.open("rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 16 * 1024**2)
        self.data_path.unlink()


class HFCheckpointWriter:
    """Writes tensors into size-bounded safetensors shards, then the index. Everything goes
    into a temporary directory renamed into place at `close()`, so a reader never sees a
    half-written checkpoint. `spool`: write each tensor to disk as it comes (memory bounded by
    one tensor rather than one shard, for exports of large models; the shard's bytes are
    written twice)."""

    def __init__(self, directory: str | Path, *, max_shard_bytes: int = 2 * 1024**3, spool: bool = False,
                 manifest: bool = False):
        self.directory = Path(directory)
        self.partial = self.directory.with_name(self.directory.name + ".partial")
        self.manifest = manifest  # sizes and sha256 of every file, for a checkpoint that is kept
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        self.max_shard_bytes = max_shard_bytes
        self.spool = spool
        self.spooled: _SpooledShard | None = None
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor] | list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        tensor = tensor.detach().cpu().contiguous()
        if self.spool:
            if self.spooled is None:
                self.spooled = _SpooledShard(self.partial / f"model-{len(self.shards) + 1:05d}.data")
            self.spooled.add(name, tensor)
            tensor = None  # its name stands in the pending list; its bytes are on disk
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        number = len(self.shards) + 1
        path = self.partial / f"model-{number:05d}.safetensors"
        if self.spool:
            (self.spooled or _SpooledShard(self.partial / f"model-{number:05d}.data")).finish(path)
            self.spooled = None
        else:
            save_file(self.pending, path, metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self, *, config: dict, side_files_from: str | Path | None = None) -> Path:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        weight_map = {}
        mode = _file_mode()
        for number, names in enumerate(self.shards, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(self.partial / f"model-{number:05d}.safetensors", self.partial / final)
            os.chmod(self.partial / final, mode)  # safetensors writes 0600; the rest of the checkpoint is 0644
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.partial / INDEX_NAME).write_text(json.dumps(index, indent=2))
        (self.partial / "config.json").write_text(json.dumps(config, indent=2))
        if side_files_from is not None:
            for name in SIDE_FILES:
                source = Path(side_files_from) / name
                if source.is_file():
                    shutil.copy2(source, self.partial / name)
        if self.manifest:
            write_manifest(self.partial)
        if self.directory.exists():
            shutil.rmtree(self.directory)
        os.replace(self.partial, self.directory)
        return self.directory
