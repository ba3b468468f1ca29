"""Loading a recipe all the way to a checked `Recipe`: the rules that span fields, and what the
recipe's policy is (its architecture and the learner's parallel layout). Checks only: imports
no learner/ and no rollout/."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from dppo_megatron.algo.trust_region import needs_ratio_cap, needs_relax_below, needs_topk
from dppo_megatron.config.loading import RecipeError, apply_overrides, build, read_yaml
from dppo_megatron.config.memory_plan import memory_plan, plan_applies
from dppo_megatron.config.placement import learner_world_size, server_room
from dppo_megatron.config.schema import Recipe
from dppo_megatron.data.prompts import DatasetError, read_rows
from dppo_megatron.data.toy import TOY_TOKENIZER, toy_vocab_size
from dppo_megatron.keys import KeyFileError, read_keys
from dppo_megatron.model.arch import ArchError, Qwen3Arch, small_hf_config
from dppo_megatron.model.known import known_config
from dppo_megatron.model.layout import ParallelLayout
from dppo_megatron.rewards import BUILTIN, import_function

TIME_LIMIT = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}|\d+-\d+|UNLIMITED|INFINITE")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HTTP_URL = re.compile(r"https?://[^/\s:?#]+")


def load_recipe(path: str | Path, overrides: list[str] = (), *, check_files: bool = False) -> Recipe:
    """Read, merge, override, convert and check. Raises RecipeError listing every problem.
    `check_files`: also require local files (datasets, model) to exist, as `train` does."""
    data = apply_overrides(read_yaml(path), list(overrides))
    problems: list[str] = []
    recipe = build(Recipe, data, "", problems)
    if not problems:
        problems += check(recipe, check_files=check_files)
    if problems:
        raise RecipeError(problems, str(path))
    return recipe


def recipe_arch(recipe: Recipe) -> Qwen3Arch:
    """The policy's architecture: from random_init, a local config.json, or the table of known
    Qwen3 models. Raises ArchError when none applies."""
    model = recipe.model
    if model.random_init is not None:
        return Qwen3Arch.from_hf(random_init_config(recipe))
    if model.path and (Path(model.path) / "config.json").is_file():
        return Qwen3Arch.from_hf(model.path)
    config = known_config(model.path or "")
    if config is None:
        raise ArchError(f"model.path {model.path!r}: no config.json there and not a known Qwen3 model")
    return Qwen3Arch.from_hf(config)


def random_init_config(recipe: Recipe) -> dict:
    """The transformers config.json of model.random_init (its vocabulary is the toy tokenizer's)."""
    init = recipe.model.random_init
    if recipe.model.tokenizer != TOY_TOKENIZER:
        raise ArchError("model.random_init needs model.tokenizer: toy-digits (its vocabulary sizes the model)")
    return small_hf_config(
        moe=init.architecture == "qwen3_moe", vocab_size=toy_vocab_size(), hidden_size=init.hidden_size,
        num_layers=init.num_layers, num_attention_heads=init.num_attention_heads,
        num_key_value_heads=init.num_key_value_heads, head_dim=init.head_dim,
        intermediate_size=init.intermediate_size, init_std=init.init_std, num_experts=init.num_experts,
        num_experts_per_tok=init.num_experts_per_tok, moe_intermediate_size=init.moe_intermediate_size,
        mlp_only_layers=init.mlp_only_layers)


def parallel_layout(recipe: Recipe) -> ParallelLayout:
    learner = recipe.learner
    return ParallelLayout(tp=learner.tp, pp=learner.pp, ep=learner.ep, etp=learner.etp,
                          use_distributed_optimizer=learner.distributed_optimizer)


def check(recipe: Recipe, *, check_files: bool = False) -> list[str]:
    """Rules that span fields. Each problem names its key path."""
    problems = []

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    _numbers_and_loss(recipe, need)
    _model(recipe, need, problems, check_files)
    _batches(recipe, need)
    _servers(recipe, need, check_files)
    _colocation(recipe, need)
    if not problems:  # the plan reads the model, the layout and the servers: all sound by now
        problems += _memory_plan(recipe)
    _keys(recipe, need, check_files)
    _slurm_job(recipe, need)
    _data_and_rewards(recipe, need, problems, check_files)
    return problems


def _numbers_and_loss(recipe: Recipe, need) -> None:
    """Sizes, ranges and the loss's own settings."""
    learner, rollout, trainer, loss = recipe.learner, recipe.rollout, recipe.trainer, recipe.loss
    data, reward, optim = recipe.data, recipe.reward, recipe.optim
    for path, value in [("learner.nodes", learner.nodes), ("learner.ranks_per_node", learner.ranks_per_node),
                        ("learner.tp", learner.tp), ("learner.pp", learner.pp), ("learner.ep", learner.ep),
                        ("learner.etp", parallel_layout(recipe).etp),
                        ("learner.micro_batch_size", learner.micro_batch_size),
                        ("learner.token_stats_memory_mib", learner.token_stats_memory_mib),
                        ("rollout.max_new_tokens", rollout.max_new_tokens), ("rollout.servers", rollout.servers),
                        ("rollout.server_tp", rollout.server_tp), ("rollout.server_dp", rollout.server_dp),
                        ("rollout.server_ep", rollout.server_ep), ("rollout.requests_per_call", rollout.requests_per_call),
                        ("rollout.max_in_flight_per_server", rollout.max_in_flight_per_server),
                        ("trainer.steps", trainer.steps),
                        ("trainer.prompts_per_step", trainer.prompts_per_step),
                        ("trainer.mini_batches", trainer.mini_batches), ("trainer.keep_checkpoints", trainer.keep_checkpoints),
                        ("trainer.eval_n", trainer.eval_n), ("data.max_prompt_len", data.max_prompt_len)]:
        need(value >= 1, f"{path}: must be >= 1, got {value}")
    for path, value in [("trainer.save_every", trainer.save_every), ("trainer.eval_every", trainer.eval_every),
                        ("trainer.export_every", trainer.export_every), ("rollout.nodes", rollout.nodes),
                        ("optim.warmup_steps", optim.warmup_steps), ("optim.weight_decay", optim.weight_decay),
                        ("optim.clip_grad", optim.clip_grad), ("optim.min_lr", optim.min_lr),
                        ("reward.overlong_buffer", reward.overlong_buffer), ("rollout.topk_logprobs", rollout.topk_logprobs)]:
        need(value >= 0, f"{path}: must be >= 0, got {value}")
    need(rollout.colocate or rollout.gpus_per_node >= 1,  # colocated servers take the learner's GPUs instead
         f"rollout.gpus_per_node: must be >= 1, got {rollout.gpus_per_node}")
    need(learner.gpu_memory_gib > 0, f"learner.gpu_memory_gib: must be > 0, got {learner.gpu_memory_gib}")
    need(rollout.n >= 2, f"rollout.n: group advantages need at least 2 responses per prompt, got {rollout.n}")
    need(optim.lr > 0, f"optim.lr: must be > 0, got {optim.lr}")
    need(optim.min_lr <= optim.lr, f"optim.min_lr ({optim.min_lr}) must not exceed optim.lr ({optim.lr})")
    need(0 <= optim.adam_beta1 < 1 and 0 <= optim.adam_beta2 < 1, "optim.adam_beta1/adam_beta2: must be in [0, 1)")
    need(rollout.temperature > 0, f"rollout.temperature: must be > 0, got {rollout.temperature}")
    need(0 < rollout.top_p <= 1, f"rollout.top_p: must be in (0, 1], got {rollout.top_p}")
    need(trainer.eval_temperature is None or trainer.eval_temperature > 0,
         f"trainer.eval_temperature: must be > 0, got {trainer.eval_temperature}")
    need(trainer.eval_top_p is None or 0 < trainer.eval_top_p <= 1,
         f"trainer.eval_top_p: must be in (0, 1], got {trainer.eval_top_p}")
    need(rollout.top_k == -1 or rollout.top_k >= 1, f"rollout.top_k: -1 (off) or >= 1, got {rollout.top_k}")
    need(0 < rollout.mem_fraction <= 1, f"rollout.mem_fraction: must be in (0, 1], got {rollout.mem_fraction}")
    need(1 <= rollout.base_port <= 65535 - rollout.servers, f"rollout.base_port: {rollout.base_port} leaves no room "
                                                           f"for {rollout.servers} servers")
    need(loss.low > 0 and loss.high > 0, f"loss.low/loss.high: thresholds must be > 0, got {loss.low}/{loss.high}")
    need(loss.ratio_cap is None or loss.ratio_cap >= 1, f"loss.ratio_cap: null or >= 1, got {loss.ratio_cap}")
    if needs_ratio_cap(loss.mode):
        need(loss.ratio_cap is not None, f"loss.mode {loss.mode} truncates the importance weight: set loss.ratio_cap")
    if needs_relax_below(loss.mode):
        need(loss.relax_below is not None and 0 < loss.relax_below <= 1,
             f"loss.mode {loss.mode}: loss.relax_below must be a rollout probability in (0, 1], got {loss.relax_below}")
    else:
        need(loss.relax_below is None, f"loss.relax_below: only the grpo_relax_* modes use it (loss.mode {loss.mode})")
    if needs_topk(loss.mode):
        need(rollout.topk_logprobs >= 1, f"loss.mode {loss.mode} compares top-K distributions: "
                                         "rollout.topk_logprobs must be >= 1")


def _model(recipe: Recipe, need, problems: list[str], check_files: bool) -> None:
    """The model, and its architecture against the recipe (read only if nothing before failed)."""
    model, learner, rollout, loss, data = recipe.model, recipe.learner, recipe.rollout, recipe.loss, recipe.data
    need((model.path is None) != (model.random_init is None),
         "model: give exactly one of model.path (a checkpoint) and model.random_init (a tiny random model)")
    if model.random_init is not None:
        need(model.tokenizer == TOY_TOKENIZER, f"model.tokenizer: model.random_init needs {TOY_TOKENIZER!r}")
    if model.tokenizer is None and model.path is None:
        problems.append("model.tokenizer: needed when there is no model.path")
    arch = None
    if not problems:
        try:
            arch = recipe_arch(recipe)
        except ArchError as error:
            problems.append(f"model.path: {error}")
        if check_files and model.path and not (Path(model.path) / "config.json").is_file():
            problems.append(f"model.path: {model.path} is not a local Hugging Face checkpoint (no config.json)")
    if arch is not None:
        need(not rollout.r3 or arch.is_moe, "rollout.r3: routing replay needs a MoE model; "
                                            f"{model.path or 'model.random_init'} is dense")
        need(not rollout.record_routes or arch.is_moe, "rollout.record_routes: routes need a MoE model")
        need(learner.ep == 1 or arch.is_moe, f"learner.ep: {learner.ep} needs a MoE model")
        dense = [layer for layer in range(arch.num_layers) if not arch.is_moe_layer(layer)] if arch.is_moe else []
        # SGLang's qwen3_moe.py declares every layer sparse (stage_facts): a dense layer's MLP
        # would not be loaded, and the server would answer with an empty MoE block there.
        need(rollout.engine != "sglang" or not dense,
             f"model: layers {dense} of this Qwen3-MoE model have a dense MLP (mlp_only_layers / decoder_sparse_step),"
             " and SGLang serves every Qwen3-MoE layer as a MoE layer, without them; use rollout.engine embedded, or "
             "a model whose every layer is MoE")
        need(data.max_prompt_len + rollout.max_new_tokens <= arch.max_position_embeddings,
             f"rollout.max_new_tokens: data.max_prompt_len {data.max_prompt_len} + rollout.max_new_tokens "
             f"{rollout.max_new_tokens} exceed the model's {arch.max_position_embeddings} positions (a server "
             "refuses such requests)")
        need(not needs_topk(loss.mode) or rollout.topk_logprobs <= arch.vocab_size,
             f"rollout.topk_logprobs: {rollout.topk_logprobs} is more than the vocabulary ({arch.vocab_size} tokens)")
        problems += [f"learner: {p}" for p in parallel_layout(recipe).problems(learner_world_size(recipe), arch)]


def _batches(recipe: Recipe, need) -> None:
    """The batch against the learner's data-parallel ranks."""
    learner, rollout, trainer = recipe.learner, recipe.rollout, recipe.trainer
    world = learner_world_size(recipe)
    dp = world // (learner.tp * learner.pp) if world % (learner.tp * learner.pp) == 0 else 0
    responses = trainer.prompts_per_step * rollout.n
    if trainer.mini_batches >= 1 and dp:
        need(responses % trainer.mini_batches == 0,
             f"trainer.mini_batches: {responses} responses per step (prompts_per_step x rollout.n) do not split "
             f"into {trainer.mini_batches} mini-batches")
        need(responses // trainer.mini_batches >= dp,
             f"trainer.mini_batches: a mini-batch of {responses // trainer.mini_batches} responses cannot feed "
             f"{dp} data-parallel ranks")


def _servers(recipe: Recipe, need, check_files: bool) -> None:
    """The rollout servers, their GPUs and what SGLang takes."""
    rollout = recipe.rollout
    if rollout.engine == "sglang" and not rollout.colocate and rollout.gpus_per_node >= 1:
        nodes, gpus_per_node, _ = server_room(recipe)
        per_server = rollout.server_tp * rollout.server_dp
        where = (f"rollout.nodes {rollout.nodes} x rollout.gpus_per_node {gpus_per_node}" if rollout.nodes else
                 f"rollout.gpus_per_node {gpus_per_node} on each of the learner's {nodes} node(s) (rollout.nodes 0: "
                 "servers share the learner nodes, on the GPUs after the learner's)")
        need(per_server <= gpus_per_node, f"rollout.server_tp x server_dp = {per_server} GPUs do not fit one node's "
                                          f"{gpus_per_node} server GPUs ({where})")
        if per_server <= gpus_per_node:
            room = nodes * (gpus_per_node // per_server)
            need(rollout.servers <= room, f"rollout.servers: {rollout.servers} servers of {per_server} GPUs "
                                          f"(server_tp x server_dp) do not fit {where}: room for {room}")
    if rollout.engine == "sglang":
        per_server = rollout.server_tp * rollout.server_dp
        need(rollout.server_ep <= per_server,
             f"rollout.server_ep: {rollout.server_ep} exceeds the server's {per_server} GPUs")

    # SGLang 0.5.23's tokenizer manager asserts dp_size == 1 in /init_weights_update_group and
    # /update_weights_from_distributed (a 500 on the first sync, after step 0's rollout).
    need(rollout.weight_sync != "distributed" or rollout.engine != "sglang" or rollout.server_dp == 1,
         f"rollout.server_dp: SGLang takes no distributed weight updates into a server with "
         f"data-parallel replicas (server_dp {rollout.server_dp}); use more rollout.servers instead, or "
         "rollout.weight_sync disk")
    if rollout.sglang_python is not None:
        need(rollout.engine == "sglang", "rollout.sglang_python: only SGLang servers use it (rollout.engine is "
                                         f"{rollout.engine})")
        need(not check_files or os.access(rollout.sglang_python, os.X_OK),
             f"rollout.sglang_python: {rollout.sglang_python} is not an executable interpreter here")


def _colocation(recipe: Recipe, need) -> None:
    """Colocated servers (rollout.colocate) take turns with the learner on its own GPUs; tensor
    sync hands them the weights as handles that only processes of the learner's machine open."""
    rollout, trainer = recipe.rollout, recipe.trainer
    if not rollout.colocate:
        need(rollout.weight_sync != "tensor",
             "rollout.weight_sync: tensor hands the servers CUDA IPC / shared-memory handles, which only processes "
             "on the learner's own machine and GPUs can open: it needs rollout.colocate true (else use disk or "
             "distributed)")
        return
    need(trainer.max_staleness == 0,
         f"trainer.max_staleness: {trainer.max_staleness} with rollout.colocate: asynchronous rollouts generate "
         "while the learner trains, and colocated servers and the learner take turns on the same GPUs; use 0, or "
         "servers of their own (rollout.colocate false)")
    need(rollout.nodes == 0, f"rollout.nodes: colocated servers run on the learner nodes; set 0, got {rollout.nodes}")
    # A colocated server's receiving rank would share its GPU with the learner rank that sends.
    need(rollout.weight_sync != "distributed",
         "rollout.weight_sync: distributed with rollout.colocate: NCCL refuses two ranks of one communicator on one "
         "GPU, and a colocated server's receiver shares its GPU with the learner rank that sends; use tensor (or "
         "disk)")
    if rollout.engine == "sglang":
        _colocated_sglang_servers(recipe, need)


def _colocated_sglang_servers(recipe: Recipe, need) -> None:
    """Colocated SGLang servers cover the learner's GPUs, one per server_tp x server_dp of each node."""
    rollout, learner = recipe.rollout, recipe.learner
    per_server = rollout.server_tp * rollout.server_dp
    if learner.ranks_per_node % per_server:
        need(False, f"rollout.server_tp x server_dp: servers of {per_server} GPUs do not tile a learner node's "
                    f"{learner.ranks_per_node} GPUs (learner.ranks_per_node); colocated servers cover the learner's "
                    "GPUs, one per server_tp x server_dp of them")
    else:
        covering = learner.nodes * learner.ranks_per_node // per_server
        need(rollout.servers == covering,
             f"rollout.servers: {rollout.servers}, but colocated servers of {per_server} GPUs (server_tp x server_dp) "
             f"cover learner.nodes {learner.nodes} x learner.ranks_per_node {learner.ranks_per_node} GPUs with "
             f"{covering} (one per {per_server} GPUs of each node)")
    # SGLang 0.5.23's tokenizer manager asserts dp_size == 1 in /update_weights_from_tensor.
    need(rollout.weight_sync != "tensor" or rollout.server_dp == 1,
         f"rollout.server_dp: SGLang takes no tensor weight updates into a server with data-parallel replicas "
         f"(server_dp {rollout.server_dp}); use server_dp 1 (rollout.servers follows: one per server_tp GPUs)")


def _memory_plan(recipe: Recipe) -> list[str]:
    """The colocated memory plan's refusal (memory_plan.py), when the recipe has one."""
    if not plan_applies(recipe):
        return []
    try:
        arch = recipe_arch(recipe)
    except ArchError:  # already refused by _model
        return []
    return memory_plan(recipe, arch).problems()


def _keys(recipe: Recipe, need, check_files: bool) -> None:
    """The servers' keys go by file (keys.py), never on their command line."""
    rollout = recipe.rollout
    for flag in ("--api-key", "--admin-api-key", "--config"):
        need(not any(arg == flag or arg.startswith(flag + "=") for arg in rollout.extra_args),
             f"rollout.extra_args: {flag} is the run's to set (its keys go to the servers by file, not on a command "
             "line every user of the node can read); name your own key file in rollout.api_key_file")
    if rollout.api_key_file is not None:
        need(rollout.api_key_file.endswith((".yaml", ".yml")),
             f"rollout.api_key_file: {rollout.api_key_file} must be a .yaml file (SGLang reads it as its --config)")
    key_files = {"rollout.api_key_file": rollout.api_key_file, "reward.api_key_file": recipe.reward.api_key_file}
    for field, path in key_files.items():
        if check_files and path is not None:
            try:
                read_keys(path)
            except KeyFileError as error:
                need(False, f"{field}: {error}")


def _slurm_job(recipe: Recipe, need) -> None:
    """The SLURM job's own settings."""
    slurm = recipe.slurm
    need(slurm.gpus_per_node >= 0, f"slurm.gpus_per_node: must be >= 0, got {slurm.gpus_per_node}")
    need(slurm.signal_seconds >= 0, f"slurm.signal_seconds: must be >= 0, got {slurm.signal_seconds}")
    need(slurm.cpus_per_node is None or slurm.cpus_per_node >= 1,
         f"slurm.cpus_per_node: null or >= 1, got {slurm.cpus_per_node}")
    need(slurm.time is None or TIME_LIMIT.fullmatch(slurm.time) is not None,
         f"slurm.time: {slurm.time!r} is not a SLURM time limit; use minutes, HH:MM:SS or D-HH:MM:SS")
    for key in ("master_port", "agent_port"):
        port = getattr(slurm, key)
        need(1 <= port <= 65535, f"slurm.{key}: must be a port (1-65535), got {port}")
    need(slurm.master_port != slurm.agent_port, "slurm.master_port and slurm.agent_port must differ")
    for name in slurm.env:
        need(ENV_NAME.fullmatch(name) is not None, f"slurm.env.{name}: not a valid environment variable name")


def _data_and_rewards(recipe: Recipe, need, problems: list[str], check_files: bool) -> None:
    """The prompts (every row read now, not after the ranks start) and the reward."""
    model, rollout, trainer, data, reward = recipe.model, recipe.rollout, recipe.trainer, recipe.data, recipe.reward
    if data.generate is not None:
        need(data.train is None and data.eval is None, "data.generate: makes its own train/eval files; "
                                                       "leave data.train and data.eval unset")
        need(reward.kind not in BUILTIN or reward.kind == data.generate.task,
             f"reward.kind: data.generate.task {data.generate.task} is scored by reward.kind: {data.generate.task} "
             "(or your own: python, http)")
        need(model.tokenizer == TOY_TOKENIZER, f"model.tokenizer: toy tasks need {TOY_TOKENIZER!r}")
        need(data.generate.digits >= 1 and data.generate.train_rows >= 1, "data.generate: digits and train_rows must be >= 1")
    else:
        need(data.train is not None, "data.train: a prompt file is required (or data.generate for a toy task)")
        for key in ("train", "eval"):
            path = getattr(data, key)
            if path is not None and Path(path).is_file():  # every row read now, not after the ranks start
                try:
                    read_rows(path, data.prompt_key, data.answer_key)
                except DatasetError as error:
                    problems.append(f"data.{key}: {error}")
            elif path is not None:
                need(not check_files, f"data.{key}: no such file {path}")
    if trainer.eval_every:
        need(data.eval is not None or data.generate is not None,
             "trainer.eval_every: evaluation needs held-out prompts in data.eval")
    need(trainer.max_staleness >= 0, f"trainer.max_staleness: 0 (synchronous) or more steps, got "
                                      f"{trainer.max_staleness}")
    need(not trainer.wandb_project or importlib.util.find_spec("wandb") is not None,
         f"trainer.wandb_project: {trainer.wandb_project!r} is set but wandb is not installed (pip install wandb)")
    need(reward.timeout > 0, f"reward.timeout: must be > 0 seconds, got {reward.timeout}")
    need(reward.workers >= 0, f"reward.workers: 0 (one per core) or a count, got {reward.workers}")
    need(reward.retries >= 0, f"reward.retries: must be >= 0, got {reward.retries}")
    if reward.kind == "python":
        need(reward.function is not None and ":" in reward.function,
             f"reward.function: reward.kind python needs 'module:function', got {reward.function!r}")
        if check_files and reward.function is not None and ":" in reward.function:
            try:
                import_function(reward.function)
            except ValueError as error:
                need(False, str(error))
    if reward.kind == "http":
        need(reward.url is not None and HTTP_URL.match(reward.url) is not None,
             f"reward.url: reward.kind http needs an http(s):// URL, got {reward.url!r}")
    if reward.overlong == "penalty":
        need(0 < reward.overlong_buffer < rollout.max_new_tokens,
             f"reward.overlong_buffer: the penalty needs 0 < buffer < rollout.max_new_tokens ({rollout.max_new_tokens}), "
             f"got {reward.overlong_buffer}")


