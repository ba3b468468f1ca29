"""One rank's part of the policy: the Megatron model, its optimizer and learning-rate
schedule, and the DPPO train step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dppo_megatron.algo import needs_old_logprob, needs_topk, policy_loss, token_stats
from dppo_megatron.algo.policy_loss import BY_MU_WEIGHTS
from dppo_megatron.algo.token_stats import DEFAULT_MEMORY_BUDGET
from dppo_megatron.learner.forward import model_device, run_schedule
from dppo_megatron.learner.model import ModelOptions, build_model
from dppo_megatron.learner.routing_replay import RoutingReplay
from dppo_megatron.model.arch import Qwen3Arch
from dppo_megatron.model.layout import ParallelLayout


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_steps: int | None = None  # None: constant after warm-up
    lr_decay_style: str = "constant"  # constant | linear | cosine
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass(frozen=True)
class LossConfig:
    mode: str = "dppo_binary_tv"
    low: float = 0.15
    high: float = 0.15
    ratio_cap: float | None = None
    relax_below: float | None = None
    aggregation: str = "token-mean"
    max_response_len: int | None = None
    temperature: float = 1.0  # the rollout engine's sampling temperature
    stats_memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes of token_stats' fp32 chunk buffers


# How micro-batch metrics combine: a weighted mean by the named count, a max, or a sum.
METRIC_WEIGHTS = {
    "masked_frac": "tokens_signed", "masked_frac_pos": "tokens_pos", "masked_frac_neg": "tokens_neg",
    "mismatch_tv": "tokens", "ratio_mean": "tokens", "kl_k3": "tokens",
    "masked_low_prob_frac": "tokens_masked", "entropy": "tokens", **BY_MU_WEIGHTS,
}
SUMMED_METRICS = ("loss", "tokens", "tokens_pos", "tokens_neg", "tokens_signed", "tokens_masked",
                  *sorted(set(BY_MU_WEIGHTS.values())))
MAX_METRICS = ("ratio_max",)


@dataclass
class MicroBatch:
    """Sequences padded to a common length. Per-token tensors are aligned with `tokens`: entry
    t describes token t (predicted from position t - 1); position 0 is never a response token."""

    tokens: torch.Tensor  # [b, s] int64
    response_mask: torch.Tensor  # [b, s] bool
    rollout_logprobs: torch.Tensor  # [b, s] the engine's logprob of each token
    advantages: torch.Tensor  # [b] per response
    topk_ids: torch.Tensor | None = None  # [b, s, K] the engine's top-K ids per position
    topk_logprobs: torch.Tensor | None = None  # [b, s, K]
    routed_experts: torch.Tensor | None = None  # [b, s, layers, k] int16 the engine's experts; -1 = none
    old_logprobs: torch.Tensor | None = None  # [b, s] log pi_old, for the *_recompute ablations

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "batch": self}


def lr_scheduler(optimizer, config: OptimizerConfig):
    """Megatron's scheduler for `config`, stepped once per optimizer step: a linear warm-up from
    0 over `lr_warmup_steps`, then `lr_decay_style` down to `min_lr` at `lr_decay_steps` (None:
    the learning rate stays at `lr` after the warm-up). Weight decay stays constant."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = config.lr_decay_steps or max(1, config.lr_warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if config.lr_warmup_steps else config.lr, max_lr=config.lr, min_lr=config.min_lr,
        lr_warmup_steps=config.lr_warmup_steps, lr_decay_steps=decay_steps,
        lr_decay_style=config.lr_decay_style if config.lr_decay_steps else "constant",
        start_wd=config.weight_decay, end_wd=config.weight_decay, wd_incr_steps=decay_steps, wd_incr_style="constant",
    )


