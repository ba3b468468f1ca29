"""The narrow configs the learner and the rollout side take, built once from the recipe: the
`Recipe` itself goes no further down than the run layer."""

from __future__ import annotations

from dataclasses import replace

import torch

from dppo_megatron.algo import needs_topk
from dppo_megatron.config.placement import wants_routes
from dppo_megatron.config.schema import Recipe, RolloutConfig
from dppo_megatron.learner.learner import LossConfig, OptimizerConfig
from dppo_megatron.learner.model import ModelOptions
from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.rewards import RewardSpec
from dppo_megatron.rollout.client import ClientConfig
from dppo_megatron.rollout.protocol import RoutingShape, SamplingParams


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
                             relax_below=loss.relax_below, aggregation=loss.aggregation,
                             max_response_len=recipe.rollout.max_new_tokens,
                             temperature=recipe.rollout.temperature,
                             stats_memory_budget=recipe.learner.token_stats_memory_mib * 2**20)
    return options, optimizer, loss_config


def topk_of(recipe: Recipe) -> int:
    """K of the engine's top-K logprobs the loss needs (0: none asked for)."""
    return recipe.rollout.topk_logprobs if needs_topk(recipe.loss.mode) else 0


def routing_shape(recipe: Recipe, arch: Qwen3Arch) -> RoutingShape | None:
    """The shape of the engine's routes, when the recipe asks the engines for them."""
    if not wants_routes(recipe):
        return None
    return RoutingShape(arch.num_layers, arch.num_experts_per_tok, arch.num_experts)


def sampling_params(recipe: Recipe, eos_token_id: int | None) -> SamplingParams:
    """How the engines sample a response (each request adds its own seed); the tokenizer's end
    of sequence stops it."""
    rollout = recipe.rollout
    return SamplingParams(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature, top_p=rollout.top_p,
                          top_k=rollout.top_k, stop_token_ids=() if eos_token_id is None else (eos_token_id,))


def eval_sampling_params(recipe: Recipe, train: SamplingParams) -> SamplingParams:
    """The training sampling, with the evaluation's own temperature and top-p where the recipe
    sets them (the paper evaluates at 0.7 / 0.95 what it trains at 1 / 1)."""
    trainer = recipe.trainer
    temperature, top_p = trainer.eval_temperature, trainer.eval_top_p
    return replace(train, temperature=train.temperature if temperature is None else temperature,
                   top_p=train.top_p if top_p is None else top_p)


def micro_batch_layout(recipe: Recipe, arch: Qwen3Arch) -> dict:
    """How each rank pads its micro-batches (the keywords of `learner.batches.micro_batch`):
    to a multiple of TP (sequence parallelism splits the sequence), with the top-K lists the
    loss needs and the routes the engines return."""
    routing = (arch.num_layers, arch.num_experts_per_tok) if wants_routes(recipe) else None
    return dict(pad_multiple=recipe.learner.tp, topk=topk_of(recipe), routing=routing)


def client_config(rollout: RolloutConfig) -> ClientConfig:
    return ClientConfig(request_timeout=rollout.request_timeout,
                        max_in_flight_per_server=rollout.max_in_flight_per_server,
                        requests_per_call=rollout.requests_per_call, topk_b64=rollout.topk_b64)


def reward_spec(recipe: Recipe) -> RewardSpec:
    reward = recipe.reward
    return RewardSpec(kind=reward.kind, timeout=reward.timeout, function=reward.function, url=reward.url,
                      retries=reward.retries, api_key_file=reward.api_key_file)
