"""The RL loop: rollout -> rewards -> group advantages -> learner steps -> weight sync ->
evaluation, checkpoint -> metrics.

An SPMD program on every learner rank (`dppo-megatron run-rank RUN_DIR`, started by
`dppo-megatron train` or by a cluster job). Rank 0 also drives the rollout: it runs the
servers, has a process of its own send the requests and score the responses as they arrive
(run/rollout_process.py), and hands each data-parallel rank its share of the batch. With `trainer.max_staleness` N >= 1 the servers
generate step k + N's batch while the learner trains step k (run/producer.py). Everything a
step does is a function of the step number and the weights, so a run resumed from a
checkpoint repeats exactly what the uninterrupted run would have done. The run's parts are built
once, in run/build.py; this module is the step.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from dppo_megatron.algo import needs_old_logprob
from dppo_megatron.config.schema import Recipe
from dppo_megatron.config.validate import load_recipe
from dppo_megatron.processes import say
from dppo_megatron.rollout.client import NoServerLeft
from dppo_megatron.run.build import Run, build_run
from dppo_megatron.run.metrics import mean_over_mini_batches
from dppo_megatron.run.producer import PENDING_DIR, save_pending
from dppo_megatron.run.run_dir import RECIPE_FILE, write_status
from dppo_megatron.run.server_keeper import RESTART_ATTEMPTS, ServersLost


def train(run_dir: Path, job_layout: Path | None = None) -> int:
    """Train the run in `run_dir`. `job_layout`: a cluster job's layout, whose `serve-node`
    agents run the servers; without it rank 0 runs them on this machine. status.json says how
    it went (rank 0 writes it; a failure names its error)."""
    recipe = load_recipe(run_dir / RECIPE_FILE)
    progress = {"step": 0}
    try:
        return _train(recipe, run_dir, job_layout, progress)
    except BaseException as error:
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                write_status(run_dir, "failed", progress["step"], recipe.trainer.steps,
                             explained(error)[:4000])
            except OSError as status_error:  # the disk that failed the run may refuse this too
                say(f"status.json could not be written either: {status_error}")
        raise


def explained(error: BaseException) -> str:
    """The error in one line. torch's CheckpointException says only which ranks failed (and
    their tracebacks): the first rank's own error says why (a full disk, say)."""
    if isinstance(error, CheckpointException) and error.failures:
        rank, (cause, _) = min(error.failures.items())
        return f"the checkpoint could not be written or read (rank {rank}): {type(cause).__name__}: {cause}"
    return f"{type(error).__name__}: {error}"


def _train(recipe: Recipe, run_dir: Path, job_layout: Path | None, progress: dict) -> int:
    run = build_run(recipe, run_dir, job_layout)
    progress["step"] = run.start_step
    try:
        run.start()
        for step in range(run.start_step, recipe.trainer.steps):
            progress["step"] = step
            if _step(run, step) and step + 1 < recipe.trainer.steps:
                return _stopped(run)
        if run.rank == 0:
            write_status(run_dir, "finished", recipe.trainer.steps, recipe.trainer.steps)
            say(run.metrics_log.summary())
        kept = f"checkpoints in {run.checkpoints.root}" if run.checkpoints.saved_at else \
            "no checkpoint kept (trainer.save_at_end false)"
        say(f"done: {recipe.trainer.steps} steps; {kept}")
        return 0
    finally:
        run.close()


