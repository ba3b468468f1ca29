"""Rank program: run another rank program's `main` once per argument list, one after another
in the same ranks (each run sets up its own parallel state), so that a test module pays for
the ranks' start (torch, Megatron, transformers imports) once.

argv: SCRIPT RUNS, RUNS a JSON list of argument lists for SCRIPT's main(*args)."""

import importlib.util
import json
import sys
from pathlib import Path

import torch.distributed as dist


def main(script: str, runs: str) -> None:
    sys.path.insert(0, str(Path(script).resolve().parent))
    spec = importlib.util.spec_from_file_location(Path(script).stem, script)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    for args in json.loads(runs):
        worker.main(*args)
        if dist.is_initialized():
            dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
