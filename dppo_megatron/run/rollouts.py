"""Rank 0's side of a step, run in the rollout process (run/rollout_process.py): prompts in,
scored samples with their advantages out (and the held-out evaluation). Responses are scored
in the reward pool and packed into their compact blocks as they arrive, so that both overlap
generation; a group's advantages are computed as soon as its n rewards are in."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path

import torch

from dppo_megatron.algo import group_advantages
from dppo_megatron.config.schema import Recipe
from dppo_megatron.data.prompts import Prompt, PromptOrder, load_prompts
from dppo_megatron.learner.batches import TrainSample, pack_sample
from dppo_megatron.keys import read_keys
from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.rewards import overlong_penalty
from dppo_megatron.rewards.pool import RewardPool
from dppo_megatron.rollout.client import Request, RolloutClient
from dppo_megatron.rollout.protocol import Sample, SamplingParams
from dppo_megatron.run.configs import (
    client_config,
    eval_sampling_params,
    reward_spec,
    routing_shape,
    sampling_params,
    topk_of,
)
from dppo_megatron.run.placement import keys_file
from dppo_megatron.run.run_dir import dataset_paths, tokenizer_dir

log = logging.getLogger(__name__)
EVAL_SEED = 104729


class ScoredGroups:
    """Rewards as they are scored (any thread); each group's advantages once its n are in."""

    def __init__(self, groups: int, n: int, *, normalize_std: bool, with_advantages: bool = True):
        self.n, self.normalize_std, self.with_advantages = n, normalize_std, with_advantages
        self.rewards = torch.zeros(groups * n)
        self.advantages = torch.zeros(groups * n)
        self.missing = [n] * groups
        self.errors: list[BaseException] = []
        self._left = groups * n
        self._done = threading.Condition()

    def add(self, index: int, future: Future, penalty: float = 0.0) -> None:
        """`future` (done) holds the reward of response `index`."""
        error = RuntimeError("the reward pool was closed") if future.cancelled() else future.exception()
        with self._done:
            if error is not None:
                self.errors.append(error)
            else:
                self.rewards[index] = future.result() + penalty
            group = index // self.n
            self.missing[group] -= 1
            if self.missing[group] == 0 and self.with_advantages:
                rows = slice(group * self.n, (group + 1) * self.n)
                self.advantages[rows] = group_advantages(self.rewards[rows], self.n, normalize_std=self.normalize_std)
            self._left -= 1
            if self._left == 0:
                self._done.notify_all()

    def wait(self) -> None:
        with self._done:
            self._done.wait_for(lambda: self._left == 0)
        if self.errors:
            raise RuntimeError(f"scoring failed: {self.errors[0]}") from self.errors[0]


