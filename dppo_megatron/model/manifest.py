"""A checkpoint's manifest: every file's size and sha256, written last, so that a checkpoint torn
by a lost node, a full disk or a cut copy is found before anything reads it.

Hashing a large checkpoint is shared: `entries(directory, names)` hashes the files it is given,
so each rank of a run can hash a slice and rank 0 write the union.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_FILE = "manifest.json"
_CHUNK = 16 * 1024 * 1024


def file_names(directory: str | Path) -> list[str]:
    """Every file under `directory` (relative, sorted), the manifest itself left out."""
    directory = Path(directory)
    return sorted(str(f.relative_to(directory)) for f in directory.rglob("*")
                  if f.is_file() and f.name != MANIFEST_FILE)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def entries(directory: str | Path, names: list[str]) -> dict[str, dict]:
    directory = Path(directory)
    return {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)}
            for name in names}


def write_manifest(directory: str | Path, files: dict[str, dict] | None = None) -> None:
    """Write `files` (from `entries`; all of the directory's when None) as the manifest, through a
    temporary name so that a manifest is never half there."""
    directory = Path(directory)
    files = entries(directory, file_names(directory)) if files is None else files
    tmp = directory / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps({"files": dict(sorted(files.items()))}, indent=1))
    tmp.replace(directory / MANIFEST_FILE)


def has_manifest(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST_FILE).is_file()


def problems(directory: str | Path, *, share: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with `directory` against its manifest: a line for each file missing, of
    another size, or (for this caller's `share` = (index, count) of the files) of another
    sha256 than was written; [] when whole. No manifest: one line saying so."""
    directory = Path(directory)
    try:
        written = json.loads((directory / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return [f"{MANIFEST_FILE} is missing"]
    except (ValueError, KeyError, TypeError):
        return [f"{MANIFEST_FILE} is not a manifest"]
    index, count = share
    found = []
    for position, (name, entry) in enumerate(sorted(written.items())):
        path = directory / name
        if not path.is_file():
            found.append(f"{name} is missing")
        elif (size := path.stat().st_size) != entry["bytes"]:
            found.append(f"{name} is {size} bytes, {entry['bytes']} were written")
        elif position % count == index and sha256_of(path) != entry["sha256"]:
            found.append(f"{name} has changed since it was written (sha256)")
    return found


def check(directory: str | Path, what: str = "checkpoint") -> None:
    """Raise ValueError naming the first bad files of `directory`, if its manifest says it is torn.
    A directory written before manifests existed passes."""
    if not has_manifest(directory):
        return
    if found := problems(directory):
        raise ValueError(f"{what} {directory} is torn: {summary(found)}")


def summary(found: list[str], limit: int = 3) -> str:
    more = f"; {len(found) - limit} more" if len(found) > limit else ""
    return "; ".join(found[:limit]) + more
