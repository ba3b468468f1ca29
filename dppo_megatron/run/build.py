"""A run's parts, built once from its recipe: the learner and its checkpoints, the scatter of
samples to data-parallel ranks, the servers, the weight publisher, and on rank 0 the rollout
process, the producer of batches, the metrics log and the masked-token counts. The loop
(run/loop.py) is then the step alone.

`build_run` makes what needs no server; `Run.start` starts the servers (rank 0), checks their
release, forms the weight publisher, picks the placement's turns (run/turns.py) and brings a
resumed run's servers up to date; `Run.close`
stops whatever was made, in reverse, whatever failed."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

from dppo_megatron.config.schema import Recipe
from dppo_megatron.config.validate import parallel_layout, recipe_arch
from dppo_megatron.keys import read_keys
from dppo_megatron.learner.learner import Learner
from dppo_megatron.learner.parallel import init_parallel
from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.processes import say
from dppo_megatron.rollout.job_layout import JobLayout
from dppo_megatron.rollout.servers import RemoteServers, ServerManager, Servers, check_release
from dppo_megatron.run.checkpoints import CheckpointManager
from dppo_megatron.run.configs import learner_configs, micro_batch_layout
from dppo_megatron.run.masked_tokens import MaskedTokens
from dppo_megatron.run.metrics import MetricsLog
from dppo_megatron.run.placement import keys_file, server_specs, tensor_ranks
from dppo_megatron.run.producer import PENDING_DIR, RolloutProducer, load_pending
from dppo_megatron.run.publisher import WeightPublisher
from dppo_megatron.run.rollout_process import RolloutProcess, run_rollouts
from dppo_megatron.run.run_dir import STOP_FILE, model_dir, tokenizer_dir, write_status
from dppo_megatron.run.scatter import SampleScatter
from dppo_megatron.run.stop import StopRequest
from dppo_megatron.run.turns import Colocated, Disaggregated


@dataclass
class Run:
    recipe: Recipe
    run_dir: Path
    arch: Qwen3Arch
    rank: int
    stop_request: StopRequest
    learner: Learner
    checkpoints: CheckpointManager
    start_step: int  # 0, or the step of the checkpoint resumed from
    scatter: SampleScatter
    servers: Servers  # made on every rank (started by rank 0): every sender posts with its keys
    remote_servers: bool  # a cluster job's node agents run them
    turns: Disaggregated  # who holds the GPUs when (Colocated is one), chosen from the recipe
    publisher: WeightPublisher | None = None
    # Rank 0 only.
    rollouts: RolloutProcess | None = None
    producer: RolloutProducer | None = None
    metrics_log: MetricsLog | None = None
    masked_tokens: MaskedTokens | None = None

    def start(self) -> None:
        """Servers up (rank 0 starts them and checks their release), the weight publisher on
        every rank, rank 0's rollout side; a resumed run's servers get its weights, and with
        `trainer.max_staleness` N the first N batches are started."""
        recipe, run_dir, trainer = self.recipe, self.run_dir, self.recipe.trainer
        self.turns.before_servers_start()
        if self.rank == 0:
            write_status(run_dir, "running", self.start_step, trainer.steps)
            count, engine = len(self.servers.urls), recipe.rollout.engine
            say(f"waiting for {count} {engine} server(s) of the job: {', '.join(self.servers.urls)}"
                if self.remote_servers else f"starting {count} {engine} server(s); logs in {run_dir / 'logs'}")
            self.servers.start()
            check_release(self.servers.urls, self.servers.keys)
        dist.barrier(group=self.stop_request.group)  # every rank's publisher may talk to the servers
        self.publisher = WeightPublisher(
            self.learner, self.arch, self.servers.urls, method=recipe.rollout.weight_sync,
            weights_dir=run_dir / "weights", hf_config=self.checkpoints.hf_config,
            side_files_from=model_dir(recipe, run_dir), server_tp=recipe.rollout.server_tp,
            servers=self.servers if self.rank == 0 else None, control_key=self.servers.keys.for_control(),
            tensor_ranks=tensor_ranks(recipe))
        if self.rank == 0:
            self._start_rollout_side()
        self.turns.start(self.publisher, self.producer)
        if self.start_step > 0:  # the servers started from the initial weights
            self.publisher.publish(self.start_step)
        staleness = trainer.max_staleness
        if self.rank == 0 and staleness:  # the first N batches (a resumed run has them from its checkpoint)
            self.producer.fill(range(self.start_step, min(self.start_step + staleness, trainer.steps)),
                               version=self.publisher.version)

    def _start_rollout_side(self) -> None:
        recipe, run_dir, trainer, resumed = self.recipe, self.run_dir, self.recipe.trainer, self.checkpoints.resumed_from
        # The client asks rank 0's publisher to restart a server that died.
        self.rollouts = RolloutProcess(run_rollouts(recipe, run_dir, self.arch, self.servers.urls),
                                       self.publisher.restart)
        self.producer = RolloutProducer(self.rollouts, load_pending(resumed / PENDING_DIR) if resumed else {})
        self.metrics_log = MetricsLog(run_dir, first_step=self.start_step, total_steps=trainer.steps,
                                      tensorboard=trainer.tensorboard, wandb_project=trainer.wandb_project,
                                      run_name=run_dir.name, config=asdict(recipe))
        self.masked_tokens = MaskedTokens(self.arch.vocab_size, tokenizer_dir(recipe, run_dir))
        if resumed:
            self.masked_tokens.load(resumed)

    def close(self) -> None:
        for part in (self.producer, self.rollouts, self.publisher, self.metrics_log):
            if part is not None:
                part.close()
        if self.rank == 0:
            self.servers.stop()


def build_run(recipe: Recipe, run_dir: Path, job_layout: Path | None) -> Run:
    """The learner's side of the run, resumed from its newest checkpoint; no server yet."""
    from megatron.core import parallel_state as ps

    trainer, arch, layout = recipe.trainer, recipe_arch(recipe), parallel_layout(recipe)
    init_parallel(layout, arch, seed=trainer.seed)
    rank = dist.get_rank()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one line per node: which ranks run where
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        print(f"learner node {os.environ.get('GROUP_RANK', '0')} ({socket.gethostname()}): ranks "
              f"{rank}-{rank + local - 1} of {dist.get_world_size()}", flush=True)
    control = dist.new_group(backend="gloo")  # python objects and flags, on CPU whatever the backend
    learner = Learner(arch, layout, *learner_configs(recipe))
    checkpoints = CheckpointManager(run_dir, learner, arch, initial_model=model_dir(recipe, run_dir),
                                    total_steps=trainer.steps, save_every=trainer.save_every,
                                    keep=trainer.keep_checkpoints, export_every=trainer.export_every,
                                    save_at_end=trainer.save_at_end)
    start_step = checkpoints.resume()
    scatter = SampleScatter(control, dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                            mini_batches=trainer.mini_batches, micro_batch_size=recipe.learner.micro_batch_size,
                            layout=micro_batch_layout(recipe, arch))
    servers: Servers = (RemoteServers(JobLayout.load(job_layout).agents, keys=read_keys(keys_file(recipe, run_dir)))
                        if job_layout is not None else ServerManager(server_specs(recipe, run_dir), run_dir / "logs"))
    turns = (Colocated(learner, offload=recipe.learner.offload_while_generating) if recipe.rollout.colocate
             else Disaggregated(learner))
    return Run(recipe=recipe, run_dir=run_dir, arch=arch, rank=rank, turns=turns,
               stop_request=StopRequest(run_dir / STOP_FILE if rank == 0 else None, control), learner=learner,
               checkpoints=checkpoints, start_step=start_step, scatter=scatter, servers=servers,
               remote_servers=job_layout is not None)
