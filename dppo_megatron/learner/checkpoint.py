"""Learner checkpoints with megatron.core.dist_checkpointing: model, optimizer, learning-rate
schedule, RNG, step and the trainer's own state, loadable at another TP/EP/PP/DP layout.

Layout of a checkpoint root:
    step_00000012/            a complete checkpoint (dist_checkpointing files + ours)
        learner_state.json    step, schedule, layout, the trainer's state
        rng/rank_00000.pt     per-rank RNG (restored only at the same layout)
        hf_config.json        the model's HF config.json (for export)
        manifest.json         every file's size and sha256, written last: a torn checkpoint is found
    step_00000016.partial/    being written; never loaded
    step_00000008.torn/       found torn at a resume (a file missing or cut short): set aside
    latest                    "step_00000012", replaced atomically after the rename
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from dppo_megatron.model import dcp_metadata, manifest

log = logging.getLogger(__name__)

STATE_FILE = "learner_state.json"
HF_CONFIG_FILE = "hf_config.json"  # the model's HF config.json, so that a checkpoint exports alone
# The distributed optimizer's format that reshards across every parallel dimension on load,
# with state keyed by parameter whether or not the expert optimizer is a separate one.
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
LATEST_FILE = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# The signals that ask a run to stop (run/stop.py), and Ctrl-C.
STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}


def _start_checkpoint_writer_deaf_to_stop_signals() -> None:
    """Megatron's checkpoint writer keeps a multiprocessing manager process, spawned at the
    first save, in the run's process group: a stop signal sent to the group (SIGTERM from
    `kill`, `scancel`, a terminal's Ctrl-C) killed it, and the checkpoint of that very stop
    then failed with BrokenPipeError. It is started here with those signals blocked, a mask it
    inherits: the ranks decide when to stop, and it serves them until they exit."""
    from multiprocessing import resource_tracker

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    # Started first: starting it unblocks SIGINT and SIGTERM in this process when it is done.
    resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        filesystem_async._get_write_results_queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def save_checkpoint(root: str | Path, learner, trainer_state: dict | None = None,
                    hf_config: dict | None = None, *, name_step: int | None = None,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Save collectively (every rank calls it). Returns the checkpoint directory, named after
    `name_step` (the trainer's step) or else the learner's optimizer step. `write_extra(dir)`:
    rank 0 adds the trainer's own files, before the checkpoint counts as complete."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / step_dir_name(learner.step if name_step is None else name_step)
    partial = root / (final.name + ".partial")
    rank = dist.get_rank()
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    dist.barrier()
    _start_checkpoint_writer_deaf_to_stop_signals()
    model_state = learner.module.sharded_state_dict()
    dist_checkpointing.save(
        {"model": model_state, "optimizer": learner.optimizer.sharded_state_dict(model_state, metadata=OPTIMIZER_FORMAT)},
        str(partial),
    )
    (partial / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), partial / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        state = {
            "step": learner.step,
            "scheduler": learner.scheduler.state_dict(),
            "layout": _layout_record(learner),
            "trainer": trainer_state or {},
            "manifest": True,  # so that a missing manifest reads as torn, not as a checkpoint from before them
        }
        (partial / STATE_FILE).write_text(json.dumps(state, indent=2))
        if hf_config is not None:
            (partial / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
        if write_extra is not None:
            write_extra(partial)
    dist.barrier()
    _write_manifest_collectively(partial)
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        tmp = root / (LATEST_FILE + ".tmp")
        tmp.write_text(final.name)
        os.replace(tmp, root / LATEST_FILE)
    dist.barrier()
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None. Partial and torn directories never
    count; if `latest` names a missing checkpoint, the newest complete one is used."""
    root = Path(root)
    if not root.is_dir():
        return None
    latest = root / LATEST_FILE
    if latest.is_file():
        candidate = root / latest.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and "." not in p.name and (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def _write_manifest_collectively(directory: Path) -> None:
    """Every rank hashes a slice of the checkpoint's files; rank 0 writes the manifest."""
    names = [manifest.file_names(directory) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(names, src=0)
    mine = manifest.entries(directory, names[0][dist.get_rank()::dist.get_world_size()])
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if dist.get_rank() == 0:
        manifest.write_manifest(directory, {name: e for part in gathered for name, e in part.items()})


def torn_files(path: str | Path, *, share: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with the checkpoint at `path` against its manifest (`share` = (index,
    count): the slice of the files whose sha256 this caller checks; sizes are checked for all),
    [] when whole. A checkpoint from before manifests counts as whole."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        return [f"{STATE_FILE} is missing"]
    except ValueError:
        return [f"{STATE_FILE} is not JSON"]
    if not state.get("manifest") and not manifest.has_manifest(path):
        return []
    return manifest.problems(path, share=share)


def set_aside(path: Path, problems: list[str]) -> str:
    """Rename a torn checkpoint `<name>.torn` (kept for a look, never loaded again); the line
    that says so."""
    aside = path.with_name(path.name + ".torn")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    (path.parent / LATEST_FILE).unlink(missing_ok=True)  # it may name the torn one
    return f"checkpoint {path.name} is torn ({manifest.summary(problems)}): set aside as {aside.name}"


def load_checkpoint(path: str | Path, learner) -> dict:
    """Load collectively into a learner built at any layout. Returns the trainer's state."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    dcp_metadata.check(path)  # torch unpickles it
    _materialize_optimizer_state(learner.optimizer)
    model_state = learner.module.sharded_state_dict()
    optimizer_state = learner.optimizer.sharded_state_dict(model_state, is_loading=True, metadata=OPTIMIZER_FORMAT)
    loaded = dist_checkpointing.load({"model": model_state, "optimizer": optimizer_state}, str(path))
    learner.module.load_state_dict(loaded["model"])
    learner.optimizer.load_state_dict(_optimizer_state_to_load(optimizer_state, loaded["optimizer"]))
    learner.scheduler.load_state_dict(state["scheduler"])
    learner.step = state["step"]
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if state["layout"] == _layout_record(learner) and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))  # tensors only: nothing a file can run
    elif dist.get_rank() == 0:
        log.warning("checkpoint %s was saved at layout %s; RNG states not restored at %s",
                    path, state["layout"], _layout_record(learner))
    return state["trainer"]


def _materialize_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no state, and the distributed optimizer's state_dict needs its
    `step`: give every empty inner optimizer its state with one zero-gradient step. Loading
    then overwrites parameters and state alike."""
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = wrapper.optimizer
        if inner is None or inner.state:
            continue
        params = [p for group in inner.param_groups for p in group["params"] if p.numel() > 0]
        for param in params:
            param.grad = torch.zeros_like(param)
        inner.step()
        inner.zero_grad(set_to_none=True)


def _optimizer_state_to_load(requested, loaded):
    """The optimizer state to load: tensors (keyed by parameter) from the checkpoint, the rest
    (param groups, hyper-parameters) from this optimizer, and Adam's step from the checkpoint.
    Megatron splits expert and dense parameters into two chained optimizers at some layouts
    and not at others, and keeps the non-tensor part per chained optimizer, so that part of
    the checkpoint need not have this run's structure."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    def take_tensors(requested_part, loaded_part):
        if isinstance(requested_part, ShardedBase):
            return loaded_part
        if isinstance(requested_part, dict):
            return {key: take_tensors(value, loaded_part.get(key) if isinstance(loaded_part, dict) else None)
                    for key, value in requested_part.items()}
        if isinstance(requested_part, list):
            return [take_tensors(value, loaded_part[i] if isinstance(loaded_part, list) else None)
                    for i, value in enumerate(requested_part)]
        return requested_part

    state = take_tensors(requested, loaded)
    saved_steps = {group["step"] for group in _param_groups(loaded) if "step" in group}
    if len(saved_steps) > 1:
        raise RuntimeError(f"checkpoint optimizer groups disagree on the step: {sorted(saved_steps)}")
    if saved_steps:
        (step,) = saved_steps
        for group in _param_groups(state):
            group["step"] = step
    return state


def _param_groups(tree) -> list[dict]:
    """Every optimizer param group anywhere in a (nested) optimizer state dict."""
    if isinstance(tree, dict):
        groups = list(tree["param_groups"]) if isinstance(tree.get("param_groups"), list) else []
        return groups + [g for key, value in tree.items() if key != "param_groups" for g in _param_groups(value)]
    if isinstance(tree, list):
        return [g for value in tree for g in _param_groups(value)]
    return []


def _layout_record(learner) -> dict:
    layout = learner.layout
    return {"world_size": dist.get_world_size(), "tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "etp": layout.etp}


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
