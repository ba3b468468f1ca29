"""Every loss mode written from the paper and the authors' code, in float64, token by token: the
reference the policy loss (tests/test_policy_loss.py) and the Megatron learner
(tests/test_learner_loss_parity.py) are checked against."""

from __future__ import annotations

import math

import torch


def token_weights(mask: torch.Tensor, aggregation: str, max_response_len: int | None) -> torch.Tensor:
    """What each token's loss is multiplied by: 1 / tokens (token-mean); 1 / (its sequence's
    tokens * sequences) (seq-mean-token-mean); 1 / (max_response_len * sequences)
    (seq-mean-token-sum-norm, Dr.GRPO)."""
    mask = mask.double()
    sequences = mask.shape[0]
    if aggregation == "token-mean":
        return mask / mask.sum()
    if aggregation == "seq-mean-token-mean":
        return mask / mask.sum(1, keepdim=True).clamp(min=1) / sequences
    if aggregation == "seq-mean-token-sum-norm":
        return mask / (max_response_len * sequences)
    raise ValueError(aggregation)


def reference_loss(mode, logprob, rollout_logprob, advantages, mask, *, low, high, ratio_cap=None, relax_below=None,
                   topk_tv=None, topk_kl=None, old_logprob=None, aggregation="token-mean", max_response_len=None):
    """The loss and its gradient in log pi: loss_t = -A * w * keep * log pi with
    r = exp(clamp(log pi - log mu, -20, 20)), w = r truncated at ratio_cap (PG-TIS) and at
    1 + high (CISPO) and held constant, keep from the mode's rule against mu (or against the
    recomputed old policy); the tokens' losses weighted by `token_weights`."""
    weights = token_weights(mask, aggregation, max_response_len)
    total, grad = 0.0, torch.zeros(logprob.shape, dtype=torch.float64)
    for b in range(logprob.shape[0]):
        for t in range(logprob.shape[1]):
            if not mask[b, t]:
                continue
            a, lp = float(advantages[b]), float(logprob[b, t])
            anchor = float((old_logprob if mode.endswith("_recompute") else rollout_logprob)[b, t])
            pi, mu_anchor = math.exp(lp), math.exp(anchor)
            r = math.exp(min(max(lp - float(rollout_logprob[b, t]), -20.0), 20.0))
            r_anchor = math.exp(lp - anchor)
            rule = mode.removesuffix("_recompute")
            if rule == "dppo_binary_tv":
                drop = (a > 0 and pi - mu_anchor > high) or (a < 0 and pi - mu_anchor < -low)
            elif rule in ("dppo_binary_kl", "dppo_topk_tv", "dppo_topk_kl"):
                if rule == "dppo_binary_kl":
                    d = mu_anchor * math.log(mu_anchor / pi) + (1 - mu_anchor) * math.log((1 - mu_anchor) / (1 - pi))
                else:
                    d = float((topk_tv if rule == "dppo_topk_tv" else topk_kl)[b, t])
                drop = (a > 0 and pi > mu_anchor and d > high) or (a < 0 and pi < mu_anchor and d > low)
            elif rule.startswith("grpo"):
                up, down = a > 0 and r_anchor > 1 + high, a < 0 and r_anchor < 1 - low
                if rule in ("grpo_relax_high", "grpo_relax_both"):
                    up = up and mu_anchor >= relax_below
                if rule in ("grpo_relax_low", "grpo_relax_both"):
                    down = down and mu_anchor >= relax_below
                drop = up or down
            else:
                drop = False  # cispo, pg_is, pg_tis
            w = r if ratio_cap is None else min(r, ratio_cap)
            if mode == "cispo":
                w = min(w, 1 + high)
            if not drop:
                weight = float(weights[b, t])
                total += -a * w * lp * weight
                grad[b, t] = -a * w * weight
    return total, grad


def topk_divergences(log_pi: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's top-K TV and KL(mu || pi) over mu's top-K tokens plus one "other" bucket
    holding the rest of each distribution. log_pi: [..., V] float64 full-vocabulary."""
    pi_k = log_pi.gather(-1, topk_ids).exp()
    mu_k = topk_logprobs.double().exp()
    pi = torch.cat([pi_k, (1 - pi_k.sum(-1, keepdim=True)).clamp(min=0)], dim=-1)
    mu = torch.cat([mu_k, (1 - mu_k.sum(-1, keepdim=True)).clamp(min=0)], dim=-1)
    tv = 0.5 * (mu - pi).abs().sum(-1)
    mu_c, pi_c = mu.clamp(min=1e-12), pi.clamp(min=1e-12)
    kl = (mu_c * (mu_c.log() - pi_c.log())).sum(-1)
    return tv, kl
