"""Weights as an FP8 rollout engine serves them, for a real train-inference mismatch on a CPU.

On GPUs, FP8 rollouts (SGLang's `--quantization fp8`) serve the linear layers of the transformer
blocks in float8 e4m3 with a scale per output channel, while the learner trains in bf16 or fp32:
the engine's mu then differs from the learner's pi by far more than bf16 rounding. The embedded
engine does the same with `--dtype float8`: each such weight is quantised to e4m3 with its
per-channel scale and dequantised into the model's float32 weight, which the matmuls then use;
the numbers are those of an FP8 weight, the arithmetic float32. Embeddings, the output layer,
norms and the MoE router stay as they are, as SGLang keeps them.
"""

from __future__ import annotations

import torch

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max  # 448


def float8_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [..., out, in] quantised to e4m3 with one scale per output channel (its largest
    magnitude maps to 448), and dequantised back to its dtype."""
    scale = weight.detach().abs().float().amax(dim=-1, keepdim=True) / FLOAT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    return ((weight.detach().float() / scale).to(FLOAT8).float() * scale).to(weight.dtype)


def is_float8_weight(name: str, param: torch.Tensor) -> bool:
    """The transformer blocks' linear weights (attention, dense MLP, fused experts); not the
    MoE router (`mlp.gate`), norms, embeddings or the output layer."""
    return name.startswith("model.layers.") and param.dim() >= 2 and not name.endswith("mlp.gate.weight")


@torch.no_grad()
def quantize_to_float8(model: torch.nn.Module) -> None:
    """Replace, in place, every FP8-served weight of `model` by its e4m3 round trip."""
    for name, param in model.named_parameters():
        if is_float8_weight(name, param):
            param.copy_(float8_round_trip(param))
