"""The memory plan of a colocated run (rollout.colocate with SGLang servers): what one GPU holds
while the servers generate and while the learner trains, against the GPU's memory
(learner.gpu_memory_gib). `validate` prints it; `check` refuses a plan whose peak phase does not
fit, before any process starts. Estimates, with the formulas written out below (docs/colocation.md).

The two phases (the servers and the learner take turns on the same GPUs):
- generating: SGLang's weights and KV cache, and the learner's weights; the learner's optimizer
  state and gradient buffers too, unless learner.offload_while_generating sends them to host
  memory (Megatron Core's optimizer.offload_to_cpu() and DDP offload_grad_buffers()).
- training: SGLang has released its weights and KV cache (what its CUDA context and
  torch_memory_saver keep stays); the learner holds weights, gradients, optimizer state and the
  activations of one micro-batch.

The items, per GPU (one learner rank):
- learner weights: parameters in model.dtype, the dense ones split over TP x PP, the experts over
  EP x ETP x PP.
- learner gradients: Megatron DDP's gradient buffers in fp32 (the learner sets
  grad_reduce_in_fp32), one value per local parameter; the distributed optimizer shards the
  optimizer state, not these buffers.
- learner optimizer state: Adam's two fp32 moments, and fp32 master weights for a bf16 model (12
  bytes per parameter, 8 in fp32), sharded over the data-parallel ranks (dense parameters) and
  the expert-data-parallel ranks (experts) with learner.distributed_optimizer.
- learner activations: the longest micro-batch, micro_batch_size x (data.max_prompt_len +
  rollout.max_new_tokens) tokens, split over TP by sequence parallelism. A layer keeps, per token,
  in the model's dtype: attention 2h + (2 heads + 2 kv_heads) head_dim (its input and normed
  input; q, k, v, the attention's output), dense MLP 2h + 3 I (input, normed; gate, up, the
  activation), MoE MLP 2h + k (h + 3 I_moe) (each of the k routed copies: input, gate, up,
  activation). With learner.recompute each layer keeps its input (h) and one layer at a time its
  whole set. Under PP the first stage keeps pp micro-batches in flight (1F1B): num_layers
  layers' worth in all, as without PP.
- learner logits: the micro-batch's vocab-parallel logits [tokens, V/TP] in the model's dtype and
  their gradient, plus the loss's fp32 working memory (learner.token_stats_memory_mib).
- SGLang weights: the whole model in rollout.dtype (auto: bf16, as Qwen3 checkpoints ship; float8:
  1 byte, the embeddings 2), split over server_tp.
- SGLang KV cache: what is left of rollout.mem_fraction of the GPU after SGLang's weights
  (--mem-fraction-static is the share of memory its weights and KV pool take: of the memory free
  when it starts, so on an empty GPU the whole GPU's, the most the plan can charge it).
- CUDA contexts and the like, fixed: the learner's (and NCCL's buffers), SGLang's (its CUDA
  graphs and the decode's activations while generating; released, what torch_memory_saver keeps).
"""

from __future__ import annotations

from dataclasses import dataclass

from dppo_megatron.config.placement import expert_tp, learner_world_size
from dppo_megatron.config.schema import Recipe
from dppo_megatron.model.arch import Qwen3Arch, parameter_counts

GIB = 1024**3
MIB = 1024**2
PHASES = ("generating", "training")
LEARNER_RUNTIME = 1.0 * GIB  # the learner's CUDA context and NCCL's buffers
SGLANG_RUNTIME = {"generating": 3.0 * GIB,  # CUDA context, CUDA graphs, the decode's activations
                  "training": 1.0 * GIB}  # released: its CUDA context and what torch_memory_saver keeps
WEIGHT_BYTES = {"bfloat16": 2, "float32": 4, "auto": 2, "float8": 1}
LAYOUT = ("learner.tp", "learner.ep", "learner.pp")  # the learner's sharding


@dataclass(frozen=True)
class PlanItem:
    name: str
    generating: float  # bytes resident while the servers generate (0: not on the GPU)
    training: float  # bytes resident while the learner trains
    fields: tuple[str, ...] = ()  # the recipe fields that size it or decide where it is

    def bytes_in(self, phase: str) -> float:
        return getattr(self, phase)


