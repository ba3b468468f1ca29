"""The RL loop: rollout -> rewards -> group advantages -> learner steps -> weight sync ->
metrics -> checkpoint.

An SPMD program on every learner rank (`python -m dppo_megatron.trainer RUN_DIR`, started by
`dppo-megatron train` or by a cluster launcher). Rank 0 also drives the rollout: it runs the
servers, sends the requests, scores the responses and hands each rank its share of the batch.
Everything a step does is a function of the step number and the weights, so a run resumed
from a checkpoint repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from dppo_megatron.algo import group_advantages, needs_old_logprob, needs_topk
from dppo_megatron.batches import TrainSample, micro_batch, plan_step
from dppo_megatron.config.schema import Recipe
from dppo_megatron.config.validate import load_recipe, parallel_layout, recipe_arch
from dppo_megatron.data.prompts import Prompt, PromptOrder, load_prompts
from dppo_megatron.learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, step_dir_name
from dppo_megatron.learner.learner import Learner, LossConfig, OptimizerConfig
from dppo_megatron.learner.model import ModelOptions
from dppo_megatron.learner.parallel import init_parallel
from dppo_megatron.learner.weights import iter_hf_tensors, load_hf_weights, save_hf, sends_weights
from dppo_megatron.metrics import MetricsLog
from dppo_megatron.placement import JobLayout, server_specs, wants_routes
from dppo_megatron.rewards import overlong_penalty, reward_function
from dppo_megatron.rollout.client import ClientConfig, Request, RolloutClient
from dppo_megatron.rollout.protocol import RoutingShape, Sample, SamplingParams
from dppo_megatron.rollout.servers import RemoteServers, ServerManager
from dppo_megatron.rollout.weight_sync import DiskWeightSync, DistributedWeightSync, WeightSyncError
from dppo_megatron.run_dir import (RECIPE_FILE, STOP_FILE, dataset_paths, model_dir, tokenizer_dir, write_status)

log = logging.getLogger("dppo_megatron.trainer")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def learner_configs(recipe: Recipe) -> tuple[ModelOptions, OptimizerConfig, LossConfig]:
    optim, loss = recipe.optim, recipe.loss
    options = ModelOptions(dtype=getattr(torch, recipe.model.dtype), routing_replay=recipe.rollout.r3,
                           recompute=recipe.learner.recompute,
                           use_transformer_engine=None if recipe.learner.transformer_engine else False)
    optimizer = OptimizerConfig(
        lr=optim.lr, min_lr=optim.min_lr, lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=recipe.trainer.steps * recipe.trainer.mini_batches if optim.decay_style != "constant" else None,
        lr_decay_style=optim.decay_style, weight_decay=optim.weight_decay, adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps, clip_grad=optim.clip_grad,
    )
    loss_config = LossConfig(mode=loss.mode, low=loss.low, high=loss.high, ratio_cap=loss.ratio_cap,
                             aggregation=loss.aggregation, max_response_len=recipe.rollout.max_new_tokens,
                             temperature=recipe.rollout.temperature)
    return options, optimizer, loss_config


# --- rank 0: rollouts and rewards -------------------------------------------------------------


class Rollouts:
    """Rank 0's side of a step: prompts in, scored samples out."""

    def __init__(self, recipe: Recipe, run_dir: Path, arch, urls: list[str], restart=None):
        from transformers import AutoTokenizer

        self.recipe = recipe
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(recipe, run_dir))
        data = recipe.data
        train_path, eval_path = dataset_paths(recipe, run_dir)
        encode = dict(prompt_key=data.prompt_key, answer_key=data.answer_key, chat_template=data.chat_template,
                      max_prompt_len=data.max_prompt_len)
        self.train, skipped = load_prompts(train_path, self.tokenizer, **encode)
        if skipped:
            log.warning("%d prompts of %s are longer than data.max_prompt_len and are skipped", skipped, train_path)
        self.eval = load_prompts(eval_path, self.tokenizer, **encode)[0] if eval_path else []
        self.order = PromptOrder(len(self.train), recipe.trainer.prompts_per_step, seed=recipe.trainer.seed,
                                 shuffle=data.shuffle)
        self.reward = reward_function(recipe.reward.kind, timeout=recipe.reward.timeout)
        rollout = recipe.rollout
        self.topk = rollout.topk_logprobs if needs_topk(recipe.loss.mode) else 0
        self.routing = (RoutingShape(arch.num_layers, arch.num_experts_per_tok, arch.num_experts)
                        if wants_routes(recipe) else None)
        stop = (self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ()
        self.params = SamplingParams(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                                     top_p=rollout.top_p, top_k=rollout.top_k, stop_token_ids=stop)
        self.client = RolloutClient(urls, ClientConfig(
            request_timeout=rollout.request_timeout, max_in_flight_per_server=rollout.max_in_flight_per_server,
            requests_per_call=rollout.requests_per_call), restart=restart)

    def _requests(self, prompts: list[Prompt], n: int, tag: str, seed: int) -> list[Request]:
        requests = []
        for slot, prompt in enumerate(prompts):
            for j in range(n):
                # A seed per response: the same step samples the same tokens after a resume.
                sample_seed = (seed * 1_000_003 + slot * n + j) % (2**31 - 1)
                params = SamplingParams(**{**asdict(self.params), "sampling_seed": sample_seed})
                requests.append(Request(f"{tag}-p{slot}-r{j}", prompt.prompt_ids, params, self.topk, self.routing))
        return requests

    def _score(self, prompts: list[Prompt], samples: list[Sample], n: int) -> list[float]:
        reward = self.recipe.reward
        scores = []
        for index, sample in enumerate(samples):
            text = self.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
            score = self.reward(text, prompts[index // n].answer)
            if reward.overlong == "penalty":
                score += overlong_penalty(len(sample.response_ids), self.recipe.rollout.max_new_tokens,
                                          reward.overlong_buffer, reward.overlong_penalty)
            scores.append(score)
        return scores

    def step(self, step: int) -> tuple[list[TrainSample], dict[str, float]]:
        recipe, n = self.recipe, self.recipe.rollout.n
        prompts = [self.train[i] for i in self.order.batch(step)]
        samples = self.client.generate_sync(self._requests(prompts, n, f"s{step}", recipe.trainer.seed * 7919 + step))
        rewards = torch.tensor(self._score(prompts, samples, n))
        advantages = group_advantages(rewards, n, normalize_std=recipe.loss.normalize_std)
        keep = torch.ones(len(samples), dtype=torch.bool)
        groups = rewards.view(-1, n)
        if recipe.trainer.dynamic_sampling:  # a group whose rewards all agree teaches nothing
            keep &= (groups.max(1).values > groups.min(1).values).repeat_interleave(n)
        truncated = torch.tensor([s.truncated for s in samples])
        if recipe.reward.overlong == "drop":
            keep &= ~truncated
        lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float)
        # Every sample should come from the weights published after the previous step.
        stale = [s.weight_version is not None and s.weight_version != str(step) for s in samples]
        metrics = {
            "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "reward/solved_frac": (rewards >= 1.0).float().mean().item(),
            "response/length_mean": lengths.mean().item(), "response/length_max": lengths.max().item(),
            "response/truncated_frac": truncated.float().mean().item(),
            "batch/groups_all_equal_frac": (groups.max(1).values == groups.min(1).values).float().mean().item(),
            "batch/samples_trained": int(keep.sum()),
            "rollout/stale_frac": sum(stale) / len(samples),
        }
        train = [
            TrainSample(s.prompt_ids, s.response_ids, s.logprobs, float(a), s.topk_ids, s.topk_logprobs, s.routed_experts)
            for s, a, k in zip(samples, advantages.tolist(), keep.tolist()) if k
        ]
        return train, metrics

    def evaluate(self) -> dict[str, float]:
        """Mean reward, avg@k and pass@k on the held-out prompts (fixed seeds: comparable over steps)."""
        k = self.recipe.trainer.eval_n
        samples = self.client.generate_sync(self._requests(self.eval, k, "eval", 104729))
        rewards = torch.tensor(self._score(self.eval, samples, k)).view(-1, k)
        return {"eval/mean_reward": rewards.mean().item(), f"eval/avg@{k}": rewards.mean().item(),
                f"eval/pass@{k}": (rewards >= 1.0).any(1).float().mean().item()}


# --- weight sync --------------------------------------------------------------------------


class WeightPublisher:
    """Sends the learner's weights to the servers after each step (a collective)."""

    def __init__(self, recipe: Recipe, run_dir: Path, learner: Learner, arch, urls: list[str], hf_config: dict):
        self.recipe, self.learner, self.arch, self.urls, self.hf_config = recipe, learner, arch, urls, hf_config
        self.side_files = model_dir(recipe, run_dir)
        self.version = 0  # what the servers hold: 0 is the initial model they start from
        self.restart = None  # rank 0: the server manager's restart, for servers that die
        self.disk = DiskWeightSync(run_dir / "weights") if recipe.rollout.weight_sync == "disk" else None
        self.distributed = None
        if recipe.rollout.weight_sync == "distributed" and sends_weights(arch):
            from dppo_megatron.launch_utils import free_port

            rank = dist.get_rank()
            self.distributed = DistributedWeightSync(
                urls, master_address=_address_for(urls), master_port=free_port(), group_name=f"dppo-weights-r{rank}",
                backend="nccl" if torch.cuda.is_available() else "gloo",
                server_tp=[recipe.rollout.server_tp] * len(urls))
            self.distributed.connect()

    def publish(self, version: int) -> None:
        if self.disk is not None:
            save_hf(self.learner.module, self.arch, self.disk.version_dir(version), config=self.hf_config,
                    dtype=self.learner.module.config.params_dtype, side_files_from=self.side_files)
            if dist.get_rank() == 0:
                try:
                    self.disk.publish(self.urls, version)
                except WeightSyncError as error:
                    if self.restart is None:
                        raise
                    log.warning("%s; restarting the servers that failed and loading again", error)
                    self._restart_failed(version)
            dist.barrier()
            self.version = version
            return
        tensors = iter_hf_tensors(self.learner.module, self.arch, experts_from_owners=True)
        if self.distributed is not None:
            self.distributed.publish(tensors, version)
        else:
            for _ in tensors:  # the iterator is a collective: every rank runs it through
                pass
        dist.barrier()
        self.version = version

    def _restart_failed(self, version: int) -> None:
        import urllib.request

        for url in self.urls:
            try:
                with urllib.request.urlopen(url + "/health", timeout=10):
                    continue
            except OSError:
                self.restart(url)
        self.disk.publish(self.urls, version)

    def bring_up_to_date(self, url: str) -> None:
        """Rank 0, after a server was restarted (it starts from the initial model): give it the
        current weights before it serves again."""
        if self.version == 0:
            return
        if self.disk is None:
            raise WeightSyncError(
                f"{url} was restarted, and a server cannot rejoin the distributed weight-update group in the middle "
                "of a run: stopping; the run resumes from its last checkpoint (or use rollout.weight_sync: disk)")
        self.disk.publish([url], self.version)

    def close(self) -> None:
        if self.distributed is not None:
            self.distributed.close()


def _address_for(urls: list[str]) -> str:
    """The address of this rank's host as the servers reach it: a sending rank hosts the store
    of its own weight-update group, on whichever node it runs."""
    import socket
    from urllib.parse import urlparse

    if all(urlparse(url).hostname in ("127.0.0.1", "localhost", "::1") for url in urls):
        return "127.0.0.1"
    return socket.getfqdn()


# --- the loop -------------------------------------------------------------------------------


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
            write_status(run_dir, "failed", progress["step"], recipe.trainer.steps,
                         f"{type(error).__name__}: {error}"[:4000])
        raise


def _train(recipe: Recipe, run_dir: Path, job_layout: Path | None, progress: dict) -> int:
    from megatron.core import parallel_state as ps

    arch = recipe_arch(recipe)
    layout = parallel_layout(recipe)
    init_parallel(layout, arch, seed=recipe.trainer.seed)
    rank = dist.get_rank()
    control = dist.new_group(backend="gloo")  # python objects and flags, on CPU whatever the backend
    stop_requested = _catch_stop_signals(run_dir / STOP_FILE if rank == 0 else None)
    trainer = recipe.trainer

    options, optimizer_config, loss_config = learner_configs(recipe)
    learner = Learner(arch, layout, options, optimizer_config, loss_config)
    checkpoints = run_dir / "checkpoints"
    latest = latest_checkpoint(checkpoints)
    hf_config = json.loads((model_dir(recipe, run_dir) / "config.json").read_text())
    if latest is not None:
        start = load_checkpoint(latest, learner)["step"]
        _say(f"resumed from {latest} at step {start}")
    else:
        load_hf_weights(learner.module, arch, model_dir(recipe, run_dir))
        start = 0
    dp_rank_of = [None] * dist.get_world_size()
    dist.all_gather_object(dp_rank_of, ps.get_data_parallel_rank(), group=control)
    dp_size = ps.get_data_parallel_world_size()

    if job_layout is not None:
        servers = RemoteServers(JobLayout.load(job_layout).agents)
    else:
        servers = ServerManager(server_specs(recipe, run_dir), run_dir / "logs")
    rollouts = metrics_log = publisher = None
    progress["step"] = start
    if rank == 0:
        write_status(run_dir, "running", start, trainer.steps)
    try:
        if rank == 0:
            _say(f"starting {len(servers.urls)} {recipe.rollout.engine} server(s); logs in {run_dir / 'logs'}"
                 if job_layout is None else f"waiting for {len(servers.urls)} {recipe.rollout.engine} server(s) "
                 f"of the job: {', '.join(servers.urls)}")
            servers.start()

            def restart(url: str) -> None:  # called by the client for a dead server
                servers.restart(url)
                publisher.bring_up_to_date(url)

            rollouts = Rollouts(recipe, run_dir, arch, servers.urls, restart)
            metrics_log = MetricsLog(run_dir, first_step=start, total_steps=trainer.steps,
                                     tensorboard=trainer.tensorboard, wandb_project=trainer.wandb_project,
                                     run_name=run_dir.name, config=asdict(recipe))
        publisher = WeightPublisher(recipe, run_dir, learner, arch, servers.urls, hf_config)
        if rank == 0:
            publisher.restart = servers.restart
        if start > 0:  # the servers started from the initial weights
            publisher.publish(start)
        saved_at = start
        for step in range(start, trainer.steps):
            progress["step"] = step
            started = time.monotonic()
            # 1. Rollout, rewards, advantages (rank 0), and each rank's share of the batch.
            metrics, shares = {}, None
            if rank == 0:
                samples, metrics = rollouts.step(step)
                plan = plan_step(samples, mini_batches=trainer.mini_batches, dp_size=dp_size,
                                 micro_batch_size=recipe.learner.micro_batch_size)
                shares = [_rank_share(plan, dp_rank_of[r], recipe, arch, rollouts) for r in range(len(dp_rank_of))]
            received = [None]
            dist.scatter_object_list(received, shares, src=0, group=control)
            share = received[0]
            rollout_done = time.monotonic()

            # 2. Learner: one optimizer step per mini-batch.
            if needs_old_logprob(recipe.loss.mode):
                _attach_old_logprobs(learner, share)
            learner_metrics = [learner.train_step(micro_batches) for micro_batches in share]
            learner_done = time.monotonic()

            # 3. New weights to the servers.
            publisher.publish(step + 1)
            sync_done = time.monotonic()

            # 4. Evaluation, checkpoint, export, metrics.
            if rank == 0:
                metrics.update(_mean_metrics(learner_metrics))
                metrics.update({"time/rollout": rollout_done - started, "time/learner": learner_done - rollout_done,
                                "time/sync": sync_done - learner_done})
                if trainer.eval_every and (step + 1) % trainer.eval_every == 0:
                    metrics.update(rollouts.evaluate())
            stop = _agree(stop_requested(), control)
            if stop or (trainer.save_every and (step + 1) % trainer.save_every == 0) or step + 1 == trainer.steps:
                tic = time.monotonic()
                _save(checkpoints, learner, step + 1, hf_config, trainer.keep_checkpoints)
                saved_at = step + 1
                metrics["time/checkpoint"] = time.monotonic() - tic
            if trainer.export_every and ((step + 1) % trainer.export_every == 0 or step + 1 == trainer.steps):
                save_hf(learner.module, arch, run_dir / "export" / step_dir_name(step + 1), config=hf_config,
                        dtype=learner.module.config.params_dtype, side_files_from=model_dir(recipe, run_dir))
            if rank == 0:
                metrics["time/step"] = time.monotonic() - started
                metrics_log.log(step, metrics)
                _say(metrics_log.progress(step, metrics))
            if stop and step + 1 < trainer.steps:
                if rank == 0:
                    (run_dir / STOP_FILE).unlink(missing_ok=True)
                    write_status(run_dir, "stopped", saved_at, trainer.steps, "stop requested (signal or STOP file)")
                _say(f"stop requested: checkpoint saved at step {saved_at}; resume with --resume")
                return 0
        if rank == 0:
            write_status(run_dir, "finished", trainer.steps, trainer.steps)
        _say(f"done: {trainer.steps} steps; checkpoints in {checkpoints}")
        return 0
    finally:
        if publisher is not None:
            publisher.close()
        if metrics_log is not None:
            metrics_log.close()
        if rank == 0:
            servers.stop()


def _rank_share(plan, dp_rank: int, recipe: Recipe, arch, rollouts: Rollouts) -> list[list]:
    """The micro-batches of one rank (those of its DP rank), per mini-batch."""
    routing = (arch.num_layers, arch.num_experts_per_tok) if wants_routes(recipe) else None
    return [[micro_batch(samples, pad_multiple=recipe.learner.tp, topk=rollouts.topk, routing=routing)
             for samples in mini[dp_rank]] for mini in plan]


def _attach_old_logprobs(learner: Learner, share: list[list]) -> None:
    """The *_recompute ablations anchor to pi_old: the policy before this step's first update."""
    micro_batches = [mb for mini in share for mb in mini]
    for mb, logprob in zip(micro_batches, learner.logprobs(micro_batches)):
        mb.old_logprobs = logprob.cpu()


def _mean_metrics(per_mini_batch: list[dict]) -> dict[str, float]:
    if not per_mini_batch:
        return {}
    out = {}
    for name in per_mini_batch[0]:
        values = [m[name] for m in per_mini_batch]
        out[f"train/{name}"] = sum(values) if name.startswith("tokens") else sum(values) / len(values)
    return out


def _save(root: Path, learner: Learner, step: int, hf_config: dict, keep: int) -> None:
    path = save_checkpoint(root, learner, {"step": step}, hf_config, name_step=step)
    if dist.get_rank() == 0:
        older = sorted(p for p in root.glob("step_*") if p.is_dir() and p != path and not p.name.endswith(".partial"))
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _catch_stop_signals(stop_file: Path | None):
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit, preemption), or a STOP file in
    the run directory, ask for a checkpoint at the end of the current step, then a clean exit."""
    requested = {"signal": None}

    def handler(signum, frame):
        requested["signal"] = signum

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    return lambda: requested["signal"] is not None or (stop_file is not None and stop_file.exists())


def _agree(flag: bool, group) -> bool:
    """True on every rank if it is true on any (signals may reach only some ranks)."""
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def _say(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def _quiet_libraries() -> None:
    """Megatron's setup chatter and the deprecation notices of its own calls are not news to a
    user watching the progress lines; our warnings and errors still show."""
    import warnings

    logging.getLogger("megatron").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch\.distributed|megatron\.)")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dppo_megatron.trainer",
                                     description="The trainer's ranks (started by torchrun, srun or `dppo-megatron train`).")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--job-layout", type=Path, help="a cluster job's layout: its node agents run the servers")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        return train(args.run_dir, args.job_layout)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    _quiet_libraries()
    sys.exit(main())
