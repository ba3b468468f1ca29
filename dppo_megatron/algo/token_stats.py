"""Per-token statistics of a vocabulary-parallel softmax.

Under tensor parallelism each rank holds the logits of one slice of the vocabulary. Everything
the policy loss needs per token comes from a few reductions over the vocabulary: the max and
the sum of exponentials (-> log Z), the sampled token's logit (-> log pi(y_t)), an
exponential-weighted sum (-> entropy), and the logits at the rollout policy's top-K ids
(-> top-K TV and KL against mu). Each rank reduces its own slice and the ranks all-reduce small
[tokens, ...] tensors, so the result equals the single-rank result on the gathered logits.

Two collectives per call, whatever the number of tokens: one MAX, one SUM of everything else.
Tokens go through two reused fp32 chunk buffers sized from a memory budget, so no fp32 copy of
the whole [tokens, V] slice is ever made; the backward recomputes the softmax chunk by chunk
from the saved log Z and writes the logits' gradient chunk by chunk, in the logits' dtype.
Beyond that gradient, memory is the budget plus O(tokens x K).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Masses below this are clamped before taking logs, as the reference implementation does.
MIN_MASS = 1e-12
# Default budget of the fp32 working buffers (two chunk buffers, forward and backward alike);
# sets the number of tokens per chunk. Speed is flat from a few MiB of buffer up.
DEFAULT_MEMORY_BUDGET = 256 * 1024 * 1024


@dataclass
class TokenStats:
    """Per-token results, each of shape [tokens]."""

    logprob: torch.Tensor  # log pi(y_t), differentiable w.r.t. the logits
    entropy: torch.Tensor | None = None  # differentiable; only when asked for
    topk_tv: torch.Tensor | None = None  # TV(mu, pi) over {top-K ids, other}; no gradient
    topk_kl: torch.Tensor | None = None  # KL(mu || pi) over the same K+1 outcomes; no gradient


@dataclass(frozen=True)
class _VocabSlice:
    """What a rank needs to know about its slice of the vocabulary."""

    group: dist.ProcessGroup | None  # None when the vocabulary is not split
    start: int  # global id of local column 0
    valid_width: int  # local columns that are real tokens (the rest is padding)
    temperature: float
    with_entropy: bool
    chunk_tokens: int

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        if self.group is not None:
            dist.all_reduce(tensor, op=op, group=self.group)

    def localize(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global ids -> (local column, owned). Ids owned elsewhere map to the spare column
        `valid_width` of a chunk buffer, so scatters into it are harmless."""
        local = ids - self.start
        owned = (local >= 0) & (local < self.valid_width)
        return torch.where(owned, local, self.valid_width), owned


