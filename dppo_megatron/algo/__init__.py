"""The DPPO algorithm core in plain torch: no Megatron, no HTTP.

- `token_stats`: vocab-parallel log pi, entropy, and top-K TV/KL against the rollout policy.
- `binary_tv`, `binary_kl`: divergences at the sampled token.
- `trust_region_mask`: which tokens keep their gradient, for every loss mode.
- `policy_loss`: the DPPO / GRPO / CISPO / PG-IS / PG-TIS loss with its metrics.
- `group_advantages`: GRPO / Dr.GRPO group-relative advantages.
"""

from dppo_megatron.algo.advantages import group_advantages
from dppo_megatron.algo.divergence import binary_kl, binary_tv
from dppo_megatron.algo.policy_loss import AGGREGATIONS, policy_loss
from dppo_megatron.algo.token_stats import TokenStats, token_stats
from dppo_megatron.algo.trust_region import (
    LOSS_MODES,
    TRUST_REGIONS,
    needs_old_logprob,
    needs_ratio_cap,
    needs_relax_below,
    needs_topk,
    trust_region_mask,
)

__all__ = [
    "AGGREGATIONS",
    "LOSS_MODES",
    "TRUST_REGIONS",
    "TokenStats",
    "binary_kl",
    "binary_tv",
    "group_advantages",
    "needs_old_logprob",
    "needs_ratio_cap",
    "needs_relax_below",
    "needs_topk",
    "policy_loss",
    "token_stats",
    "trust_region_mask",
]
