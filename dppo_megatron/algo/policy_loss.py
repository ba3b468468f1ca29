"""The policy-gradient loss shared by DPPO and its baselines.

Per token: -A * sg(w) * M * log pi, where M is the mode's trust-region mask (`trust_region.py`),
mu the rollout engine's own probability of the sampled token and w the importance weight
r = pi/mu, truncated at `ratio_cap` when one is set (PG-TIS needs one), and at 1 + high for
CISPO. The weight is always taken against mu, the policy that actually produced the sample;
the `_recompute` ablations only move the mask's anchor. log r is clamped to [-20, 20] first, as
in the authors' code: a token whose probability moved by e^88 or more would otherwise make r
infinite, and its NaN gradient (inf * 0 through the mask) would poison the whole batch.
"""

from __future__ import annotations

import torch

from dppo_megatron.algo.trust_region import broadcast_advantages, trust_region, trust_region_mask

LOG_RATIO_CLAMP = 20.0

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# Tokens whose rollout probability is below this count as "low-probability" in the metrics.
LOW_PROB = 0.1
# Buckets of the rollout probability mu for the metrics the paper argues with: which tokens a
# mode masks, and how far pi moved from mu, by how likely the rollout found the token.
MU_BUCKETS = ((0.0, 0.01), (0.01, 0.1), (0.1, 0.5), (0.5, 0.9), (0.9, 1.0))


def mu_bucket_name(low: float, high: float) -> str:
    return f"{low:g}-{high:g}"


# Each by-mu metric and the count that weighs it when micro-batches and ranks are combined.
BY_MU_WEIGHTS = {
    **{f"mismatch_tv_by_mu/{mu_bucket_name(*b)}": f"tokens_by_mu/{mu_bucket_name(*b)}" for b in MU_BUCKETS},
    **{f"masked_frac_by_mu/{sign}/{mu_bucket_name(*b)}": f"tokens_by_mu/{sign}/{mu_bucket_name(*b)}"
       for sign in ("pos", "neg") for b in MU_BUCKETS},
}


def policy_loss(
    logprob: torch.Tensor,
    rollout_logprob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    mode: str = "dppo_binary_tv",
    low: float = 0.15,
    high: float = 0.15,
    ratio_cap: float | None = None,
    relax_below: float | None = None,
    aggregation: str = "token-mean",
    max_response_len: int | None = None,
    topk_tv: torch.Tensor | None = None,
    topk_kl: torch.Tensor | None = None,
    old_logprob: torch.Tensor | None = None,
    denominator: float | torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and metrics for one (micro-)batch of responses.

    Args:
        logprob: [B, L] log pi of the sampled tokens (with gradient).
        rollout_logprob: [B, L] the rollout engine's logprobs of the same tokens.
        advantages: [B] per response or [B, L] per token.
        response_mask: [B, L], true on response tokens that count.
        mode: a key of `trust_region.TRUST_REGIONS`.
        low, high: the trust-region thresholds for A < 0 and A > 0 tokens.
        ratio_cap: cap c of the importance weight (None: no cap; `pg_tis` needs one).
        relax_below: for the `grpo_relax_*` modes, the rollout probability below which
            ratio-clipped tokens on the relaxed side are kept.
        aggregation: one of AGGREGATIONS; `seq-mean-token-sum-norm` (Dr.GRPO) divides each
            sequence's token sum by the fixed `max_response_len`.
        denominator: the count to divide by instead of this batch's own (tokens for
            `token-mean`, sequences otherwise); pass the global count when a batch is split
            into micro-batches or over data-parallel ranks, so the gradients add up right.
        token_ids, vocab_size: [B, L] ids of the sampled tokens and the vocabulary size, to
            count which ids the trust region drops (`masked_token_counts` in the metrics).

    Returns (loss, metrics): metrics are detached scalars; `*_frac` and means are over
    response tokens, with the counts they average over (`tokens`, `tokens_pos`, ...) so that
    callers can combine micro-batches and ranks with the right weights. With `token_ids`, also
    `masked_token_counts`, the [2, vocab_size] tensor of `masked_token_counts()`.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    if aggregation == "seq-mean-token-sum-norm" and not max_response_len:
        raise ValueError("aggregation 'seq-mean-token-sum-norm' needs max_response_len")
    if logprob.shape != rollout_logprob.shape or logprob.shape != response_mask.shape:
        raise ValueError(
            f"logprob {tuple(logprob.shape)}, rollout_logprob {tuple(rollout_logprob.shape)} and "
            f"response_mask {tuple(response_mask.shape)} must have the same shape"
        )
    if aggregation != "token-mean" and logprob.dim() != 2:
        raise ValueError(f"aggregation {aggregation!r} needs [B, L] tensors, got {tuple(logprob.shape)}")
    region = trust_region(mode)
    if region.truncate_weight_at_cap and ratio_cap is None:
        raise ValueError(f"loss mode {mode!r} truncates the importance weight at ratio_cap: give one")
    keep = trust_region_mask(
        mode, logprob, rollout_logprob, advantages, low=low, high=high,
        topk_tv=topk_tv, topk_kl=topk_kl, old_logprob=old_logprob, relax_below=relax_below,
    )
    advantages = broadcast_advantages(advantages, logprob).to(logprob.dtype)
    response_mask = response_mask.bool()

    # Off the response (padding may hold -inf logprobs) the ratio is 1: finite everywhere.
    log_ratio = torch.where(response_mask, (logprob.detach() - rollout_logprob).float(), 0.0)
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    cap = ratio_cap
    if region.truncate_weight_at_high:
        cap = 1.0 + high if cap is None else min(cap, 1.0 + high)
    weight = ratio.clamp(max=cap) if cap is not None else ratio
    counted = response_mask & keep
    # `where`, not a product with the mask: padding may hold -inf logprobs, and 0 * inf = nan.
    per_token = torch.where(counted, -advantages * weight.to(logprob.dtype) * logprob, 0.0)

    if aggregation == "token-mean":
        total = denominator if denominator is not None else response_mask.sum().clamp(min=1)
        loss = per_token.sum() / total
    else:
        per_sequence = per_token.sum(dim=-1)
        if aggregation == "seq-mean-token-mean":
            per_sequence = per_sequence / response_mask.sum(dim=-1).clamp(min=1)
        else:
            per_sequence = per_sequence / max_response_len
        total = denominator if denominator is not None else logprob.shape[0]
        loss = per_sequence.sum() / total

    metrics = _metrics(logprob.detach(), ratio, log_ratio, rollout_logprob, advantages, response_mask, keep)
    if token_ids is not None:
        metrics["masked_token_counts"] = masked_token_counts(token_ids, response_mask & ~keep, advantages,
                                                             vocab_size)
    return loss, metrics


