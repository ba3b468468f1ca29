"""config.json fields of the Qwen3 models the shipped recipes name, so that `validate` can
check layouts and estimate memory on a machine that has not downloaded them. A local
checkpoint directory always wins over this table."""

from __future__ import annotations

_QWEN3 = dict(vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=40960,
              head_dim=128, num_key_value_heads=8)
_QWEN3_MOE = dict(_QWEN3, architectures=["Qwen3MoeForCausalLM"], num_key_value_heads=4, norm_topk_prob=True,
                  decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001, num_experts=128,
                  num_experts_per_tok=8, tie_word_embeddings=False)

KNOWN_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen3-30B-A3B": dict(_QWEN3_MOE, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                               intermediate_size=6144, moe_intermediate_size=768),
    "Qwen/Qwen3-235B-A22B": dict(_QWEN3_MOE, hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
                                 intermediate_size=12288, moe_intermediate_size=1536),
    "Qwen/Qwen3-8B": dict(_QWEN3, architectures=["Qwen3ForCausalLM"], hidden_size=4096, num_hidden_layers=36,
                          num_attention_heads=32, intermediate_size=12288, tie_word_embeddings=False),
    "Qwen/Qwen3-4B": dict(_QWEN3, architectures=["Qwen3ForCausalLM"], hidden_size=2560, num_hidden_layers=36,
                          num_attention_heads=32, intermediate_size=9728, tie_word_embeddings=True),
}
# The base checkpoints have the same shapes as the post-trained ones.
KNOWN_CONFIGS.update({f"{name}-Base": config for name, config in list(KNOWN_CONFIGS.items())})


def known_config(path: str) -> dict | None:
    """The table's config for a hub id, or for a directory named like one (…/Qwen3-8B-Base)."""
    if path in KNOWN_CONFIGS:
        return KNOWN_CONFIGS[path]
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return next((config for hub_id, config in KNOWN_CONFIGS.items() if hub_id.endswith("/" + name)), None)