def token_stats(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    with_entropy: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    chunk_tokens: int | None = None,
) -> TokenStats:
    """Statistics of softmax(logits / temperature) at every token position.

    Args:
        logits: [tokens, V_local], this rank's vocabulary slice, any float dtype.
        target_ids: [tokens] global ids of the sampled tokens.
        topk_ids, topk_logprobs: [tokens, K] the rollout policy's top-K ids (distinct per row)
            and its logprobs at them; give both to get `topk_tv` and `topk_kl`.
        tp_group: the tensor-parallel group the vocabulary is split over (None: not split).
        vocab_start: global id of this slice's first column.
        vocab_size: real vocabulary size; columns at or past it are padding (probability 0).
            Defaults to V_local * TP (no padding).
        with_entropy: also return the entropy (differentiable).
        memory_budget: bytes for the fp32 working buffers (two chunk buffers of
            [chunk, V_local + 1]); sets the tokens per chunk (at least one token).
        chunk_tokens: tokens per chunk, overriding `memory_budget`.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [tokens, V_local], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    num_tokens, local_width = logits.shape
    if target_ids.shape != (num_tokens,):
        raise ValueError(f"target_ids must have shape ({num_tokens},), got {tuple(target_ids.shape)}")
    if (topk_ids is None) != (topk_logprobs is None):
        raise ValueError("topk_ids and topk_logprobs must be given together")
    if topk_ids is not None:
        if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
            raise ValueError(f"topk_ids must be [{num_tokens}, K], got {tuple(topk_ids.shape)}")
        if topk_logprobs.shape != topk_ids.shape:
            raise ValueError(
                f"topk_logprobs shape {tuple(topk_logprobs.shape)} != topk_ids shape {tuple(topk_ids.shape)}"
            )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    if vocab_size is None:
        vocab_size = local_width * tp_size
    if vocab_start < 0 or vocab_start >= local_width * tp_size:
        raise ValueError(f"vocab_start {vocab_start} outside the padded vocabulary of {local_width * tp_size}")
    _check_ids("target_ids", target_ids, vocab_size)
    if topk_ids is not None:
        _check_ids("topk_ids", topk_ids, vocab_size)

    valid_width = max(0, min(local_width, vocab_size - vocab_start))
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be > 0 bytes, got {memory_budget}")
    if chunk_tokens is None:
        chunk_tokens = max(1, memory_budget // (2 * 4 * (valid_width + 1)))
    vocab = _VocabSlice(
        group=tp_group if tp_size > 1 else None,
        start=vocab_start,
        valid_width=valid_width,
        temperature=float(temperature),
        with_entropy=with_entropy,
        chunk_tokens=int(chunk_tokens),
    )
    logprob, entropy, topk_tv, topk_kl = _VocabParallelTokenStats.apply(
        logits, target_ids, topk_ids, topk_logprobs, vocab
    )
    has_topk = topk_ids is not None
    return TokenStats(
        logprob=logprob,
        entropy=entropy if with_entropy else None,
        topk_tv=topk_tv if has_topk else None,
        topk_kl=topk_kl if has_topk else None,
    )


def _check_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"{name} must lie in [0, {vocab_size}), got range [{int(ids.min())}, {int(ids.max())}]"
        )


class _VocabParallelTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target_ids, topk_ids, topk_logprobs, vocab: _VocabSlice):
        num_tokens = logits.shape[0]
        real = logits[:, : vocab.valid_width]
        inv_temp = 1.0 / vocab.temperature
        device = logits.device

        # Shift for a stable exp, in raw logit units: s = (x - shift) / T rounds once. Any
        # shift gives the exact result, so the max of the raw (maybe bf16) logits serves; it
        # must be the same on every rank.
        if vocab.valid_width > 0:
            shift = real.amax(dim=-1).float()
        else:
            shift = torch.full((num_tokens,), -math.inf, device=device)
        vocab.all_reduce(shift, op=dist.ReduceOp.MAX)

        # Columns of one float64 SUM all-reduce: sum-exp, [entropy dot], [other mass], target
        # logit, [K top-K logits]. Ranks that do not own an id contribute 0 for it. The [T]-sized
        # arithmetic after it runs in float64 too: it is cheap and keeps |error| well under 1e-6.
        target_col, target_owned = vocab.localize(target_ids)
        columns = [_chunked_sums(real, shift, vocab, topk_ids).double()]
        columns.append(_gather_owned(real, target_col, target_owned).unsqueeze(1))
        if topk_ids is not None:
            columns.append(_gather_owned(real, *vocab.localize(topk_ids)))
        reduced = torch.cat(columns, dim=1)
        vocab.all_reduce(reduced)

        num_sums = columns[0].shape[1]
        sums, target_logit, topk_logits = reduced[:, :num_sums], reduced[:, num_sums], reduced[:, num_sums + 1 :]
        sum_exp = sums[:, 0]
        log_sum_exp = sum_exp.log()
        shift64 = shift.double()
        logprob = ((target_logit - shift64) * inv_temp - log_sum_exp).float()
        entropy = torch.empty(0, device=device)
        if vocab.with_entropy:
            # H = log Z - E_p[z] = log(sum e) - sum(e * s) / sum(e), with s = (x - shift) / T.
            entropy = (log_sum_exp - sums[:, 1] / sum_exp).float()
        topk_tv, topk_kl = torch.empty(0, device=device), torch.empty(0, device=device)
        if topk_ids is not None:
            pi_topk_logprobs = (topk_logits - shift64[:, None]) * inv_temp - log_sum_exp[:, None]
            pi_other = sums[:, -1] / sum_exp
            topk_tv, topk_kl = _reduced_divergences(topk_logprobs, pi_topk_logprobs, pi_other)

        ctx.vocab = vocab
        ctx.mark_non_differentiable(topk_tv, topk_kl)
        ctx.set_materialize_grads(False)
        if logits.requires_grad:
            ctx.save_for_backward(logits, target_ids, shift, log_sum_exp.float(), entropy)
        return logprob, entropy, topk_tv, topk_kl

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy, _grad_tv, _grad_kl):
        logits, target_ids, shift, log_sum_exp, entropy = ctx.saved_tensors
        vocab: _VocabSlice = ctx.vocab
        num_tokens, local_width = logits.shape
        width = vocab.valid_width
        real = logits[:, :width]
        inv_temp = 1.0 / vocab.temperature
        if width < local_width:
            grad_logits = torch.zeros_like(logits)  # padded columns are not tokens: no gradient
        else:
            grad_logits = torch.empty_like(logits)
        if grad_logprob is None:
            grad_logprob = torch.zeros_like(log_sum_exp)
        if width == 0 or num_tokens == 0:
            return grad_logits, None, None, None, None
        target_col, target_owned = vocab.localize(target_ids)
        onehot_grad = torch.where(target_owned, grad_logprob, 0.0)

        # d logprob / dz = onehot - p;  d entropy / dz = -p * (log p + H);  z = logits / T;
        # log p = (logits - shift) / T - log(sum e)
        chunk = min(vocab.chunk_tokens, num_tokens)
        log_p_buf = torch.empty(chunk, width + 1, device=logits.device)
        prob_buf = torch.empty(chunk, width, device=logits.device) if grad_entropy is not None else None
        for begin in range(0, num_tokens, chunk):
            end = min(begin + chunk, num_tokens)
            rows = end - begin
            grad_z = log_p_buf[:rows]
            log_p = grad_z[:, :width]
            _load_shifted(log_p, real[begin:end], shift[begin:end], inv_temp).sub_(log_sum_exp[begin:end, None])
            if grad_entropy is not None:
                prob = torch.exp(log_p, out=prob_buf[:rows])
                log_p.add_(entropy[begin:end, None]).mul_(grad_entropy[begin:end, None])
                log_p.add_(grad_logprob[begin:end, None]).mul_(prob).neg_()
            else:
                log_p.exp_().mul_(-grad_logprob[begin:end, None])
            grad_z.scatter_add_(1, target_col[begin:end, None], onehot_grad[begin:end, None])
            if inv_temp != 1.0:
                log_p.mul_(inv_temp)
            grad_logits[begin:end, :width].copy_(log_p)
        return grad_logits, None, None, None, None


def _gather_owned(real: torch.Tensor, columns: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """float64 raw logits at `columns` where this rank owns the id, else 0. `columns` may point
    at the spare column one past the slice; it is clamped for the gather and zeroed by `owned`."""
    if real.shape[1] == 0:
        return torch.zeros(columns.shape, dtype=torch.float64, device=real.device)
    squeeze = columns.dim() == 1
    cols = columns.unsqueeze(1) if squeeze else columns
    values = real.gather(1, cols.clamp(max=real.shape[1] - 1)).double()
    values = torch.where(owned.unsqueeze(1) if squeeze else owned, values, 0.0)
    return values.squeeze(1) if squeeze else values


def _load_shifted(dest: torch.Tensor, logits: torch.Tensor, shift: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """dest <- (logits - shift) / T in fp32, in place in a reused chunk buffer."""
    dest.copy_(logits).sub_(shift[:, None])
    return dest.mul_(inv_temp) if inv_temp != 1.0 else dest


def _chunked_sums(
    real: torch.Tensor, shift: torch.Tensor, vocab: _VocabSlice, topk_ids: torch.Tensor | None
) -> torch.Tensor:
    """Local per-token sums over this slice, in chunks of tokens: sum(e) and, when asked,
    sum(e * s) (for the entropy) and the sum of e outside the top-K ids (the "other" bucket).
    e = exp(s), s = (logits - shift) / T. Returns [tokens, 1 to 3] in that order.

    With top-K ids, the ids' columns are zeroed and one pass sums the rest: the other mass,
    summed directly rather than as a difference, so a small mass keeps its precision; sum(e)
    is that plus the ids' own e (positive terms, no cancellation), without a second pass."""
    num_tokens, width = real.shape
    device = real.device
    wanted = 1 + int(vocab.with_entropy) + int(topk_ids is not None)
    out = torch.zeros(num_tokens, wanted, device=device)
    if width == 0 or num_tokens == 0:
        return out
    if topk_ids is not None:
        topk_col, owned = vocab.localize(topk_ids)
        counted = owned & _first_occurrence(topk_ids)  # a repeated id adds its mass once
    inv_temp = 1.0 / vocab.temperature
    chunk = min(vocab.chunk_tokens, num_tokens)
    # One spare column: top-K ids owned by other ranks scatter into it.
    shifted_buf = torch.empty(chunk, width + 1, device=device)
    exp_buf = torch.empty(chunk, width + 1, device=device) if vocab.with_entropy else None
    for begin in range(0, num_tokens, chunk):
        end = min(begin + chunk, num_tokens)
        rows = end - begin
        shifted = _load_shifted(shifted_buf[:rows, :width], real[begin:end], shift[begin:end], inv_temp)
        if vocab.with_entropy:
            full_exp = exp_buf[:rows]
            exp = torch.exp(shifted, out=full_exp[:, :width])
            # In place (s is not needed after this) and summed by torch's cascade sum: a
            # matmul-style dot accumulates naively and loses ~1e-6 relative.
            out[begin:end, 1] = shifted.mul_(exp).sum(dim=-1)
        else:
            full_exp = shifted_buf[:rows]
            exp = shifted.exp_()
        if topk_ids is None:
            out[begin:end, 0] = exp.sum(dim=-1)
            continue
        cols = topk_col[begin:end]
        in_set = torch.where(counted[begin:end], full_exp.gather(1, cols), 0.0).sum(dim=-1)
        full_exp.scatter_(1, cols, 0.0)
        other = exp.sum(dim=-1)
        out[begin:end, 0] = other + in_set
        out[begin:end, -1] = other
    return out


