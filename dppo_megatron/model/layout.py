"""The learner's parallel layout (TP, PP, EP, ETP; data parallel takes the ranks left over):
checked against a model before any rank starts. Plain Python: recipes, conversion and the
learner all use it; `learner.parallel.init_parallel` applies it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dppo_megatron.model.arch import Qwen3Arch


class LayoutError(ValueError):
    """A parallel layout that cannot work for this model on this many ranks."""


def expert_tp_default(tp: int, ep: int) -> int:
    """Expert tensor parallel when a recipe leaves it out: experts split like the dense layers
    when there is no expert parallelism (the only correct choice then, see `problems`), whole
    on each rank when there is."""
    return tp if ep == 1 else 1


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of each parallel dimension; data parallel takes the ranks left over.

    Expert tensor parallel (etp) defaults to `expert_tp_default`: 1 (experts whole on each
    rank, the usual choice for Qwen3-MoE) with EP, TP without. Sequence parallel is on whenever
    TP > 1 (Megatron requires it for MoE with TP, and it saves activation memory for dense
    models too)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # None: expert_tp_default(tp, ep)
    use_distributed_optimizer: bool = True

    def __post_init__(self):
        if self.etp is None:
            object.__setattr__(self, "etp", expert_tp_default(self.tp, self.ep))

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1

    @property
    def fewest_ranks(self) -> int:
        """The fewest ranks that hold this layout (data parallel 1 for the dense part)."""
        return math.lcm(self.tp * self.pp, self.etp * self.ep * self.pp)

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)

    def problems(self, world_size: int, arch: Qwen3Arch) -> list[str]:
        """Every reason this layout cannot run, as sentences naming the numbers."""
        out = []
        for name in ("tp", "pp", "ep", "etp"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if out:
            return out
        if world_size % (self.tp * self.pp):
            out.append(f"world size {world_size} is not a multiple of tp*pp = {self.tp}*{self.pp}")
        if world_size % (self.etp * self.ep * self.pp):
            out.append(f"world size {world_size} is not a multiple of etp*ep*pp = {self.etp}*{self.ep}*{self.pp}")
        if arch.num_attention_heads % self.tp:
            out.append(f"num_attention_heads {arch.num_attention_heads} is not divisible by tp {self.tp}")
        if arch.num_key_value_heads % self.tp:
            out.append(f"num_key_value_heads (query groups) {arch.num_key_value_heads} is not divisible by tp {self.tp}")
        if arch.num_layers % self.pp:
            out.append(f"num_hidden_layers {arch.num_layers} is not divisible by pp {self.pp}")
        if arch.padded_vocab_size % self.tp:
            out.append(f"padded vocabulary {arch.padded_vocab_size} is not divisible by tp {self.tp}")
        if any(not arch.is_moe_layer(layer) for layer in range(arch.num_layers)) and arch.intermediate_size % self.tp:
            out.append(f"intermediate_size {arch.intermediate_size} is not divisible by tp {self.tp}")
        if arch.is_moe:
            if arch.num_experts % self.ep:
                out.append(f"num_experts {arch.num_experts} is not divisible by ep {self.ep}")
            if arch.moe_intermediate_size % self.etp:
                out.append(f"moe_intermediate_size {arch.moe_intermediate_size} is not divisible by etp {self.etp}")
            if self.ep == 1 and self.etp != self.tp:
                # Megatron sums expert gradients over the ranks that share an expert only with
                # EP > 1; without it, experts copied on TP ranks that each route their own
                # share of the sequence would each learn from that share alone.
                out.append(f"with ep 1, etp must equal tp (got etp {self.etp}, tp {self.tp}): experts copied "
                           "on tensor-parallel ranks would each train on part of the batch; leave etp unset "
                           "or use ep > 1")
        elif self.ep > 1 or self.etp not in (1, self.tp):
            out.append(f"ep {self.ep} / etp {self.etp} need a MoE model; {arch.architecture} has no experts")
        return out

    def validate(self, world_size: int, arch: Qwen3Arch) -> None:
        problems = self.problems(world_size, arch)
        if problems:
            raise LayoutError(
                f"parallel layout tp={self.tp} pp={self.pp} ep={self.ep} etp={self.etp} on {world_size} ranks: "
                + "; ".join(problems)
            )
