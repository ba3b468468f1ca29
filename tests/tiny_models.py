"""Tiny random Qwen3 / Qwen3-MoE checkpoints made with transformers (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=300, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
)


def make_dense(directory: Path, *, seed: int = 0, tie_word_embeddings: bool = True) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(num_hidden_layers=2, intermediate_size=96, tie_word_embeddings=tie_word_embeddings, **COMMON)
    return _save(Qwen3ForCausalLM(config), directory)


def make_moe(directory: Path, *, seed: int = 0, norm_topk_prob: bool = True, mlp_only_layers=(1,),
             dtype: torch.dtype = torch.float32, router_aux_loss_coef: float = 0.001) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=norm_topk_prob, mlp_only_layers=list(mlp_only_layers),
        router_aux_loss_coef=router_aux_loss_coef, tie_word_embeddings=False, **COMMON,
    )
    return _save(Qwen3MoeForCausalLM(config), directory, dtype)


def _save(model, directory: Path, dtype: torch.dtype = torch.float32) -> Path:
    # Random init leaves norms at 1 and the router at 0; perturb every tensor so that a
    # swapped or transposed weight cannot hide.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.to(dtype).save_pretrained(directory)
    return Path(directory)


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def teacher_forced(model_dir, prompt, response, temperature):
    """log softmax(logits / T) of each response token, and each MoE layer's router choices,
    from one plain transformers forward over prompt + response[:-1]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    routes = {}
    for index, layer in enumerate(model.model.layers):
        router = getattr(layer.mlp, "gate", None)
        if router is not None and hasattr(router, "top_k"):
            router.register_forward_hook(lambda m, i, out, index=index: routes.__setitem__(index, out[2].numpy()))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response[:-1]])).logits[0].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1 :]
    return logprobs.gather(1, torch.tensor(response)[:, None]).squeeze(1), routes


def parity_tokens(vocab_size: int = 300, batch: int = 2, seq_len: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(7))
