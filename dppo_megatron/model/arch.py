"""The architecture of a Qwen3 / Qwen3-MoE model, read from a Hugging Face config.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
# Megatron splits the vocabulary over TP ranks. Padding to a fixed multiple (rather than to
# 128 * TP as Megatron-LM does) keeps the padded size, and so the checkpoint, the same at
# every TP that divides it: any power of two up to 1024.
VOCAB_PAD_MULTIPLE = 1024


class ArchError(ValueError):
    """A config.json this project cannot build a model from."""


@dataclass(frozen=True)
class Qwen3Arch:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = field(default_factory=tuple)
    router_aux_loss_coef: float = 0.0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    def is_moe_layer(self, layer: int) -> bool:
        """Qwen3-MoE's rule: a layer is sparse unless listed in mlp_only_layers, every
        decoder_sparse_step-th layer."""
        return (
            self.is_moe
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer in range(self.num_layers) if self.is_moe_layer(layer)]

    @classmethod
    def from_hf(cls, config: dict | str | Path) -> "Qwen3Arch":
        """From a config.json dict, the file, or the directory holding it. Reads both the
        transformers 4 names (num_experts, rope_theta) and the 5 names (num_local_experts,
        rope_parameters.rope_theta)."""
        source = "config"
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ArchError(f"no config.json at {path}")
            source = str(path)
            config = json.loads(path.read_text())
        architectures = config.get("architectures") or []
        architecture = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if architecture is None:
            raise ArchError(
                f"{source}: architectures {architectures} is none of the supported {list(SUPPORTED_ARCHITECTURES)}"
            )

        def need(key: str):
            if key not in config:
                raise ArchError(f"{source}: missing required field {key!r} for {architecture}")
            return config[key]

        rope = config.get("rope_parameters") or {}
        rope_theta = config.get("rope_theta", rope.get("rope_theta"))
        if rope_theta is None:
            raise ArchError(f"{source}: missing rope_theta (or rope_parameters.rope_theta)")
        rope_type = rope.get("rope_type", (config.get("rope_scaling") or {}).get("rope_type", "default"))
        if rope_type not in ("default", None):
            raise ArchError(f"{source}: rope scaling {rope_type!r} is not supported (only plain RoPE)")
        hidden, heads = need("hidden_size"), need("num_attention_heads")
        common = dict(
            architecture=architecture,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            num_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or hidden // heads,
            intermediate_size=need("intermediate_size"),
            rms_norm_eps=need("rms_norm_eps"),
            rope_theta=float(rope_theta),
            max_position_embeddings=need("max_position_embeddings"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
        )
        if architecture == "Qwen3MoeForCausalLM":
            experts = config.get("num_experts", config.get("num_local_experts"))
            if not experts:
                raise ArchError(f"{source}: missing num_experts (or num_local_experts)")
            common.update(
                num_experts=experts,
                num_experts_per_tok=need("num_experts_per_tok"),
                moe_intermediate_size=need("moe_intermediate_size"),
                norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                decoder_sparse_step=config.get("decoder_sparse_step", 1) or 1,
                mlp_only_layers=tuple(config.get("mlp_only_layers") or ()),
                router_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.0)),
            )
        return cls(**common)


def parameter_counts(arch: Qwen3Arch) -> tuple[int, int]:
    """(dense parameters, expert parameters) of the whole model."""
    h, hd = arch.hidden_size, arch.head_dim
    attention = h * hd * (2 * arch.num_attention_heads + 2 * arch.num_key_value_heads) + 2 * h + 2 * hd
    dense = arch.padded_vocab_size * h * (1 if arch.tie_word_embeddings else 2) + h
    experts = 0
    for layer in range(arch.num_layers):
        dense += attention
        if arch.is_moe_layer(layer):
            dense += h * arch.num_experts
            experts += arch.num_experts * 3 * h * arch.moe_intermediate_size
        else:
            dense += 3 * h * arch.intermediate_size
    return dense, experts


def small_hf_config(*, moe: bool, vocab_size: int, hidden_size: int, num_layers: int, num_attention_heads: int,
                    num_key_value_heads: int, head_dim: int, intermediate_size: int, init_std: float,
                    num_experts: int = 0, num_experts_per_tok: int = 0, moe_intermediate_size: int = 0,
                    mlp_only_layers: list[int] = (), eos_token_id: int = 1, pad_token_id: int = 0) -> dict:
    """The transformers config.json of a small Qwen3 (`moe`: Qwen3-MoE) made with random weights:
    the CPU recipes' `model.random_init`."""
    config = {
        "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if moe else "qwen3",
        "vocab_size": vocab_size, "hidden_size": hidden_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim, "intermediate_size": intermediate_size, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False,
        "initializer_range": init_std, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
        "bos_token_id": None,
    }
    if moe:
        config.update(num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                      moe_intermediate_size=moe_intermediate_size, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=list(mlp_only_layers), router_aux_loss_coef=0.0,
                      output_router_logits=False)
    return config
