"""Publishing new weights to rollout servers through a shared directory.

The learner writes each version as a Hugging Face checkpoint (atomically, see
`learner.weights.save_hf`) into `root/v000012/`; `DiskWeightSync.publish` then tells every
server to load it (SGLang's /update_weights_from_disk, with the version as weight_version)
and removes versions older than the last `keep`. The directory must be visible to the
servers (a shared filesystem on clusters).
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dppo_megatron.rollout.protocol import error_message


class WeightSyncError(RuntimeError):
    """A server failed to load a published version."""


class DiskWeightSync:
    def __init__(self, root: str | Path, *, keep: int = 2, timeout: float = 600.0):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.timeout = timeout

    def version_dir(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def publish(self, servers: list[str], version: int) -> None:
        """Make every server load `version_dir(version)`; raises WeightSyncError naming each
        server that failed. Then drop old versions."""
        path = self.version_dir(version)
        if not (path / "config.json").is_file():
            raise WeightSyncError(f"version {version} has not been written: no {path / 'config.json'}")
        body = {"model_path": str(path.resolve()), "weight_version": str(version),
                "flush_cache": True, "abort_all_requests": False}
        with ThreadPoolExecutor(max_workers=max(1, len(servers))) as pool:
            failures = [f for f in pool.map(lambda server: self._update(server, body), servers) if f]
        if failures:
            raise WeightSyncError(f"weight version {version} from {path}: " + "; ".join(failures))
        self._clean(version)

    def _update(self, server: str, body: dict) -> str | None:
        request = urllib.request.Request(server.rstrip("/") + "/update_weights_from_disk",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return f"{server}: {error_message(error.code, error.read().decode(errors='replace'))}"
        except (urllib.error.URLError, OSError) as error:
            return f"{server}: unreachable ({error})"
        if not answer.get("success", False):
            return f"{server}: {answer.get('message', answer)}"
        return None

    def _clean(self, newest: int) -> None:
        versions = sorted(p for p in self.root.glob("v[0-9]*") if p.is_dir() and p.name[1:].isdigit())
        for path in versions:
            if int(path.name[1:]) <= newest - self.keep:
                shutil.rmtree(path, ignore_errors=True)