class Rollouts:
    def __init__(self, recipe: Recipe, run_dir: Path, arch: Qwen3Arch, urls: list[str],
                 restart: Callable[[str], None] | None = None):
        """`restart(url)`: what the client calls for a server that died (None: fail instead)."""
        from transformers import AutoTokenizer

        self.recipe = recipe
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(recipe, run_dir))
        data = recipe.data
        train_path, eval_path = dataset_paths(recipe, run_dir)
        encode = dict(prompt_key=data.prompt_key, answer_key=data.answer_key, chat_template=data.chat_template,
                      max_prompt_len=data.max_prompt_len, enable_thinking=data.enable_thinking)
        self.train, skipped = load_prompts(train_path, self.tokenizer, **encode)
        if skipped:
            log.warning("%d prompts of %s are longer than data.max_prompt_len and are skipped", skipped, train_path)
        self.eval = load_prompts(eval_path, self.tokenizer, **encode)[0] if eval_path else []
        self.order = PromptOrder(len(self.train), recipe.trainer.prompts_per_step, seed=recipe.trainer.seed,
                                 shuffle=data.shuffle)
        self.rewards = RewardPool(reward_spec(recipe), tokenizer_dir(recipe, run_dir), workers=recipe.reward.workers)
        self.topk = topk_of(recipe)
        self.routing = routing_shape(recipe, arch)
        self.params = sampling_params(recipe, self.tokenizer.eos_token_id)
        self.eval_params = eval_sampling_params(recipe, self.params)
        self.client = RolloutClient(urls, client_config(recipe.rollout), restart=restart,
                                    api_key=read_keys(keys_file(recipe, run_dir)).api_key)

    def _requests(self, prompts: list[Prompt], n: int, tag: str, seed: int, sampling: SamplingParams
                  ) -> list[Request]:
        requests = []
        for slot, prompt in enumerate(prompts):
            for j in range(n):
                # A seed per response: the same step samples the same tokens after a resume.
                sample_seed = (seed * 1_000_003 + slot * n + j) % (2**31 - 1)
                params = SamplingParams(**{**asdict(sampling), "sampling_seed": sample_seed})
                requests.append(Request(f"{tag}-p{slot}-r{j}", prompt.prompt_ids, params, self.topk, self.routing))
        return requests

    def close(self) -> None:
        self.rewards.close()

    def _generate_scored(self, prompts: list[Prompt], n: int, tag: str, seed: int, *, advantages: bool,
                         on_packed: Callable[[int, TrainSample], None] | None = None,
                         sampling: SamplingParams | None = None,
                         ) -> tuple[list[Sample], ScoredGroups, dict[str, float]]:
        """Generate n responses per prompt, each scored in the pool as soon as it arrives.
        `on_packed(index, sample)`: each response as it arrives, in its compact block
        (`pack_sample`), its advantage left at 0; the block then holds the arrays."""
        reward = self.recipe.reward
        groups = ScoredGroups(len(prompts), n, normalize_std=self.recipe.loss.normalize_std, with_advantages=advantages)

        def arrived(index: int, sample: Sample) -> None:
            if on_packed is not None:
                on_packed(index, pack_sample(TrainSample(sample.prompt_ids, sample.response_ids, sample.logprobs, 0.0,
                                                         sample.topk_ids, sample.topk_logprobs, sample.routed_experts)))
                sample.logprobs = sample.topk_ids = sample.topk_logprobs = sample.routed_experts = None
            penalty = 0.0
            if reward.overlong == "penalty":
                penalty = overlong_penalty(len(sample.response_ids), self.recipe.rollout.max_new_tokens,
                                           reward.overlong_buffer, reward.overlong_penalty)
            future = self.rewards.submit(sample.response_ids, prompts[index // n].answer)
            future.add_done_callback(lambda done: groups.add(index, done, penalty))

        requests = self._requests(prompts, n, tag, seed, sampling or self.params)
        samples = self.client.generate_sync(requests, on_sample=arrived)
        groups.wait()
        counts = self.rewards.counts.take()
        if counts.errors == len(samples):
            raise RuntimeError(f"the reward failed on every response of {tag}; the first: {counts.first_error}")
        if counts.errors:
            log.warning("%s: the reward failed on %d responses (scored 0); the first: %s", tag, counts.errors,
                        counts.first_error)
        return samples, groups, {"reward/timeouts": counts.timeouts, "reward/errors": counts.errors}

    def step(self, step: int, version: int, on_packed: Callable[[int, TrainSample], None]
             ) -> tuple[list[tuple[int, float]], dict[str, float]]:
        """Generate and score the step's responses; each goes to `on_packed(index, sample)` as
        it arrives. Returns the (index, advantage) of those kept for training, and the step's
        metrics. `version`: the weight version the servers hold."""
        recipe, n = self.recipe, self.recipe.rollout.n
        prompts = [self.train[i] for i in self.order.batch(step)]
        samples, groups, metrics = self._generate_scored(prompts, n, f"s{step}", recipe.trainer.seed * 7919 + step,
                                                         advantages=True, on_packed=on_packed)
        rewards, advantages = groups.rewards, groups.advantages
        grouped = rewards.view(-1, n)
        truncated = torch.tensor([s.truncated for s in samples])
        keep = trained_samples(rewards, truncated, n, dynamic_sampling=recipe.trainer.dynamic_sampling,
                               drop_truncated=recipe.reward.overlong == "drop")
        lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float)
        # Each sample's distance from the weights the learner trains: it was generated with the
        # weights the servers held (`version`); another version means a server was out of step.
        versions = [int(s.weight_version) if s.weight_version and s.weight_version.isdigit() else version
                    for s in samples]
        metrics.update({
            "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "reward/solved_frac": (rewards >= 1.0).float().mean().item(),
            "response/length_mean": lengths.mean().item(), "response/length_max": lengths.max().item(),
            "response/truncated_frac": truncated.float().mean().item(),
            "batch/groups_all_equal_frac": (grouped.max(1).values == grouped.min(1).values).float().mean().item(),
            "batch/samples_trained": int(keep.sum()),
            "rollout/staleness_mean": sum(step - v for v in versions) / len(samples),
            "rollout/staleness_max": max(step - v for v in versions),
            "rollout/stale_frac": sum(v != version for v in versions) / len(samples),
        })
        return [(index, a) for index, (a, k) in enumerate(zip(advantages.tolist(), keep.tolist())) if k], metrics

    def evaluate(self) -> dict[str, float]:
        """Mean reward, avg@k and pass@k on the held-out prompts (fixed seeds: comparable over steps)."""
        k = self.recipe.trainer.eval_n
        _, groups, _ = self._generate_scored(self.eval, k, "eval", EVAL_SEED, advantages=False,
                                             sampling=self.eval_params)
        return eval_scores(groups.rewards.view(-1, k))


def trained_samples(rewards: torch.Tensor, truncated: torch.Tensor, n: int, *, dynamic_sampling: bool,
                    drop_truncated: bool) -> torch.Tensor:
    """Which of a step's responses (groups of `n`, in order) the learner trains on: with dynamic
    sampling not those of a group whose rewards all agree (it teaches nothing: every advantage
    is 0), and with `reward.overlong: drop` not those cut at max_new_tokens."""
    keep = torch.ones(len(rewards), dtype=torch.bool)
    if dynamic_sampling:
        grouped = rewards.view(-1, n)
        keep &= (grouped.max(1).values > grouped.min(1).values).repeat_interleave(n)
    if drop_truncated:
        keep &= ~truncated
    return keep


def eval_scores(rewards: torch.Tensor) -> dict[str, float]:
    """[prompts, k] rewards: the mean; avg@k (the same mean: each prompt's mean over its k, then
    over prompts); pass@k (the fraction of prompts with at least one response scoring 1)."""
    k = rewards.shape[1]
    return {"eval/mean_reward": rewards.mean().item(), f"eval/avg@{k}": rewards.mean(1).mean().item(),
            f"eval/pass@{k}": (rewards >= 1.0).any(1).float().mean().item()}
