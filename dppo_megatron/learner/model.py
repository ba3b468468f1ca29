"""Megatron Core GPTModel for Qwen3 dense and Qwen3-MoE, from a Hugging Face config."""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.model.layout import ParallelLayout


class RMSNorm(torch.nn.Module):
    """RMSNorm for Megatron's local (non-TransformerEngine) layer spec that also runs under
    sequence parallelism. Under SP each TP rank normalises its own part of the sequence with a
    replicated weight, so the weight is marked `sequence_parallel` and Megatron all-reduces its
    gradient over TP. Computes as transformers' Qwen3RMSNorm does (normalise in fp32, cast back,
    then scale), so that bf16 results match it too."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # q/k norms see whole sequences; Megatron sums their TP gradients by name instead.
        self.weight.sequence_parallel = config.sequence_parallel and hidden_size == config.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


@dataclass(frozen=True)
class ModelOptions:
    dtype: torch.dtype = torch.float32
    routing_replay: bool = False  # R3: replay the rollout engine's expert choices
    recompute: bool = False  # full activation recompute of every layer
    use_transformer_engine: bool | None = None  # None: when installed and on a GPU


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def transformer_config(arch: Qwen3Arch, layout: ParallelLayout, options: ModelOptions):
    from megatron.core.transformer import TransformerConfig

    moe = {}
    if arch.is_moe:
        moe = dict(
            num_moe_experts=arch.num_experts,
            moe_router_topk=arch.num_experts_per_tok,
            moe_ffn_hidden_size=arch.moe_intermediate_size,
            moe_layer_freq=[int(arch.is_moe_layer(layer)) for layer in range(arch.num_layers)],
            # Qwen3-MoE: softmax over all experts, top-k, renormalised when norm_topk_prob.
            # Megatron's default (top-k of the logits, then softmax over them) is the
            # renormalised form; pre-softmax is the other.
            moe_router_pre_softmax=not arch.norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="aux_loss" if arch.router_aux_loss_coef > 0 else "none",
            moe_aux_loss_coeff=arch.router_aux_loss_coef,
            moe_grouped_gemm=_use_te(options),
            moe_enable_routing_replay=options.routing_replay,
        )
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if options.recompute else {}
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.attention_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=options.dtype,
        pipeline_dtype=options.dtype,
        bf16=options.dtype == torch.bfloat16,
        fp16=options.dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # checked even for dense models with variable lengths
        cuda_graph_scope=[],  # the whole layer, as the default "full" (which Megatron now warns is deprecated)
        **moe,
        **recompute,
    )


def _use_te(options: ModelOptions) -> bool:
    if options.use_transformer_engine is None:
        return transformer_engine_available()
    if options.use_transformer_engine and not transformer_engine_available():
        raise RuntimeError(
            "use_transformer_engine=True needs a GPU and TransformerEngine (pip install 'dppo-megatron[gpu]')"
        )
    return options.use_transformer_engine


def block_spec(config, options: ModelOptions):
    """Megatron's decoder block spec (dense and MoE layers as the config's pattern says), with
    our RMSNorm in every norm slot on the local path."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    use_te = _use_te(options)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm")
    if use_te:
        return spec
    spec = copy.copy(spec)
    spec.layer_norm = RMSNorm
    layer_specs = []
    for layer_spec in spec.layer_specs:
        layer_spec = copy.deepcopy(layer_spec)
        sub = layer_spec.submodules
        sub.input_layernorm = RMSNorm
        sub.pre_mlp_layernorm = RMSNorm
        sub.self_attention.submodules.q_layernorm = RMSNorm
        sub.self_attention.submodules.k_layernorm = RMSNorm
        layer_specs.append(layer_spec)
    spec.layer_specs = layer_specs
    return spec


def build_model(arch: Qwen3Arch, layout: ParallelLayout, options: ModelOptions = ModelOptions()):
    """This rank's GPTModel (its pipeline stage, its TP/EP shards). Parallel state must be
    initialised (`init_parallel`)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.moe.router_replay import RouterReplay

    # Routers register themselves in a class-global list; a new model starts a new list.
    RouterReplay.clear_global_router_replay_instances()
    config = transformer_config(arch, layout, options)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, options),
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
