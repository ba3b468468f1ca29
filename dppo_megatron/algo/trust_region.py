"""Trust-region masks: which tokens keep their policy-gradient term.

Every mode follows one pattern: a token is dropped only when the update has already pushed
pi away from the anchor (mu, or the recomputed old policy in the `_recompute` ablations) in
the direction its advantage wants, by more than the threshold on that side (`high` for A > 0,
`low` for A < 0). Tokens with A == 0 carry no gradient and are kept.

The `grpo_relax_*` ablations (the paper's section 6; the authors' `ppo_ablation_positive /
negative / both`) keep a ratio-clipped token on the relaxed side when its rollout probability
mu is below `relax_below`: the rare tokens PPO's ratio drops are let through, the rest as GRPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dppo_megatron.algo.divergence import binary_kl


@dataclass(frozen=True)
class TrustRegion:
    """How one loss mode decides which tokens to drop."""

    rule: str  # "tv" | "divergence" | "ratio" | "none"
    divergence: str | None = None  # for rule "divergence": "binary_kl" | "topk_tv" | "topk_kl"
    anchored_to_old: bool = False  # MiniRL-style ablation: anchor to the recomputed old policy
    # CISPO truncates the importance weight at 1 + high instead of masking tokens.
    truncate_weight_at_high: bool = False
    # PG-TIS truncates the importance weight at ratio_cap (which it then needs).
    truncate_weight_at_cap: bool = False
    # rule "ratio": the sides ("high": A > 0, "low": A < 0) where tokens with mu < relax_below stay.
    relaxed: tuple[str, ...] = ()


TRUST_REGIONS: dict[str, TrustRegion] = {
    "dppo_binary_tv": TrustRegion("tv"),
    "dppo_binary_kl": TrustRegion("divergence", "binary_kl"),
    "dppo_topk_tv": TrustRegion("divergence", "topk_tv"),
    "dppo_topk_kl": TrustRegion("divergence", "topk_kl"),
    "grpo": TrustRegion("ratio"),
    "grpo_relax_high": TrustRegion("ratio", relaxed=("high",)),
    "grpo_relax_low": TrustRegion("ratio", relaxed=("low",)),
    "grpo_relax_both": TrustRegion("ratio", relaxed=("high", "low")),
    "cispo": TrustRegion("none", truncate_weight_at_high=True),
    "pg_is": TrustRegion("none"),
    "pg_tis": TrustRegion("none", truncate_weight_at_cap=True),
    "dppo_binary_tv_recompute": TrustRegion("tv", anchored_to_old=True),
    "dppo_binary_kl_recompute": TrustRegion("divergence", "binary_kl", anchored_to_old=True),
    "grpo_recompute": TrustRegion("ratio", anchored_to_old=True),
}
LOSS_MODES = tuple(TRUST_REGIONS)


def trust_region(mode: str) -> TrustRegion:
    try:
        return TRUST_REGIONS[mode]
    except KeyError:
        raise ValueError(f"unknown loss mode {mode!r}; choose one of {', '.join(LOSS_MODES)}") from None


def needs_topk(mode: str) -> bool:
    """Whether the mode needs the rollout policy's top-K logprobs."""
    return trust_region(mode).divergence in ("topk_tv", "topk_kl")


def needs_old_logprob(mode: str) -> bool:
    """Whether the mode needs a recompute pass of the old policy."""
    return trust_region(mode).anchored_to_old


def needs_relax_below(mode: str) -> bool:
    """Whether the mode keeps ratio-clipped tokens below a rollout probability (`relax_below`)."""
    return bool(trust_region(mode).relaxed)


def needs_ratio_cap(mode: str) -> bool:
    """Whether the mode truncates the importance weight at `ratio_cap` (PG-TIS)."""
    return trust_region(mode).truncate_weight_at_cap


def trust_region_mask(
    mode: str,
    logprob: torch.Tensor,
    rollout_logprob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    low: float,
    high: float,
    topk_tv: torch.Tensor | None = None,
    topk_kl: torch.Tensor | None = None,
    old_logprob: torch.Tensor | None = None,
    relax_below: float | None = None,
) -> torch.Tensor:
    """Bool tensor shaped like `logprob`: True = token kept. `advantages` broadcasts (one value
    per response [B] against [B, L] tokens is fine)."""
    region = trust_region(mode)
    with torch.no_grad():
        if region.anchored_to_old:
            if old_logprob is None:
                raise ValueError(f"loss mode {mode!r} needs old_logprob (a recompute pass)")
            anchor = old_logprob
        else:
            anchor = rollout_logprob
        advantages = broadcast_advantages(advantages, logprob)
        push_up, push_down = advantages > 0, advantages < 0
        if region.rule == "none":
            return torch.ones_like(logprob, dtype=torch.bool)
        if region.rule == "tv":
            shift = logprob.exp() - anchor.exp()
            dropped = (push_up & (shift > high)) | (push_down & (shift < -low))
        elif region.rule == "ratio":
            ratio = (logprob - anchor).exp()
            clipped_up, clipped_down = push_up & (ratio > 1.0 + high), push_down & (ratio < 1.0 - low)
            if region.relaxed:
                if relax_below is None:
                    raise ValueError(f"loss mode {mode!r} needs relax_below (the rollout probability below "
                                     "which ratio-clipped tokens are kept)")
                likely = anchor.exp() >= relax_below
                clipped_up = clipped_up & likely if "high" in region.relaxed else clipped_up
                clipped_down = clipped_down & likely if "low" in region.relaxed else clipped_down
            dropped = clipped_up | clipped_down
        else:
            if region.divergence == "binary_kl":
                divergence = binary_kl(logprob, anchor)
            else:
                divergence = topk_tv if region.divergence == "topk_tv" else topk_kl
                if divergence is None:
                    raise ValueError(f"loss mode {mode!r} needs {region.divergence} (token_stats with top-K ids)")
            went_up, went_down = logprob > anchor, logprob < anchor
            dropped = (push_up & went_up & (divergence > high)) | (push_down & went_down & (divergence > low))
        return ~dropped


def broadcast_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-response [B] or per-token [B, L] advantages, as a tensor shaped like `like`."""
    while advantages.dim() < like.dim():
        advantages = advantages.unsqueeze(-1)
    try:
        return advantages.expand_as(like)
    except RuntimeError:
        raise ValueError(
            f"advantages of shape {tuple(advantages.shape)} do not broadcast to tokens {tuple(like.shape)}"
        ) from None
