"""What a run directory holds, and where.

```
RUN_DIR/recipe.yaml        the resolved recipe the run trains
RUN_DIR/init_model/        the random model of CPU recipes (with its toy tokenizer)
RUN_DIR/data/              the toy task's train/eval files
RUN_DIR/checkpoints/       Megatron checkpoints (step_N/, `latest`)
RUN_DIR/logs/              rollout server logs
RUN_DIR/status.json        running | stopped | finished | failed, the step, and why
RUN_DIR/STOP               created by a user or a cluster job: checkpoint and exit after this step
```
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config imports this module
    from dppo_megatron.config.schema import Recipe


RECIPE_FILE = "recipe.yaml"
INIT_MODEL_DIR = "init_model"
STATUS_FILE = "status.json"
STOP_FILE = "STOP"
STATES = ("running", "stopped", "finished", "failed")


def model_dir(recipe: Recipe, run_dir: Path) -> Path:
    """The initial weights: the recipe's checkpoint, or the random model made for this run."""
    return Path(recipe.model.path) if recipe.model.path else run_dir / INIT_MODEL_DIR


def tokenizer_dir(recipe: Recipe, run_dir: Path) -> str:
    if recipe.model.tokenizer and recipe.model.tokenizer != "toy-digits":
        return recipe.model.tokenizer
    return str(model_dir(recipe, run_dir))


def dataset_paths(recipe: Recipe, run_dir: Path) -> tuple[Path, Path | None]:
    if recipe.data.generate is not None:
        return run_dir / "data" / "train.jsonl", run_dir / "data" / "eval.jsonl"
    return Path(recipe.data.train), Path(recipe.data.eval) if recipe.data.eval else None


def write_status(run_dir: Path, state: str, step: int, total_steps: int, message: str = "") -> None:
    """Atomically: a reader (a cluster job's script, a user's `cat`) never sees half a file."""
    if state not in STATES:
        raise ValueError(f"unknown run state {state!r}; one of {STATES}")
    record = {"state": state, "step": step, "total_steps": total_steps, "message": message,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    tmp = run_dir / (STATUS_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(run_dir / STATUS_FILE)


def read_status(run_dir: Path) -> dict | None:
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    """`python -m dppo_megatron.run_dir RUN_DIR`: the run's status as shell variables, for job
    scripts (RUN_STATE is `unknown` before the trainer has written any)."""
    import shlex
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m dppo_megatron.run_dir RUN_DIR", file=sys.stderr)
        return 2
    status = read_status(Path(argv[0])) or {"state": "unknown", "step": 0, "total_steps": 0, "message": ""}
    for name in ("state", "step", "total_steps", "message"):
        print(f"RUN_{name.upper()}={shlex.quote(str(status[name]))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