class Learner:
    def __init__(self, arch: Qwen3Arch, layout: ParallelLayout, model_options: ModelOptions,
                 optimizer_config: OptimizerConfig, loss_config: LossConfig):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer

        self.arch, self.layout, self.loss_config = arch, layout, loss_config
        model = build_model(arch, layout, model_options)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=layout.use_distributed_optimizer,
        )
        self.routing = RoutingReplay(model, replay=model_options.routing_replay) if arch.is_moe else None
        self.model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
        bf16 = model_options.dtype == torch.bfloat16
        self.optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(
                optimizer="adam", lr=optimizer_config.lr, min_lr=optimizer_config.min_lr,
                weight_decay=optimizer_config.weight_decay, adam_beta1=optimizer_config.adam_beta1,
                adam_beta2=optimizer_config.adam_beta2, adam_eps=optimizer_config.adam_eps,
                clip_grad=optimizer_config.clip_grad, bf16=bf16, params_dtype=model_options.dtype,
                use_distributed_optimizer=layout.use_distributed_optimizer,
            ),
            [self.model],
        )
        self.scheduler = lr_scheduler(self.optimizer, optimizer_config)
        config = self.model.config
        config.no_sync_func = self.model.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        self.step = 0
        # Which token ids the trust region masks (A > 0, A < 0), since the last take.
        self._masked_counts = torch.zeros(2, arch.vocab_size, dtype=torch.float64, device=model_device(self.module))

    @property
    def module(self):
        """The GPTModel inside the DDP wrapper."""
        return self.model.module

    # --- the GPUs shared with colocated servers ---------------------------------------------

    def offload(self) -> bool:
        """Move the optimizer state to host memory and free the gradient buffers (Megatron Core's
        own RL hooks), while colocated servers use the GPU; the weights stay. Returns whether
        anything moved: a CPU learner has nothing to hand over."""
        if model_device(self.module).type != "cuda":
            return False
        self.optimizer.offload_to_cpu()
        self.model.offload_grad_buffers()
        return True

    def restore(self) -> bool:
        """Bring back what `offload` moved, for the step."""
        if model_device(self.module).type != "cuda":
            return False
        self.model.restore_grad_buffers()
        self.optimizer.restore_from_cpu()
        return True

    # --- the train step -------------------------------------------------------------------

    def train_step(self, micro_batches: list[MicroBatch]) -> dict[str, float]:
        """Forward and backward over this rank's micro-batches of one mini-batch, then one
        optimizer step. Returns the metrics of the whole mini-batch (all DP ranks) on every
        rank."""
        from megatron.core import parallel_state as ps

        loss_config = self.loss_config
        if needs_topk(loss_config.mode) and any(mb.topk_ids is None for mb in micro_batches):
            raise ValueError(f"loss mode {loss_config.mode!r} needs the rollout engine's top-K logprobs")
        if needs_old_logprob(loss_config.mode) and ps.is_pipeline_last_stage() and any(
                mb.old_logprobs is None for mb in micro_batches):
            raise ValueError(f"loss mode {loss_config.mode!r} needs old_logprobs (Learner.logprobs before the update)")
        denominator = self._global_denominator(micro_batches)
        # Megatron divides each micro-batch loss by their number and averages gradients over
        # DP; the loss is already normalised by the global count, so undo both.
        scale = len(micro_batches) * ps.get_data_parallel_world_size()

        def loss_func(batch: dict, logits: torch.Tensor):
            loss, metrics = self._policy_loss(batch["batch"], logits, denominator)
            metrics["loss"] = loss.detach()
            return loss * scale, metrics

        lr = self.optimizer.param_groups[0]["lr"]
        per_micro_batch, grad_norm, updated = self.optimizer_step([mb.as_dict() for mb in micro_batches], loss_func)
        metrics = self._reduce_metrics(per_micro_batch)
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = lr
        metrics["skipped_update"] = float(not updated)
        agreement = self.routing.agreement() if self.routing is not None else None
        if agreement is not None:
            metrics["routing_agreement"] = agreement
        return metrics

    def optimizer_step(self, micro_batches: list[dict], loss_func) -> tuple[list[dict], float, bool]:
        """Forward and backward of every micro-batch with `loss_func` (see `run_schedule`),
        then one optimizer and schedule step. Returns the micro-batch metrics (last stage), the
        gradient norm and whether the update was applied."""
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.module.train()
        per_micro_batch = self._run(micro_batches, loss_func, forward_only=False)
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(increment=1)
        self.step += 1
        return per_micro_batch, float(grad_norm) if grad_norm is not None else float("nan"), bool(updated)

    def _run(self, micro_batches: list[dict], loss_func, *, forward_only: bool) -> list:
        """Megatron's schedule, with each micro-batch's engine routes handed to the routers
        (replayed under R3, compared otherwise)."""
        if self.routing is None:
            return run_schedule(self.model, micro_batches, loss_func, forward_only=forward_only)

        def routes(batch: dict) -> None:
            mb = batch.get("batch")
            self.routing.before_forward(mb.routed_experts if mb is not None else None)

        self.routing.start()
        try:
            return run_schedule(self.model, micro_batches, loss_func, forward_only=forward_only,
                                before_forward=routes)
        finally:
            self.routing.after_step()

    def _policy_loss(self, batch: MicroBatch, logits: torch.Tensor, denominator: torch.Tensor):
        from megatron.core import parallel_state as ps

        loss_config = self.loss_config
        mask = batch.response_mask[:, 1:].to(logits.device)
        stats = self._token_stats(logits, batch, with_topk=needs_topk(loss_config.mode))
        old = batch.old_logprobs[:, 1:].to(logits.device).float() if batch.old_logprobs is not None else None
        # Every TP rank has the same tokens: one of them counts the masked ids.
        count_ids = ps.get_tensor_model_parallel_rank() == 0
        loss, metrics = policy_loss(
            stats.logprob, batch.rollout_logprobs[:, 1:].to(logits.device).float(),
            batch.advantages.to(logits.device), mask, mode=loss_config.mode, low=loss_config.low,
            high=loss_config.high, ratio_cap=loss_config.ratio_cap, relax_below=loss_config.relax_below,
            aggregation=loss_config.aggregation, max_response_len=loss_config.max_response_len,
            denominator=denominator, topk_tv=stats.topk_tv, topk_kl=stats.topk_kl, old_logprob=old,
            token_ids=batch.tokens[:, 1:].to(logits.device) if count_ids else None, vocab_size=self.arch.vocab_size,
        )
        if count_ids:  # summed here, not carried with every micro-batch's metrics
            self._masked_counts += metrics.pop("masked_token_counts")
        entropy = stats.entropy.detach()
        metrics["entropy"] = torch.where(mask, entropy, 0.0).sum() / mask.sum().clamp(min=1)
        return loss, metrics

    def take_masked_token_counts(self) -> torch.Tensor:
        """[2, vocab] float64 on the CPU: how many times each token id lost its gradient to the
        trust region with A > 0 (row 0) and A < 0 (row 1), over every rank, since the last
        call. A collective: every rank calls it."""
        counts, self._masked_counts = self._masked_counts, torch.zeros_like(self._masked_counts)
        dist.all_reduce(counts)
        return counts.cpu()

    def _token_stats(self, logits: torch.Tensor, batch: MicroBatch, *, with_topk: bool,
                     with_entropy: bool = True, temperature: float | None = None):
        """token_stats of the next token at every position, as [b, s - 1] tensors (entry t is
        about token t + 1). Statistics are taken at all s positions, the last one with a dummy
        target, so that the logits [b, s, V/TP] are used as a view: slicing off the last
        position first would copy them, and fill a full-size gradient in the backward."""
        from megatron.core import parallel_state as ps

        b, s, local_vocab = logits.shape
        device = logits.device

        def next_token(per_position: torch.Tensor, fill) -> torch.Tensor:
            shifted = per_position.new_full(per_position.shape, fill)
            shifted[:, :-1] = per_position[:, 1:]
            return shifted.to(device).reshape(b * s, *per_position.shape[2:])

        topk = {}
        if with_topk:
            topk = dict(topk_ids=next_token(batch.topk_ids, 0),
                        topk_logprobs=next_token(batch.topk_logprobs.float(), -float("inf")))
        stats = token_stats(
            logits.reshape(b * s, local_vocab), next_token(batch.tokens, 0),
            tp_group=ps.get_tensor_model_parallel_group(), vocab_start=ps.get_tensor_model_parallel_rank() * local_vocab,
            vocab_size=self.arch.vocab_size,
            temperature=self.loss_config.temperature if temperature is None else temperature,
            with_entropy=with_entropy, memory_budget=self.loss_config.stats_memory_budget, **topk,
        )
        for field in ("logprob", "entropy", "topk_tv", "topk_kl"):
            value = getattr(stats, field)
            if value is not None:
                setattr(stats, field, value.view(b, s)[:, :-1])
        return stats

    def _global_denominator(self, micro_batches: list[MicroBatch]) -> torch.Tensor:
        """Response tokens (token-mean) or sequences, over the whole mini-batch on all DP ranks."""
        from megatron.core import parallel_state as ps

        if self.loss_config.aggregation == "token-mean":
            local = sum(int(mb.response_mask[:, 1:].sum()) for mb in micro_batches)
        else:
            local = sum(mb.tokens.shape[0] for mb in micro_batches)
        count = torch.tensor([float(local)], device=model_device(self.module))
        dist.all_reduce(count, group=ps.get_data_parallel_group())
        return count.clamp(min=1)[0]

    def _reduce_metrics(self, per_micro_batch: list[dict]) -> dict[str, float]:
        """Combine micro-batch metrics over micro-batches and DP ranks. They live on the last
        pipeline stage; every rank gets the result. Weighted means are summed as value * count
        and divided by the summed count."""
        from megatron.core import parallel_state as ps

        device = model_device(self.module)
        names = list(METRIC_WEIGHTS) + list(SUMMED_METRICS)
        sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        maxima = torch.full((len(MAX_METRICS),), -float("inf"), dtype=torch.float64, device=device)
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
            for metrics in per_micro_batch:
                for i, name in enumerate(names):
                    weight = float(metrics[METRIC_WEIGHTS[name]]) if name in METRIC_WEIGHTS else 1.0
                    sums[i] += float(metrics[name]) * weight
                for j, name in enumerate(MAX_METRICS):
                    maxima[j] = max(maxima[j], float(metrics[name]))
        dist.all_reduce(sums)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        total = dict(zip(names, sums.tolist()))
        out = {name: total[name] for name in SUMMED_METRICS}
        for name, weight_name in METRIC_WEIGHTS.items():
            out[name] = total[name] / total[weight_name] if total[weight_name] > 0 else 0.0
        out.update(zip(MAX_METRICS, maxima.tolist()))
        return out

    def anchor_old_logprobs(self, micro_batches: list[MicroBatch]) -> None:
        """The *_recompute ablations anchor to pi_old: the policy before this step's first
        update. Sets each micro-batch's `old_logprobs` (a collective, before the first update)."""
        for mb, logprob in zip(micro_batches, self.logprobs(micro_batches)):
            mb.old_logprobs = logprob.cpu()

    # --- forward only -----------------------------------------------------------------------

    @torch.no_grad()
    def logprobs(self, micro_batches: list[MicroBatch], temperature: float | None = None) -> list[torch.Tensor]:
        """log pi of every token ([b, s], entry 0 = 0) per micro-batch, on the last pipeline
        stage (an empty list elsewhere): for evaluation and the recompute ablations."""
        from megatron.core import parallel_state as ps

        def keep(batch: dict, logits: torch.Tensor):
            stats = self._token_stats(logits, batch["batch"], with_topk=False, with_entropy=False,
                                      temperature=temperature)
            logprob = torch.zeros(logits.shape[:2], device=logits.device)
            logprob[:, 1:] = stats.logprob
            return torch.zeros((), device=logits.device), {"logprob": logprob}

        self.module.eval()
        results = self._run([mb.as_dict() for mb in micro_batches], keep, forward_only=True)
        return [r["logprob"] for r in results] if ps.is_pipeline_last_stage() else []
