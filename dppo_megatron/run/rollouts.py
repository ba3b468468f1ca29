"""Rank 0's side of a step: prompts in, scored samples with their advantages out (and the
held-out evaluation)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from dppo_megatron.algo import group_advantages
from dppo_megatron.config.schema import Recipe
from dppo_megatron.data.prompts import Prompt, PromptOrder, load_prompts
from dppo_megatron.learner.batches import TrainSample
from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.rewards import overlong_penalty, reward_function
from dppo_megatron.rollout.client import Request, RolloutClient
from dppo_megatron.rollout.protocol import Sample, SamplingParams
from dppo_megatron.run.configs import client_config, routing_shape, topk_of
from dppo_megatron.run.run_dir import dataset_paths, tokenizer_dir

log = logging.getLogger(__name__)
EVAL_SEED = 104729


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
                      max_prompt_len=data.max_prompt_len)
        self.train, skipped = load_prompts(train_path, self.tokenizer, **encode)
        if skipped:
            log.warning("%d prompts of %s are longer than data.max_prompt_len and are skipped", skipped, train_path)
        self.eval = load_prompts(eval_path, self.tokenizer, **encode)[0] if eval_path else []
        self.order = PromptOrder(len(self.train), recipe.trainer.prompts_per_step, seed=recipe.trainer.seed,
                                 shuffle=data.shuffle)
        self.reward = reward_function(recipe.reward.kind, timeout=recipe.reward.timeout)
        rollout = recipe.rollout
        self.topk = topk_of(recipe)
        self.routing = routing_shape(recipe, arch)
        stop = (self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ()
        self.params = SamplingParams(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                                     top_p=rollout.top_p, top_k=rollout.top_k, stop_token_ids=stop)
        self.client = RolloutClient(urls, client_config(recipe), restart=restart)

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
        """The step's samples (those kept for training) with their advantages, and its metrics."""
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
        samples = self.client.generate_sync(self._requests(self.eval, k, "eval", EVAL_SEED))
        rewards = torch.tensor(self._score(self.eval, samples, k)).view(-1, k)
        return {"eval/mean_reward": rewards.mean().item(), f"eval/avg@{k}": rewards.mean().item(),
                f"eval/pass@{k}": (rewards >= 1.0).any(1).float().mean().item()}
