"""Test cases for token_stats and the float64 full-vocabulary reference they are checked
against. Shared by the in-process tests and the multi-rank worker."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tests.loss_reference import topk_divergences


@dataclass
class Case:
    name: str
    logits: torch.Tensor  # [T, padded_vocab]; padded columns hold large garbage values
    vocab_size: int  # real vocabulary; columns past it are padding
    target_ids: torch.Tensor  # [T]
    topk_ids: torch.Tensor  # [T, K] top-K of mu, the sampled token forced in on some rows
    topk_logprobs: torch.Tensor  # [T, K] mu's logprobs at topk_ids
    temperature: float
    logprob_weights: torch.Tensor  # [T] weights of the test loss sum(w1 * logprob + w2 * entropy)
    entropy_weights: torch.Tensor


def make_case(
    name: str, *, seed: int, tokens: int, vocab_size: int, padded_vocab: int, topk: int,
    temperature: float, dtype: torch.dtype = torch.float32,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, padded_vocab, generator=gen) * 2.0
    # Padding must count as probability 0: make it the most likely thing if it did not.
    logits[:, vocab_size:] = 50.0
    logits = logits.to(dtype)
    # mu: a nearby distribution, like a rollout engine with a small mismatch.
    mu_logits = logits[:, :vocab_size].double() + 0.3 * torch.randn(tokens, vocab_size, generator=gen, dtype=torch.float64)
    mu_logprobs = torch.log_softmax(mu_logits / temperature, dim=-1)
    target_ids = torch.multinomial(mu_logprobs.exp(), 1, generator=gen).squeeze(1)
    top = mu_logprobs.topk(topk, dim=-1)
    topk_ids = top.indices.clone()
    # Force the sampled token into the set on even rows (the rollout client does this); leave
    # odd rows as they are, so the sampled token is inside and outside the top-K ids.
    even = torch.arange(tokens) % 2 == 0
    missing = even & ~(topk_ids == target_ids[:, None]).any(dim=1)
    topk_ids[missing, -1] = target_ids[missing]
    topk_logprobs = mu_logprobs.gather(1, topk_ids).float()
    return Case(
        name=name, logits=logits, vocab_size=vocab_size, target_ids=target_ids, topk_ids=topk_ids,
        topk_logprobs=topk_logprobs, temperature=temperature,
        logprob_weights=torch.randn(tokens, generator=gen), entropy_weights=torch.randn(tokens, generator=gen),
    )


CASES = [
    # name, seed, tokens, vocab, padded vocab, K, temperature, dtype
    ("even-vocab", 0, 33, 1024, 1024, 8, 1.0, torch.float32),
    ("padded-vocab-temperature", 1, 29, 1000, 1024, 5, 0.7, torch.float32),
    ("padded-vocab-bf16", 2, 19, 1001, 1024, 20, 1.3, torch.bfloat16),
    # At TP=4 the last rank's slice is all padding.
    ("mostly-padding", 3, 11, 700, 1024, 4, 1.0, torch.float32),
]


def all_cases() -> list[Case]:
    return [
        make_case(name, seed=seed, tokens=t, vocab_size=v, padded_vocab=p, topk=k, temperature=temp, dtype=dt)
        for name, seed, t, v, p, k, temp, dt in CASES
    ]


def reference(case: Case) -> dict[str, torch.Tensor]:
    """float64, full vocabulary (padding cut off), plain autograd."""
    logits = case.logits[:, : case.vocab_size].double().requires_grad_()
    log_probs = torch.log_softmax(logits / case.temperature, dim=-1)
    logprob = log_probs.gather(1, case.target_ids[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    loss = (case.logprob_weights.double() * logprob).sum() + (case.entropy_weights.double() * entropy).sum()
    (grad,) = torch.autograd.grad(loss, logits)
    grad = torch.cat([grad, grad.new_zeros(grad.shape[0], case.logits.shape[1] - case.vocab_size)], dim=1)

    tv, kl = topk_divergences(log_probs.detach(), case.topk_ids, case.topk_logprobs)
    return {"logprob": logprob.detach(), "entropy": entropy.detach(), "topk_tv": tv, "topk_kl": kl, "grad": grad}
