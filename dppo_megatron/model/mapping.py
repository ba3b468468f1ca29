"""The one table between Hugging Face and Megatron Core tensor names for Qwen3 / Qwen3-MoE.

Each entry is one Megatron tensor in its unsharded form (global layer and expert indices, the
layout of a TP=1 model) with the HF tensors it is made of and how they combine:
- `copy`: the same tensor;
- `vocab`: embedding / output rows, zero-padded to the padded vocabulary;
- `qkv`: q, k, v projections interleaved per query group, as Megatron's linear_qkv holds them
  ([q heads of group 0, k of group 0, v of group 0, q heads of group 1, ...]);
- `gate_up`: gate and up projections stacked, as linear_fc1 holds them with gated units.
Conversion, checkpoint export and the weight sync to rollout servers all use this table.
Plain torch: no Megatron.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from dppo_megatron.model.arch import Qwen3Arch


# The decoder layer of a Megatron tensor name ("decoder.layers.<index>.").
MEGATRON_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_HF_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.)(\d+)\.(gate|up|down)_proj\.weight$")


@dataclass(frozen=True)
class TensorMap:
    megatron: str
    hf: tuple[str, ...]
    combine: str  # "copy" | "vocab" | "qkv" | "gate_up"
    shape: tuple[int, ...]  # the unsharded Megatron shape


def tensor_map(arch: Qwen3Arch) -> list[TensorMap]:
    """Every Megatron tensor of the full model, in a fixed order (embedding, layers, final
    norm, output layer)."""
    hidden, head_dim = arch.hidden_size, arch.head_dim
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_key_value_heads) * head_dim
    entries = [
        TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab",
                  (arch.padded_vocab_size, hidden)),
    ]
    for layer in range(arch.num_layers):
        mc, hf = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        attn = hf + "self_attn."
        entries += [
            TensorMap(mc + "input_layernorm.weight", (hf + "input_layernorm.weight",), "copy", (hidden,)),
            TensorMap(mc + "self_attention.linear_qkv.weight",
                      (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"), "qkv",
                      (qkv_rows, hidden)),
        ]
        if arch.attention_bias:
            entries.append(TensorMap(mc + "self_attention.linear_qkv.bias",
                                     (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"), "qkv",
                                     (qkv_rows,)))
        entries += [
            TensorMap(mc + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",), "copy", (head_dim,)),
            TensorMap(mc + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",), "copy", (head_dim,)),
            TensorMap(mc + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), "copy",
                      (hidden, arch.num_attention_heads * head_dim)),
            TensorMap(mc + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",), "copy", (hidden,)),
        ]
        if arch.is_moe_layer(layer):
            ffn = arch.moe_intermediate_size
            entries.append(TensorMap(mc + "mlp.router.weight", (hf + "mlp.gate.weight",), "copy",
                                     (arch.num_experts, hidden)))
            for expert in range(arch.num_experts):
                me, he = f"{mc}mlp.experts.local_experts.{expert}.", f"{hf}mlp.experts.{expert}."
                entries += [
                    TensorMap(me + "linear_fc1.weight", (he + "gate_proj.weight", he + "up_proj.weight"), "gate_up",
                              (2 * ffn, hidden)),
                    TensorMap(me + "linear_fc2.weight", (he + "down_proj.weight",), "copy", (hidden, ffn)),
                ]
        else:
            ffn = arch.intermediate_size
            entries += [
                TensorMap(mc + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                          "gate_up", (2 * ffn, hidden)),
                TensorMap(mc + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), "copy", (hidden, ffn)),
            ]
    entries.append(TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), "copy", (hidden,)))
    if not arch.tie_word_embeddings:
        entries.append(TensorMap("output_layer.weight", ("lm_head.weight",), "vocab", (arch.padded_vocab_size, hidden)))
    return entries


def hf_tensor_names(arch: Qwen3Arch) -> list[str]:
    """Every tensor name a Hugging Face checkpoint of this architecture holds."""
    return [name for entry in tensor_map(arch) for name in entry.hf]


def to_megatron(entry: TensorMap, hf_tensors: list[torch.Tensor], arch: Qwen3Arch) -> torch.Tensor:
    """The unsharded Megatron tensor of `entry` from its HF tensors (in `entry.hf` order)."""
    if entry.combine == "copy":
        (tensor,) = hf_tensors
    elif entry.combine == "vocab":
        (rows,) = hf_tensors
        tensor = rows.new_zeros(entry.shape)
        tensor[: rows.shape[0]] = rows
    elif entry.combine == "qkv":
        q, k, v = hf_tensors
        groups = arch.num_key_value_heads
        trailing = q.shape[1:]
        tensor = torch.cat(
            [q.reshape(groups, -1, *trailing), k.reshape(groups, -1, *trailing), v.reshape(groups, -1, *trailing)],
            dim=1,
        ).reshape(-1, *trailing)
    elif entry.combine == "gate_up":
        tensor = torch.cat(hf_tensors, dim=0)
    else:
        raise ValueError(f"unknown combine rule {entry.combine!r}")
    if tuple(tensor.shape) != entry.shape:
        raise ValueError(
            f"{entry.megatron}: built shape {tuple(tensor.shape)} from {list(entry.hf)}, expected {entry.shape}"
        )
    return tensor


def to_hf(entry: TensorMap, tensor: torch.Tensor, arch: Qwen3Arch) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors of `entry` from its unsharded Megatron tensor."""
    if entry.combine == "copy":
        parts = [tensor]
    elif entry.combine == "vocab":
        parts = [tensor[: arch.vocab_size]]
    elif entry.combine == "qkv":
        groups, head_dim = arch.num_key_value_heads, arch.head_dim
        q_rows = arch.num_attention_heads // groups * head_dim
        grouped = tensor.reshape(groups, q_rows + 2 * head_dim, *tensor.shape[1:])
        q, k, v = grouped.split([q_rows, head_dim, head_dim], dim=1)
        parts = [p.reshape(-1, *tensor.shape[1:]) for p in (q, k, v)]
    elif entry.combine == "gate_up":
        parts = list(tensor.chunk(2, dim=0))
    else:
        raise ValueError(f"unknown combine rule {entry.combine!r}")
    return [(name, part.contiguous()) for name, part in zip(entry.hf, parts)]


def hf_expert_tensor(name: str) -> tuple[str, int, str] | None:
    """For a Qwen3-MoE expert tensor of a HF checkpoint (`model.layers.L.mlp.experts.E.gate_proj.weight`):
    (its layer's `model.layers.L.mlp.experts.` prefix, E, "gate" | "up" | "down"); None for any other name."""
    match = _HF_EXPERT.match(name)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None