@dataclass(frozen=True)
class MemoryPlan:
    gpu_bytes: float
    items: tuple[PlanItem, ...]
    kv_tokens: int  # tokens the KV cache of one server (of each replica, with server_dp > 1) holds
    sequence_tokens: int  # the longest sequence: data.max_prompt_len + rollout.max_new_tokens
    offload: bool  # learner.offload_while_generating
    replicas: str = ""  # " replica" where servers have data-parallel replicas, each with its own KV cache

    def item(self, name: str) -> PlanItem:
        return next(item for item in self.items if item.name == name)

    def total(self, phase: str) -> float:
        return sum(item.bytes_in(phase) for item in self.items)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.total)

    def largest(self, phase: str) -> PlanItem:
        return max(self.items, key=lambda item: item.bytes_in(phase))

    def problems(self) -> list[str]:
        """Why the plan cannot run, as sentences naming the fields: a KV cache too small for one
        sequence, a peak phase over the GPU's memory."""
        out = []
        if self.kv_tokens < self.sequence_tokens:
            out.append(f"rollout.mem_fraction: SGLang's KV cache gets {self.item('SGLang KV cache').generating / GIB:.2f}"
                       f" GiB, room for {max(self.kv_tokens, 0)} tokens, less than one sequence of "
                       f"{self.sequence_tokens} (data.max_prompt_len + rollout.max_new_tokens): raise "
                       "rollout.mem_fraction or rollout.server_tp")
        phase = self.peak_phase
        if self.total(phase) > self.gpu_bytes:
            largest = self.largest(phase)
            field = largest.fields[0] if largest.fields else "learner.gpu_memory_gib"
            set_by = f" (set by {fields_text(largest.fields)})" if largest.fields else ""
            out.append(f"{field}: the memory plan's {phase} phase takes {self.total(phase) / GIB:.1f} GiB per GPU, "
                       f"more than the GPU's {self.gpu_bytes / GIB:g} GiB (learner.gpu_memory_gib); its largest item "
                       f"is {largest.name}, {largest.bytes_in(phase) / GIB:.1f} GiB{set_by}; all of them: "
                       f"{self._resident(phase)}. {self._remedy(phase)}")
        return out

    def _resident(self, phase: str) -> str:
        """The phase's items, largest first, in GiB."""
        resident = sorted((item for item in self.items if item.bytes_in(phase)), key=lambda item: -item.bytes_in(phase))
        return ", ".join(f"{item.name} {item.bytes_in(phase) / GIB:.1f}" for item in resident) + " GiB"

    def _remedy(self, phase: str) -> str:
        if phase == "training":
            return ("Shard the learner further (learner.tp, learner.ep, learner.pp, learner.distributed_optimizer) "
                    "or shrink its activations (learner.recompute, learner.micro_batch_size)")
        if not self.offload:
            return "Turn on learner.offload_while_generating or lower rollout.mem_fraction"
        return "Lower rollout.mem_fraction, or shard the learner's weights further (learner.tp, learner.ep)"


def fields_text(fields: tuple[str, ...]) -> str:
    """The fields, the learner's layout as one: learner.tp/ep/pp."""
    if set(LAYOUT) <= set(fields):
        at = fields.index(LAYOUT[0])
        fields = fields[:at] + ("learner.tp/ep/pp",) + tuple(f for f in fields[at:] if f not in LAYOUT)
    return ", ".join(fields) or "(fixed)"


def plan_applies(recipe: Recipe) -> bool:
    """Only colocated SGLang servers share the learner's GPU memory (the embedded engine is CPU)."""
    return recipe.rollout.colocate and recipe.rollout.engine == "sglang"


@dataclass(frozen=True)
class LearnerStates:
    """Bytes per learner GPU of the states that scale with the model (activations aside)."""

    weights: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def learner_states(recipe: Recipe, arch: Qwen3Arch) -> LearnerStates:
    learner = recipe.learner
    world = learner_world_size(recipe)
    dense, experts = parameter_counts(arch)
    etp = expert_tp(learner)
    dense_local = dense / (learner.tp * learner.pp)
    expert_local = experts / (learner.ep * etp * learner.pp)
    weight_bytes = WEIGHT_BYTES[recipe.model.dtype]
    # Adam's moments in fp32, plus fp32 master weights when training in bf16.
    optimizer_bytes = 12 if recipe.model.dtype == "bfloat16" else 8
    dense_dp = world // (learner.tp * learner.pp) if learner.distributed_optimizer else 1
    expert_dp = world // (learner.ep * etp * learner.pp) if learner.distributed_optimizer else 1
    return LearnerStates(weights=(dense_local + expert_local) * weight_bytes,
                         grads=(dense_local + expert_local) * 4,  # grad_reduce_in_fp32: fp32 main_grad buffers
                         optimizer=optimizer_bytes * (dense_local / dense_dp + expert_local / expert_dp))


def sequence_tokens(recipe: Recipe) -> int:
    return recipe.data.max_prompt_len + recipe.rollout.max_new_tokens


def layer_values_per_token(arch: Qwen3Arch, layer: int) -> int:
    """Values one layer keeps per token for its backward (see the module's docstring)."""
    h = arch.hidden_size
    attention = 2 * h + (2 * arch.num_attention_heads + 2 * arch.num_key_value_heads) * arch.head_dim
    if arch.is_moe_layer(layer):
        return attention + 2 * h + arch.num_experts_per_tok * (h + 3 * arch.moe_intermediate_size)
    return attention + 2 * h + 3 * arch.intermediate_size


def activation_bytes(recipe: Recipe, arch: Qwen3Arch) -> float:
    learner = recipe.learner
    tokens = learner.micro_batch_size * sequence_tokens(recipe) / learner.tp  # sequence parallel
    per_layer = [layer_values_per_token(arch, layer) for layer in range(arch.num_layers)]
    if learner.recompute:  # every layer's input, and one layer's whole set while it is recomputed
        values = arch.num_layers * arch.hidden_size + max(per_layer)
    else:
        values = sum(per_layer)
    return tokens * values * WEIGHT_BYTES[recipe.model.dtype]


