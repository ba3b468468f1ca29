"""The recipe schema: one typed dataclass per section. Each field's `help` is its documentation
(docs/recipes.md is generated from it); `check` in `validate.py` holds the rules that span
fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dppo_megatron.algo.policy_loss import AGGREGATIONS
from dppo_megatron.algo.trust_region import TRUST_REGIONS

LOSS_MODES = tuple(TRUST_REGIONS)


def doc(help: str, default=None, **kwargs):
    """A field with its documentation."""
    if "default_factory" in kwargs:
        return field(metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class RandomInit:
    architecture: Literal["qwen3", "qwen3_moe"] = doc("dense Qwen3 or Qwen3-MoE", "qwen3_moe")
    hidden_size: int = doc("model width", 64)
    num_layers: int = doc("decoder layers", 2)
    num_attention_heads: int = doc("query heads", 4)
    num_key_value_heads: int = doc("key/value heads (GQA)", 2)
    head_dim: int = doc("width of one head", 16)
    intermediate_size: int = doc("dense MLP width", 128)
    moe_intermediate_size: int = doc("expert MLP width (MoE)", 64)
    num_experts: int = doc("experts per MoE layer (MoE)", 4)
    num_experts_per_tok: int = doc("experts each token is routed to (MoE)", 2)
    mlp_only_layers: list[int] = doc("layers with a dense MLP inside a MoE model", default_factory=list)
    init_std: float = doc("std of the random weights", 0.02)


@dataclass
class ModelConfig:
    path: str | None = doc("local Hugging Face checkpoint directory (on a filesystem every node shares, for a "
                           "cluster job); a hub id is not downloaded: fetch it first with huggingface-cli download")
    random_init: RandomInit | None = doc("build a tiny model with random weights instead (CPU recipes); "
                                         "its vocabulary is the tokenizer's")
    tokenizer: str | None = doc("tokenizer directory or hub id; default: model.path; `toy-digits` makes "
                                "the toy tasks' word-level tokenizer locally")
    dtype: Literal["float32", "bfloat16"] = doc("learner parameter dtype", "bfloat16")


@dataclass
class LearnerConfig:
    nodes: int = doc("learner nodes", 1)
    ranks_per_node: int = doc("learner processes per node: GPUs per node, or CPU processes", 8)
    tp: int = doc("tensor parallel size (sequence parallel is on with it)", 1)
    pp: int = doc("pipeline parallel size", 1)
    ep: int = doc("expert parallel size", 1)
    etp: int | None = doc("expert tensor parallel size; default: 1 with ep > 1, tp with ep 1 (then the only "
                           "correct value)", None)
    distributed_optimizer: bool = doc("shard optimizer state over data-parallel ranks", True)
    recompute: bool = doc("recompute activations in the backward (full layers)", False)
    micro_batch_size: int = doc("sequences per micro-batch", 1)
    transformer_engine: bool = doc("use TransformerEngine layers when it is installed and a GPU is present", True)
    offload_while_generating: bool = doc("colocated runs (rollout.colocate): the optimizer state and the gradient "
                                         "buffers go to host memory while the servers generate on the learner's "
                                         "GPUs, and come back for the step (no effect on CPU learners)", True)
    token_stats_memory_mib: int = doc("fp32 working memory of the loss's token statistics (log pi, entropy, top-K) "
                                      "per call, beyond the logits' gradient: sets their chunk of tokens", 256)
    gpu_memory_gib: float = doc("memory of one GPU in GiB, for the colocated memory plan `validate` prints "
                                "(80: an H100/A100 80GB; 141: an H200)", 80.0)


@dataclass
class OptimConfig:
    lr: float = doc("peak learning rate", 1e-6)
    min_lr: float = doc("learning rate at the end of the decay", 0.0)
    warmup_steps: int = doc("optimizer steps of linear warm-up", 0)
    decay_style: Literal["constant", "linear", "cosine"] = doc("decay after warm-up, over the run", "constant")
    weight_decay: float = doc("AdamW weight decay", 0.0)
    adam_beta1: float = doc("Adam beta1", 0.9)
    adam_beta2: float = doc("Adam beta2", 0.999)
    adam_eps: float = doc("Adam epsilon", 1e-8)
    clip_grad: float = doc("gradient-norm clip (0: off)", 1.0)


@dataclass
class LossSection:
    mode: Literal[LOSS_MODES] = doc("trust region / policy loss (see docs/algorithm.md)", "dppo_binary_tv")
    low: float = doc("threshold for A < 0 tokens (TV 0.15, KL 0.05, clip 0.2)", 0.15)
    high: float = doc("threshold for A > 0 tokens (TV 0.15, KL 0.05, clip-higher 0.28)", 0.15)
    ratio_cap: float | None = doc("truncate the importance weight pi/mu at this (null: no truncation, as the "
                                  "authors' runs; pg_tis needs one)", None)
    relax_below: float | None = doc("grpo_relax_* modes: keep ratio-clipped tokens on the relaxed side whose "
                                    "rollout probability is below this", None)
    aggregation: Literal[AGGREGATIONS] = doc("how token losses are averaged; seq-mean-token-sum-norm is Dr.GRPO",
                                             "token-mean")
    normalize_std: bool = doc("divide group advantages by the group's std (GRPO); false is Dr.GRPO", False)


@dataclass
class RolloutConfig:
    engine: Literal["sglang", "embedded"] = doc("SGLang servers (GPU) or the embedded engine (CPU)", "sglang")
    r3: bool = doc("rollout routing replay: engines return routes, the learner replays them (MoE)", False)
    record_routes: bool = doc("with r3 off, still fetch the engines' routes to log train/routing_agreement "
                              "(MoE; costs the transfer of the routes)", False)
    n: int = doc("responses per prompt (the group of group advantages)", 16)
    max_new_tokens: int = doc("longest response, in tokens", 8192)
    temperature: float = doc("sampling temperature", 1.0)
    top_p: float = doc("nucleus sampling (1: off)", 1.0)
    top_k: int = doc("sample from the k most likely tokens (-1: off)", -1)
    topk_logprobs: int = doc("K: the engine's top-K logprobs per token (needed by dppo_topk_* modes)", 20)
    topk_b64: bool = doc("ask for the top-K as flat base64 arrays (SGLang's return_flat_raw_top_logprobs_b64, "
                         "in 0.5.23); false: one JSON triple per entry, for older SGLang releases", True)
    servers: int = doc("rollout servers", 1)
    server_tp: int = doc("tensor parallel size inside one server", 1)
    server_dp: int = doc("data parallel replicas inside one server", 1)
    server_ep: int = doc("expert parallel size inside one server", 1)
    nodes: int = doc("nodes for rollout servers (0: share the learner nodes, on the GPUs after the learner's; "
                     "colocated: on the learner's own GPUs)", 0)
    gpus_per_node: int = doc("GPUs per rollout node; with rollout.nodes 0, the GPUs of each learner node after "
                             "the learner's own ranks (ignored when colocated: the servers take the learner's)", 8)
    mem_fraction: float = doc("SGLang --mem-fraction-static: the fraction of a GPU's memory its weights and KV "
                              "cache take (colocated: checked in the memory plan `validate` prints)", 0.85)
    deterministic: bool = doc("SGLang --enable-deterministic-inference: honour each response's sampling seed, so a "
                              "resumed step samples the same tokens (off: SGLang ignores the seeds; slower on)", False)
    dtype: Literal["auto", "float32", "bfloat16", "float8"] = doc(
        "engine dtype (auto: the checkpoint's; float8: the blocks' linear weights in float8 e4m3 with per-channel "
        "scales, as FP8 rollouts: SGLang --quantization fp8, the embedded engine the same numbers on the CPU)", "auto")
    host: str = doc("interface servers bind to (any but loopback needs the run's keys, which every run has)",
                    "127.0.0.1")
    api_key_file: str | None = doc("YAML file (mode 0600) with `api-key` and optionally `admin-api-key`: the keys "
                                   "the run's servers ask for (null: the run makes its own, RUN/keys.yaml)")
    base_port: int = doc("port of the first server; the others count up", 30000)
    colocate: bool = doc("the servers run on the learner's own GPUs (one per server_tp x server_dp GPUs of each "
                         "learner node, from GPU 0; rollout.nodes 0, rollout.gpus_per_node ignored) "
                         "and take turns with it: they generate, release their memory (weights, KV cache), the "
                         "learner trains, they resume and take the new weights (synchronous only; see "
                         "docs/colocation.md)", False)
    weight_sync: Literal["disk", "distributed", "tensor"] = doc(
        "how new weights reach the servers: disk (an HF checkpoint each step), distributed (a broadcast through "
        "NCCL/gloo groups), tensor (shared-memory / CUDA IPC handles, /update_weights_from_tensor: colocated runs)",
        "disk")
    requests_per_call: int = doc("requests batched into one /generate call", 16)
    request_timeout: float = doc("seconds for one /generate answer", 1800.0)
    max_in_flight_per_server: int = doc("concurrent /generate calls per server", 64)
    extra_args: list[str] = doc("extra command-line arguments for every server", default_factory=list)
    sglang_python: str | None = doc("interpreter that runs `-m sglang.launch_server`: SGLang's own environment "
                                    "where it is not the trainer's (null: the trainer's interpreter)")


@dataclass
class ToyData:
    task: Literal["reverse_digits"] = doc("the toy task", "reverse_digits")
    digits: int = doc("digits per prompt", 3)
    train_rows: int = doc("training prompts", 1000)
    eval_rows: int = doc("held-out prompts", 64)


@dataclass
class DataConfig:
    train: str | None = doc("training prompts: a .jsonl or .parquet file")
    eval: str | None = doc("held-out prompts for evaluation (same fields)")
    generate: ToyData | None = doc("generate a toy task's train/eval files into the run directory")
    prompt_key: str = doc("field with the prompt: a string, or a list of chat messages; dots reach inside", "prompt")
    answer_key: str = doc("field with the reference answer; dots reach inside", "answer")
    chat_template: bool = doc("apply the tokenizer's chat template when it has one", True)
    enable_thinking: bool | None = doc("the chat template's thinking switch (Qwen3): true for thinking mode, false "
                                       "for answers without a <think> block; null: the template's default")
    max_prompt_len: int = doc("longer prompts are skipped (with a count in the log)", 2048)
    shuffle: bool = doc("shuffle prompts each epoch (seeded by trainer.seed)", True)


@dataclass
class RewardConfig:
    kind: Literal["math", "reverse_digits", "python", "http"] = doc(
        "math: math-verify on the boxed answer; reverse_digits: toy; python: reward.function; http: reward.url", "math")
    function: str | None = doc("python: `module:function` called as f(response_text, answer) -> float (the "
                               "module is imported from the run's working directory or PYTHONPATH)")
    url: str | None = doc("http: reward server that answers a POST of {response, answer} with {reward}")
    api_key_file: str | None = doc("http: YAML file (mode 0600) with `api-key: <secret>`, sent to the reward server "
                                   "as a Bearer token (null: no key)")
    retries: int = doc("http: attempts after a connection error, timeout or 5xx", 3)
    timeout: float = doc("seconds allowed to score one response; past it (plus 1 s) the response scores 0 and "
                         "its worker is replaced", 5.0)
    workers: int = doc("reward worker processes on the node of learner rank 0, scoring while the servers "
                       "generate (0: one per core)", 0)
    overlong: Literal["keep", "drop", "penalty"] = doc("responses cut at max_new_tokens: train on them, drop "
                                                       "them, or DAPO's soft penalty", "keep")
    overlong_buffer: int = doc("penalty: tokens before max_new_tokens where the penalty ramps up", 0)
    overlong_penalty: float = doc("penalty: reward lost at max_new_tokens", 1.0)


@dataclass
class TrainerConfig:
    steps: int = doc("training steps (one rollout batch each)", 100)
    prompts_per_step: int = doc("prompts per rollout batch", 256)
    mini_batches: int = doc("optimizer steps per rollout batch", 1)
    seed: int = doc("seed of data order, sampling and model init", 1234)
    dynamic_sampling: bool = doc("drop groups whose rewards are all equal (no signal)", False)
    max_staleness: int = doc("asynchronous rollouts: the servers generate step k + N's batch while the learner "
                             "trains step k, so step k trains on samples of the weights of step k - N (0: "
                             "synchronous; see docs/training.md)", 0)
    save_every: int = doc("checkpoint every N steps (0: only on exit)", 10)
    save_at_end: bool = doc("checkpoint after the last step (false: a run that keeps nothing, as a preflight)", True)
    keep_checkpoints: int = doc("complete checkpoints kept", 2)
    eval_every: int = doc("evaluate every N steps (0: never)", 0)
    eval_n: int = doc("responses per held-out prompt: mean reward and avg@k", 4)
    eval_temperature: float | None = doc("sampling temperature of the evaluation (null: rollout.temperature)")
    eval_top_p: float | None = doc("nucleus sampling of the evaluation (null: rollout.top_p)")
    export_every: int = doc("write an HF checkpoint every N steps (0: never)", 0)
    run_dir: str | None = doc("run directory (default runs/<name>-<timestamp>)")
    tensorboard: bool = doc("write TensorBoard events", True)
    wandb_project: str | None = doc("log to this wandb project (needs wandb installed)")


@dataclass
class SlurmConfig:
    partition: str | None = doc("partition (--partition); default: the cluster's default partition")
    account: str | None = doc("account charged for the job (--account)")
    time: str | None = doc("time limit: minutes, HH:MM:SS or D-HH:MM:SS (--time); default: the partition's")
    gpus_per_node: int = doc("GPUs the job asks for on each node (--gpus-per-node); 0 for a CPU job", 8)
    cpus_per_node: int | None = doc("CPUs on each node (--cpus-per-task of the one task per node); default: "
                                    "all of them, with exclusive")
    exclusive: bool = doc("whole nodes (--exclusive)", True)
    requeue: bool = doc("after a stop on SLURM's warning signal (time limit, preemption) and its checkpoint, "
                        "requeue the job, which resumes by itself", True)
    signal_seconds: int = doc("warn the job this many seconds before its time limit (--signal=B:USR1@N): the "
                              "trainer checkpoints at the end of its step and exits (0: no warning)", 300)
    env: dict[str, str] = doc("environment of every process of the job: NCCL settings (NCCL_SOCKET_IFNAME, "
                              "NCCL_IB_HCA, ...), cache directories", default_factory=dict)
    setup: list[str] = doc("shell lines the job runs before anything else (module load, source venv/bin/activate)",
                           default_factory=list)
    python: str | None = doc("Python interpreter on the nodes; default: the one that runs `submit`")
    master_port: int = doc("port of the learner's rendezvous on the first learner node", 29500)
    agent_port: int = doc("port of the server agent (`serve-node`) on each node that runs rollout servers", 29400)
    sbatch_args: list[str] = doc("more sbatch options, e.g. [--qos=high, --constraint=h100]", default_factory=list)
    template: str | None = doc("sbatch template to render; default launch/slurm/job.sbatch of this checkout")


@dataclass
class Recipe:
    name: str = doc("recipe name (used for the run directory)", "run")
    model: ModelConfig = doc("the policy model", default_factory=ModelConfig)
    learner: LearnerConfig = doc("Megatron learner layout", default_factory=LearnerConfig)
    optim: OptimConfig = doc("optimizer and schedule", default_factory=OptimConfig)
    loss: LossSection = doc("policy loss", default_factory=LossSection)
    rollout: RolloutConfig = doc("rollout servers and sampling", default_factory=RolloutConfig)
    data: DataConfig = doc("prompt datasets", default_factory=DataConfig)
    reward: RewardConfig = doc("rewards", default_factory=RewardConfig)
    trainer: TrainerConfig = doc("the loop", default_factory=TrainerConfig)
    slurm: SlurmConfig = doc("the job `dppo-megatron submit` makes (SLURM clusters)", default_factory=SlurmConfig)
