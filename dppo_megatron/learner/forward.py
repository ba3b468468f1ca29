"""Running micro-batches through the model with Megatron's pipeline schedule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch


def causal_mask(seq_len: int, device) -> torch.Tensor:
    """[1, 1, s, s], True where attention is masked. Passed explicitly: Megatron's default mask
    is built on a CUDA device."""
    return torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device).triu(1)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def run_schedule(
    model,
    micro_batches: Sequence[dict],
    loss_func: Callable[[dict, torch.Tensor], tuple],
    *,
    forward_only: bool,
    before_forward: Callable[[dict], None] | None = None,
) -> list:
    """Run every micro-batch (dicts with at least `tokens` [b, s]) through forward (and
    backward unless `forward_only`) on every pipeline stage. `loss_func(batch, output)` runs on
    the last stage with the vocab-parallel logits [b, s, V/TP] and returns what Megatron's
    schedule expects: (loss, metrics) or (loss, num_tokens, metrics). `before_forward(batch)`
    runs on every stage just before each micro-batch's forward. Returns the metrics of each
    micro-batch on the last stage (empty elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = model_device(model)
    batches = iter(micro_batches)

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        if before_forward is not None:
            before_forward(batch)
        tokens = batch["tokens"].to(device)
        seq_len = tokens.shape[1]
        positions = torch.arange(seq_len, device=device).expand_as(tokens)
        output = chunk(tokens, positions, causal_mask(seq_len, device))
        return output, partial(loss_func, batch)

    first = micro_batches[0]["tokens"]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=first.shape[1],
        micro_batch_size=first.shape[0],
        forward_only=forward_only,
    )


@torch.no_grad()
def full_vocab_logits(model, vocab_size: int, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits [b, s, vocab_size] (TP-gathered, padding cut) for one batch, on the last pipeline
    stage; None on other stages. For checks against other implementations, not for training."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    def keep(batch, output):
        full = gather_from_tensor_model_parallel_region(output)
        return torch.zeros((), device=output.device), {"logits": full[..., :vocab_size].float().cpu()}

    was_training = model.training
    model.eval()
    results = run_schedule(model, [{"tokens": tokens}], keep, forward_only=True)
    model.train(was_training)
    return results[0]["logits"] if parallel_state.is_pipeline_last_stage() else None
