"""The RL loop: rollout -> rewards -> group advantages -> learner steps -> weight sync ->
evaluation, checkpoint -> metrics.

An SPMD program on every learner rank (`dppo-megatron run-rank RUN_DIR`, started by
`dppo-megatron train` or by a cluster job). Rank 0 also drives the rollout: it runs the
servers, has a process of its own send the requests and score the responses as they arrive
(run/rollout_process.py), and hands each data-parallel rank its share of the batch. With `trainer.max_staleness` N >= 1 the servers
generate step k + N's batch while the learner trains step k (run/producer.py). Everything a
step does is a function of the step number and the weights, so a run resumed from a
checkpoint repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist

from dppo_megatron.algo import needs_old_logprob
from dppo_megatron.config.schema import Recipe
from dppo_megatron.config.validate import load_recipe, parallel_layout, recipe_arch
from dppo_megatron.learner.learner import Learner
from dppo_megatron.learner.parallel import init_parallel
from dppo_megatron.processes import say
from dppo_megatron.rollout.job_layout import JobLayout
from dppo_megatron.rollout.servers import RemoteServers, ServerManager, Servers, check_release
from dppo_megatron.run.checkpoints import CheckpointManager
from dppo_megatron.run.configs import learner_configs, micro_batch_layout
from dppo_megatron.run.masked_tokens import MaskedTokens
from dppo_megatron.run.metrics import MetricsLog, mean_over_mini_batches
from dppo_megatron.run.placement import server_specs
from dppo_megatron.run.producer import PENDING_DIR, RolloutProducer, load_pending, save_pending
from dppo_megatron.run.publisher import WeightPublisher
from dppo_megatron.run.rollout_process import RolloutProcess, run_rollouts
from dppo_megatron.run.run_dir import RECIPE_FILE, STOP_FILE, model_dir, tokenizer_dir, write_status
from dppo_megatron.run.scatter import SampleScatter
from dppo_megatron.run.stop import StopRequest


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
                             f"{type(error).__name__}: {error}"[:4000])
            except OSError as status_error:  # the disk that failed the run may refuse this too
                say(f"status.json could not be written either: {status_error}")
        raise


def _train(recipe: Recipe, run_dir: Path, job_layout: Path | None, progress: dict) -> int:
    from megatron.core import parallel_state as ps

    trainer, arch, layout = recipe.trainer, recipe_arch(recipe), parallel_layout(recipe)
    init_parallel(layout, arch, seed=trainer.seed)
    rank = dist.get_rank()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one line per node: which ranks run where
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        print(f"learner node {os.environ.get('GROUP_RANK', '0')} ({socket.gethostname()}): ranks "
              f"{rank}-{rank + local - 1} of {dist.get_world_size()}", flush=True)
    control = dist.new_group(backend="gloo")  # python objects and flags, on CPU whatever the backend
    stop_request = StopRequest(run_dir / STOP_FILE if rank == 0 else None, control)

    learner = Learner(arch, layout, *learner_configs(recipe))
    checkpoints = CheckpointManager(run_dir, learner, arch, initial_model=model_dir(recipe, run_dir),
                                    total_steps=trainer.steps, save_every=trainer.save_every,
                                    keep=trainer.keep_checkpoints, export_every=trainer.export_every,
                                    save_at_end=trainer.save_at_end)
    start = progress["step"] = checkpoints.resume()
    scatter = SampleScatter(control, dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                            mini_batches=trainer.mini_batches, micro_batch_size=recipe.learner.micro_batch_size,
                            layout=micro_batch_layout(recipe, arch))
    servers: Servers = (RemoteServers(JobLayout.load(job_layout).agents) if job_layout is not None
                        else ServerManager(server_specs(recipe, run_dir), run_dir / "logs"))
    rollouts = producer = metrics_log = publisher = masked_tokens = None
    staleness = trainer.max_staleness
    try:
        if rank == 0:
            write_status(run_dir, "running", start, trainer.steps)
            say(f"starting {len(servers.urls)} {recipe.rollout.engine} server(s); logs in {run_dir / 'logs'}"
                if job_layout is None else f"waiting for {len(servers.urls)} {recipe.rollout.engine} server(s) "
                f"of the job: {', '.join(servers.urls)}")
            servers.start()
            check_release(servers.urls)
        dist.barrier(group=control)  # every rank's publisher may talk to the servers
        publisher = WeightPublisher(
            learner, arch, servers.urls, method=recipe.rollout.weight_sync, weights_dir=run_dir / "weights",
            hf_config=checkpoints.hf_config, side_files_from=model_dir(recipe, run_dir),
            server_tp=recipe.rollout.server_tp, servers=servers if rank == 0 else None)
        if rank == 0:  # the client asks rank 0's publisher to restart a server that died
            rollouts = RolloutProcess(run_rollouts(recipe, run_dir, arch, servers.urls), publisher.restart)
            pending = load_pending(checkpoints.resumed_from / PENDING_DIR) if checkpoints.resumed_from else {}
            producer = RolloutProducer(rollouts, pending)
            metrics_log = MetricsLog(run_dir, first_step=start, total_steps=trainer.steps,
                                     tensorboard=trainer.tensorboard, wandb_project=trainer.wandb_project,
                                     run_name=run_dir.name, config=asdict(recipe))
            masked_tokens = MaskedTokens(arch.vocab_size, tokenizer_dir(recipe, run_dir))
            if checkpoints.resumed_from:
                masked_tokens.load(checkpoints.resumed_from)
        if start > 0:  # the servers started from the initial weights
            publisher.publish(start)
        if rank == 0 and staleness:  # the first N batches (a resumed run has them from its checkpoint)
            producer.fill(range(start, min(start + staleness, trainer.steps)), version=publisher.version)

        for step in range(start, trainer.steps):
            progress["step"] = step
            started = time.monotonic()
            # 1. Rollout, rewards, advantages (rank 0): start step + N's batch with the servers'
            #    weights, take this step's; every rank gets its share.
            samples, metrics = None, {}
            if rank == 0:
                if step + staleness < trainer.steps:
                    producer.start(step + staleness, version=publisher.version)
                samples, metrics = producer.take(step)
            share = scatter.share(samples)
            if rank == 0:  # what the scatter just sent
                metrics["batch/sent_mib"] = scatter.last_bytes_sent / 2**20
                metrics["batch/compact_mib"] = scatter.last_compact_bytes / 2**20
            rollout_done = time.monotonic()

            # 2. Learner: one optimizer step per mini-batch.
            if needs_old_logprob(recipe.loss.mode):
                learner.anchor_old_logprobs([mb for mini in share for mb in mini])
            learner_metrics = [learner.train_step(micro_batches) for micro_batches in share]
            masked_counts = learner.take_masked_token_counts()
            if rank == 0:
                masked_tokens.add(masked_counts)
            learner_done = time.monotonic()

            # 3. New weights to the servers: written while they may still be generating (the
            #    batch made ahead), loaded once they are done with the old ones.
            publisher.write(step + 1)
            if rank == 0:
                metrics["time/learner_waited_for_rollouts"] += producer.wait_idle()
            publisher.publish(step + 1)
            sync_done = time.monotonic()

            # 4. Evaluation, checkpoint, export.
            metrics.update(mean_over_mini_batches(learner_metrics))
            metrics.update({"time/rollout": rollout_done - started, "time/learner": learner_done - rollout_done,
                            "time/sync": sync_done - learner_done})
            if rank == 0 and trainer.eval_every and (step + 1) % trainer.eval_every == 0:
                metrics.update(rollouts.evaluate())
            stop = stop_request.agreed()
            pending = producer.pending() if rank == 0 else {}

            def write_extra(directory: Path, pending=pending) -> None:  # rank 0's part of a checkpoint
                save_pending(directory / PENDING_DIR, pending)
                masked_tokens.save(directory)

            metrics.update(checkpoints.after_step(step + 1, stop=stop, write_extra=write_extra))

            # 5. Metrics.
            if rank == 0:
                metrics["time/step"] = time.monotonic() - started
                metrics_log.log(step, metrics)
                masked_tokens.write(run_dir)
                say(metrics_log.progress(step, metrics))
            if stop and step + 1 < trainer.steps:
                if rank == 0:
                    stop_request.clear()
                    write_status(run_dir, "stopped", checkpoints.saved_at, trainer.steps,
                                 "stop requested (signal or STOP file)")
                say(f"stop requested: checkpoint saved at step {checkpoints.saved_at}; resume with: "
                    f"dppo-megatron train --run-dir {run_dir} --resume")
                return 0
        if rank == 0:
            write_status(run_dir, "finished", trainer.steps, trainer.steps)
            say(metrics_log.summary())
        say(f"done: {trainer.steps} steps; " + (f"checkpoints in {checkpoints.root}" if checkpoints.saved_at
                                                 else "no checkpoint kept (trainer.save_at_end false)"))
        return 0
    finally:
        if producer is not None:
            producer.close()
        if rollouts is not None:
            rollouts.close()
        if publisher is not None:
            publisher.close()
        if metrics_log is not None:
            metrics_log.close()
        if rank == 0:
            servers.stop()