def _step(run: Run, step: int) -> bool:
    """One step, a collective: rollout, learner, weight sync, evaluation and checkpoint,
    metrics. Returns whether a stop was asked for (a checkpoint was then saved). Servers lost
    at the weight sync: the step is checkpointed and logged (without its evaluation), then
    ServersLost is raised."""
    recipe, rank, learner = run.recipe, run.rank, run.learner
    trainer = recipe.trainer
    started = time.monotonic()
    # 1. Rollout, rewards, advantages (rank 0): start step + N's batch with the servers'
    #    weights, take this step's; every rank gets its share.
    samples, metrics = _batch(run, step)
    share = run.scatter.share(samples)
    if rank == 0:  # what the scatter just sent
        metrics["batch/sent_mib"] = run.scatter.last_bytes_sent / 2**20
        metrics["batch/compact_mib"] = run.scatter.last_compact_bytes / 2**20
    rollout_done = time.monotonic()

    # 2. Learner: one optimizer step per mini-batch, on the GPUs the servers hand over (colocated).
    run.turns.to_learner(metrics)
    if needs_old_logprob(recipe.loss.mode):
        learner.anchor_old_logprobs([mb for mini in share for mb in mini])
    learner_metrics = [learner.train_step(micro_batches) for micro_batches in share]
    masked_counts = learner.take_masked_token_counts()
    if rank == 0:
        run.masked_tokens.add(masked_counts)
    learner_done = time.monotonic()

    # 3. New weights to the servers (and the GPUs back to them, colocated). Servers that cannot
    #    be brought back to take them end the run, once the step is saved (a resume starts there).
    lost = None
    try:
        run.turns.to_servers(step + 1, metrics)
    except ServersLost as error:  # raised on every rank alike
        lost = error
    sync_done = time.monotonic()

    # 4. Evaluation, checkpoint, export.
    metrics.update(mean_over_mini_batches(learner_metrics))
    metrics.update({"time/rollout": rollout_done - started, "time/learner": learner_done - rollout_done,
                    "time/sync": sync_done - learner_done})
    if rank == 0 and trainer.eval_every and (step + 1) % trainer.eval_every == 0 and not lost:
        metrics.update(run.rollouts.evaluate())
    stop = run.stop_request.agreed()
    metrics.update(run.checkpoints.after_step(step + 1, stop=stop or lost is not None,
                                              write_extra=_checkpoint_extra(run)))

    # 5. Metrics.
    if rank == 0:
        metrics["time/step"] = time.monotonic() - started
        run.metrics_log.log(step, metrics)
        run.masked_tokens.write(run.run_dir)
        say(run.metrics_log.progress(step, metrics))
    if lost is not None:
        raise lost
    return stop


def _batch(run: Run, step: int) -> tuple[list | None, dict]:
    """Rank 0: the step's batch (made ahead, else now), and step + N's started. A collective:
    where no server was left to make it (restarted ones wait for the weights under distributed
    sync, or restarts failed), every rank joins a publish of the weights the servers should
    hold, which restarts the dead ones, and rank 0 makes the batch again. Where that keeps
    failing, ServersLost, after a checkpoint of the steps done."""
    recipe, producer, publisher = run.recipe, run.producer, run.publisher
    ahead = step + recipe.trainer.max_staleness
    for attempt in range(1, RESTART_ATTEMPTS + 2):
        batch, waiting = (None, {}), [None]
        if run.rank == 0:
            try:
                producer.start(step, version=publisher.version)  # nothing to do where made ahead
                if ahead < recipe.trainer.steps:
                    producer.start(ahead, version=publisher.version)
                batch = producer.take(step)
            except NoServerLeft as error:
                waiting[0] = str(error)
                say(f"step {step}: {error}; bringing the servers back with weight version {publisher.version} "
                    f"and making the batch again")
        dist.broadcast_object_list(waiting, src=0, group=run.stop_request.group)
        if waiting[0] is None:
            return batch
        try:
            if attempt > RESTART_ATTEMPTS:
                raise ServersLost(f"the rollouts of step {step} failed {attempt} times: {waiting[0]}")
            publisher.publish(publisher.version)
        except ServersLost:
            if step > run.checkpoints.saved_at:
                run.checkpoints.after_step(step, stop=True, write_extra=_checkpoint_extra(run))
            raise


def _checkpoint_extra(run: Run):
    """Rank 0's part of a checkpoint: the batches made ahead, the masked-token counts."""
    pending = run.producer.pending() if run.rank == 0 else {}

    def write_extra(directory: Path) -> None:
        save_pending(directory / PENDING_DIR, pending)
        run.masked_tokens.save(directory)

    return write_extra


def _stopped(run: Run) -> int:
    if run.rank == 0:
        run.stop_request.clear()
        write_status(run.run_dir, "stopped", run.checkpoints.saved_at, run.recipe.trainer.steps,
                     "stop requested (signal or STOP file)")
    say(f"stop requested: checkpoint saved at step {run.checkpoints.saved_at}; resume with: "
        f"dppo-megatron train --run-dir {run.run_dir} --resume")
    return 0