def _first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """[tokens, K] bool: True at the first occurrence of each id in its row."""
    sorted_ids, order = ids.sort(dim=1)
    repeat = torch.zeros_like(sorted_ids, dtype=torch.bool)
    repeat[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    return torch.empty_like(repeat).scatter_(1, order, ~repeat)


def _reduced_divergences(
    mu_topk_logprobs: torch.Tensor, pi_topk_logprobs: torch.Tensor, pi_other: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """TV(mu, pi) and KL(mu || pi) over the K+1 outcomes {top-K ids, other}. Tiny tensors:
    done in float64, since mu's "other" mass is 1 - sum(mu_k) and cancels."""
    mu_lp = mu_topk_logprobs.double()
    pi_lp = pi_topk_logprobs
    mu_k, pi_k = mu_lp.exp(), pi_lp.exp()
    mu_other = (1.0 - mu_k.sum(dim=-1)).clamp(min=0.0)
    pi_other = pi_other.double().clamp(min=0.0)
    tv = 0.5 * ((mu_k - pi_k).abs().sum(dim=-1) + (mu_other - pi_other).abs())
    log_min = math.log(MIN_MASS)
    kl_topk = (mu_k.clamp(min=MIN_MASS) * (mu_lp.clamp(min=log_min) - pi_lp.clamp(min=log_min))).sum(dim=-1)
    mu_other_c, pi_other_c = mu_other.clamp(min=MIN_MASS), pi_other.clamp(min=MIN_MASS)
    kl = kl_topk + mu_other_c * (mu_other_c.log() - pi_other_c.log())
    return tv.float(), kl.float()
