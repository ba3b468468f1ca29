"""What a run directory holds, and where.

```
RUN_DIR/recipe.yaml        the resolved recipe the run trains
RUN_DIR/init_model/        the random model of CPU recipes (with its toy tokenizer)
RUN_DIR/data/              the toy task's train/eval files
RUN_DIR/checkpoints/       Megatron checkpoints (step_N/, `latest`)
RUN_DIR/export/            Hugging Face exports (trainer.export_every)
RUN_DIR/weights/           the versions the servers load (rollout.weight_sync: disk)
RUN_DIR/logs/              rollout server logs (the user's alone: SGLang logs its keys)
RUN_DIR/keys.yaml          the servers' API keys, mode 0600 (keys.py)
RUN_DIR/metrics.jsonl      one line of metrics per step (and tensorboard/)
RUN_DIR/status.json        running | stopped | finished | failed, the step, and why (read as killed
                           when its process is gone)
RUN_DIR/STOP               created by a user or a cluster job: checkpoint and exit after this step
```
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, replace
from pathlib import Path

import yaml

from dppo_megatron.config.schema import Recipe
from dppo_megatron.config.validate import random_init_config
from dppo_megatron.keys import KEYS_FILE, make_keys_file

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
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "host": socket.gethostname(), "pid": os.getpid()}
    tmp = run_dir / (STATUS_FILE + ".tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(run_dir / STATUS_FILE)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise


def read_status(run_dir: Path) -> dict | None:
    """status.json, with a "running" run whose process is gone (killed, or its machine lost)
    read as "killed": a SIGKILL leaves no chance to write it."""
    path = Path(run_dir) / STATUS_FILE
    if not path.is_file():
        return None
    status = json.loads(path.read_text())
    if status.get("state") == "running" and status.get("host") == socket.gethostname() and status.get("pid"):
        try:
            os.kill(status["pid"], 0)
        except ProcessLookupError:
            status = dict(status, state="killed",
                          message=f"process {status['pid']} is gone without saying why (SIGKILL, out of memory?)")
        except PermissionError:
            pass  # alive, someone else's
    return status


def new_run_dir(recipe: Recipe, kind: str = "") -> Path:
    """A new `runs/<name>[-<kind>]-<timestamp>` (for a run whose recipe sets no trainer.run_dir)."""
    return Path("runs") / "-".join([recipe.name, *([kind] if kind else []), time.strftime("%Y%m%d-%H%M%S")])


def prepare_run_dir(recipe: Recipe, run_dir: Path) -> None:
    """The resolved recipe, and what a CPU recipe makes for itself: the random model with its
    toy tokenizer, the toy dataset. Made once; a resumed run finds them in place."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if recipe.rollout.api_key_file is None:  # the servers' keys, made once: a resumed run's servers take the same
        make_keys_file(run_dir / KEYS_FILE)
    # SGLang writes its arguments, keys included, into its log: the logs are the user's alone.
    (run_dir / "logs").mkdir(exist_ok=True)
    os.chmod(run_dir / "logs", 0o700)
    (run_dir / RECIPE_FILE).write_text(yaml.safe_dump(asdict(recipe), sort_keys=False))
    if recipe.model.random_init is not None and not (run_dir / INIT_MODEL_DIR / "config.json").is_file():
        make_random_model(recipe, run_dir / INIT_MODEL_DIR)
    toy = recipe.data.generate
    train_path, _ = dataset_paths(recipe, run_dir)
    if toy is not None and not train_path.is_file():
        from dppo_megatron.data.toy import write_toy_dataset

        write_toy_dataset(train_path.parent, task=toy.task, digits=toy.digits, train_rows=toy.train_rows,
                          eval_rows=toy.eval_rows, seed=recipe.trainer.seed)


def make_random_model(recipe: Recipe, directory: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from dppo_megatron.data.toy import build_toy_tokenizer

    fields = random_init_config(recipe)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(recipe.trainer.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    partial = directory.with_name(directory.name + ".partial")
    model.save_pretrained(partial)
    build_toy_tokenizer(partial)
    GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id).save_pretrained(partial)
    partial.replace(directory)


def with_run_dir(recipe: Recipe, run_dir: Path) -> Recipe:
    """The recipe as the run in `run_dir` records it (trainer.run_dir set)."""
    return replace(recipe, trainer=replace(recipe.trainer, run_dir=str(run_dir)))