def logits_bytes(recipe: Recipe, arch: Qwen3Arch) -> float:
    learner = recipe.learner
    tokens = learner.micro_batch_size * sequence_tokens(recipe)  # the output layer gathers the sequence
    logits = tokens * arch.padded_vocab_size / learner.tp * WEIGHT_BYTES[recipe.model.dtype]
    return 2 * logits + learner.token_stats_memory_mib * MIB  # the logits, their gradient, the loss's chunks


def sglang_weight_bytes(recipe: Recipe, arch: Qwen3Arch) -> float:
    dense, experts = parameter_counts(arch)
    total = (dense + experts) * WEIGHT_BYTES[recipe.rollout.dtype]
    if recipe.rollout.dtype == "float8":  # only the blocks' linear weights are float8
        embeddings = arch.padded_vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
        total += embeddings
    return total / recipe.rollout.server_tp


def kv_bytes_per_token(recipe: Recipe, arch: Qwen3Arch) -> int:
    """One GPU's KV cache bytes per token: its share of the KV heads (a head is copied where
    server_tp exceeds them), K and V, every layer."""
    heads = max(1, arch.num_key_value_heads // recipe.rollout.server_tp)
    dtype_bytes = 4 if recipe.rollout.dtype == "float32" else 2  # float8 rollouts keep a bf16 KV cache
    return arch.num_layers * 2 * heads * arch.head_dim * dtype_bytes


def memory_plan(recipe: Recipe, arch: Qwen3Arch) -> MemoryPlan:
    learner, rollout = recipe.learner, recipe.rollout
    gpu = learner.gpu_memory_gib * GIB
    states = learner_states(recipe, arch)
    kept = 0.0 if learner.offload_while_generating else 1.0  # while generating, unless offloaded
    offload = ("learner.offload_while_generating",)
    sglang_weights = sglang_weight_bytes(recipe, arch)
    kv_cache = rollout.mem_fraction * gpu - sglang_weights
    items = (
        PlanItem("learner weights", states.weights, states.weights, LAYOUT + ("model.dtype",)),
        PlanItem("learner gradients", kept * states.grads, states.grads, LAYOUT + offload),
        PlanItem("learner optimizer state", kept * states.optimizer, states.optimizer,
                 ("learner.distributed_optimizer",) + LAYOUT + offload),
        PlanItem("learner activations", 0.0, activation_bytes(recipe, arch),
                 ("learner.micro_batch_size", "learner.recompute", "data.max_prompt_len", "rollout.max_new_tokens")),
        PlanItem("learner logits", 0.0, logits_bytes(recipe, arch),
                 ("learner.micro_batch_size", "learner.tp", "learner.token_stats_memory_mib")),
        PlanItem("learner CUDA context", LEARNER_RUNTIME, LEARNER_RUNTIME),
        PlanItem("SGLang weights", sglang_weights, 0.0, ("rollout.server_tp", "rollout.dtype")),
        PlanItem("SGLang KV cache", max(kv_cache, 0.0), 0.0, ("rollout.mem_fraction",)),
        PlanItem("SGLang runtime", SGLANG_RUNTIME["generating"], SGLANG_RUNTIME["training"]),
    )
    return MemoryPlan(gpu_bytes=gpu, items=items, kv_tokens=int(kv_cache // kv_bytes_per_token(recipe, arch)),
                      sequence_tokens=sequence_tokens(recipe), offload=learner.offload_while_generating,
                      replicas=" replica" if rollout.server_dp > 1 else "")


def plan_table(plan: MemoryPlan) -> list[str]:
    """The plan as `validate` prints it: each item in each phase (- where it is not on the GPU),
    the phases' totals against the GPU, the peak and what SGLang's KV cache holds."""
    width = max(len(item.name) for item in plan.items) + 2

    def cell(value: float) -> str:
        return f"{value / GIB:>12.2f}" if value else f"{'-':>12}"

    lines = [f"{'item':<{width}}{'generating':>12}{'training':>12}  set by"]
    for item in plan.items:
        lines.append(f"{item.name:<{width}}{cell(item.generating)}{cell(item.training)}  "
                     + fields_text(item.fields))
    lines.append(f"{'total':<{width}}{cell(plan.total('generating'))}{cell(plan.total('training'))}  "
                 f"of {plan.gpu_bytes / GIB:.2f} (learner.gpu_memory_gib)")
    peak = plan.peak_phase
    spare = plan.gpu_bytes - plan.total(peak)
    verdict = f"fits, {spare / GIB:.2f} GiB to spare" if spare >= 0 else f"does not fit, {-spare / GIB:.2f} GiB over"
    lines.append(f"peak: {peak}, {plan.total(peak) / GIB:.2f} of {plan.gpu_bytes / GIB:.2f} GiB: {verdict}")
    lines.append(f"SGLang KV cache: {max(plan.kv_tokens, 0):,} tokens per server{plan.replicas}, "
                 f"{max(plan.kv_tokens, 0) // plan.sequence_tokens} sequences of {plan.sequence_tokens} tokens")
    return lines