@torch.no_grad()
def masked_token_counts(token_ids: torch.Tensor, dropped: torch.Tensor, advantages: torch.Tensor,
                        vocab_size: int) -> torch.Tensor:
    """[2, vocab_size] float64: how many times each token id lost its gradient to the trust
    region with A > 0 (row 0) and with A < 0 (row 1). token_ids, dropped: [B, L]; advantages:
    [B] or [B, L]."""
    advantages = broadcast_advantages(advantages, dropped)
    return torch.stack([torch.bincount(token_ids[dropped & side], minlength=vocab_size)
                        for side in (advantages > 0, advantages < 0)]).double()


@torch.no_grad()
def _metrics(logprob, ratio, log_ratio, rollout_logprob, advantages, response_mask, keep) -> dict[str, torch.Tensor]:
    def mean(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        count = where.sum()
        return torch.where(where, values, 0.0).sum() / count.clamp(min=1)

    tokens = response_mask
    dropped = tokens & ~keep
    pos, neg = tokens & (advantages > 0), tokens & (advantages < 0)
    # pi and mu themselves (not mu * the clamped ratio): |pi - mu| is right for any move.
    rollout_prob = torch.where(tokens, rollout_logprob.float(), 0.0).exp()
    prob = torch.where(tokens, logprob.float(), 0.0).exp()
    shift, was_dropped = (prob - rollout_prob).abs(), dropped.float()
    by_mu = {}
    for low, high in MU_BUCKETS:
        name = mu_bucket_name(low, high)
        in_bucket = tokens & (rollout_prob >= low) & ((rollout_prob < high) if high < 1.0 else True)
        by_mu[f"mismatch_tv_by_mu/{name}"] = mean(shift, in_bucket)
        by_mu[f"tokens_by_mu/{name}"] = in_bucket.sum().float()
        for sign, side in (("pos", pos), ("neg", neg)):
            by_mu[f"masked_frac_by_mu/{sign}/{name}"] = mean(was_dropped, in_bucket & side)
            by_mu[f"tokens_by_mu/{sign}/{name}"] = (in_bucket & side).sum().float()
    return by_mu | {
        # Of the tokens with a gradient to lose (A != 0), as the authors' clip fraction counts.
        "masked_frac": mean(was_dropped, pos | neg),
        "masked_frac_pos": mean(was_dropped, pos),
        "masked_frac_neg": mean(was_dropped, neg),
        "mismatch_tv": mean(shift, tokens),
        "ratio_mean": mean(ratio, tokens),
        "ratio_max": torch.where(tokens, ratio, 0.0).max() if tokens.any() else ratio.new_zeros(()),
        "kl_k3": mean(ratio - 1.0 - log_ratio, tokens),
        "masked_low_prob_frac": mean((rollout_prob < LOW_PROB).float(), dropped),
        "tokens": tokens.sum().float(),
        "tokens_pos": pos.sum().float(),
        "tokens_neg": neg.sum().float(),
        "tokens_signed": (pos | neg).sum().float(),
        "tokens_masked": dropped.sum().float(),
    }
