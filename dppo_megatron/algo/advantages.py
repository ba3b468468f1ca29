"""Group-relative advantages (GRPO / Dr.GRPO): every response is scored against the other
responses to the same prompt."""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, normalize_std: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """Advantages for rewards [num_prompts * group_size], laid out group after group.

    A = r - mean(group); with `normalize_std` (GRPO) also divided by the group's std + eps.
    Dr.GRPO leaves the std out (the default), which removes a per-prompt difficulty bias.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_prompts * group_size], got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if normalize_std and group_size < 2:
        raise ValueError("normalize_std needs group_size >= 2")
    groups = rewards.float().view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if normalize_std:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + eps)
    return advantages.view(-1)
