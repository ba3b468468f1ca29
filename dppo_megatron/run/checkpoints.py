"""When and what a run saves, in one place: a resumable checkpoint every `save_every` steps, on a
stop and at the end (the newest `keep` kept), and a Hugging Face export every `export_every`
steps and at the end. A run starts from its newest checkpoint, else from the initial weights."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from dppo_megatron.learner.checkpoint import (latest_checkpoint, load_checkpoint, save_checkpoint, set_aside,
                                               step_dir_name, torn_files)
from dppo_megatron.learner.learner import Learner
from dppo_megatron.learner.weights import load_hf_weights, save_hf
from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.model.hf_io import CheckpointError
from dppo_megatron.model.manifest import summary
from dppo_megatron.processes import say

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"


def latest_in_run(run_dir: Path) -> Path | None:
    """The run's newest complete checkpoint, or None."""
    return latest_checkpoint(Path(run_dir) / CHECKPOINTS_DIR)


class CheckpointManager:
    def __init__(self, run_dir: Path, learner: Learner, arch: Qwen3Arch, *, initial_model: Path, total_steps: int,
                 save_every: int, keep: int, export_every: int, save_at_end: bool = True):
        """`initial_model`: the Hugging Face checkpoint a new run starts from (its config.json
        and side files go into every checkpoint and export)."""
        self.root, self.export_root = run_dir / CHECKPOINTS_DIR, run_dir / EXPORT_DIR
        self.learner, self.arch, self.initial_model = learner, arch, initial_model
        self.hf_config = json.loads((initial_model / "config.json").read_text())
        self.total_steps, self.save_every, self.keep, self.export_every = total_steps, save_every, keep, export_every
        self.save_at_end = save_at_end
        self.saved_at = 0  # the step of the newest checkpoint
        self.resumed_from: Path | None = None

    def resume(self) -> int:
        """Load the newest checkpoint (or the initial weights); returns the step to start at."""
        latest = self._newest_whole()
        if latest is None:
            load_hf_weights(self.learner.module, self.arch, self.initial_model)
            return 0
        self.saved_at = load_checkpoint(latest, self.learner)["step"]
        self.resumed_from = latest
        say(f"resumed from {latest} at step {self.saved_at}")
        return self.saved_at

    def _newest_whole(self) -> Path | None:
        """The newest checkpoint that matches its manifest, every rank checking a slice of the
        files; newer ones found torn (a lost node, a full disk, a cut file) are set aside with a
        warning, and the run resumes from the one before."""
        rank, world = dist.get_rank(), dist.get_world_size()
        set_aside_here = []
        while True:
            newest = [str(latest_checkpoint(self.root) or "") if rank == 0 else None]
            dist.broadcast_object_list(newest, src=0)
            if not newest[0] and set_aside_here:
                raise CheckpointError(f"no whole checkpoint is left in {self.root}: {'; '.join(set_aside_here)}; "
                                      "start the run afresh in a new run directory")
            if not newest[0]:
                return None
            found = torn_files(newest[0], share=(rank, world))
            gathered = [None] * world
            dist.all_gather_object(gathered, found)
            problems = sorted({line for part in gathered for line in part})
            if not problems:
                return Path(newest[0])
            set_aside_here.append(f"{Path(newest[0]).name} is torn ({summary(problems)})")
            if rank == 0:
                note = set_aside(Path(newest[0]), problems)
                if before := latest_checkpoint(self.root):
                    log.warning("%s; resuming from %s", note, before.name)
            dist.barrier()

    def after_step(self, done: int, *, stop: bool, write_extra: Callable[[Path], None] | None = None
                   ) -> dict[str, float]:
        """After `done` steps: save and export what is due (a collective). `write_extra(dir)`:
        rank 0's own files for the checkpoint. Returns the time taken."""
        metrics = {}
        save, export = due_after(done, self.total_steps, save_every=self.save_every,
                                 export_every=self.export_every, stop=stop, save_at_end=self.save_at_end)
        if save:
            started = time.monotonic()
            self._save(done, write_extra)
            metrics["time/checkpoint"] = time.monotonic() - started
        if export:
            save_hf(self.learner.module, self.arch, self.export_root / step_dir_name(done), config=self.hf_config,
                    dtype=self.learner.module.config.params_dtype, side_files_from=self.initial_model,
                    manifest=True)
        return metrics

    def _save(self, step: int, write_extra: Callable[[Path], None] | None) -> None:
        path = save_checkpoint(self.root, self.learner, {"step": step}, self.hf_config, name_step=step,
                               write_extra=write_extra)
        if dist.get_rank() == 0:
            for old in superseded(self.root, path, self.keep):
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        self.saved_at = step


def due_after(done: int, total_steps: int, *, save_every: int, export_every: int, stop: bool,
              save_at_end: bool = True) -> tuple[bool, bool]:
    """After `done` steps: (save a checkpoint?, write an HF export?). A checkpoint every
    `save_every` steps, on a stop and at the end (unless not `save_at_end`); an export every
    `export_every` and at the end."""
    final = done == total_steps
    save = stop or (final and save_at_end) or bool(save_every and done % save_every == 0)
    export = bool(export_every) and (final or done % export_every == 0)
    return save, export


def superseded(root: Path, newest: Path, keep: int) -> list[Path]:
    """The complete checkpoints under `root` to delete once `newest` is written: all but the
    `keep` newest (a `.partial` one being written and a `.torn` one set aside are not counted,
    nor touched)."""
    older = sorted(p for p in root.glob("step_*") if p.is_dir() and p != newest and "." not in p.name)
    return older[: max(0, len(older) - (keep - 1))]
