"""A preflight: the recipe's real servers, command lines, learner layout and weight sync, for two
short steps, before the long job; then a verdict from what those steps logged.

The two steps are the trainer's own loop (run/loop.py), changed only where a check needs it:
few prompts and short responses; one mini-batch, so that `train/mismatch_tv` compares the
server's logprobs with the learner's on the same tokens before any update; no staleness, so that
step 1 samples from the weights sent after step 0; and step 0 trains at a probe learning rate
large enough that a server left on the old weights shows in step 1's mismatch. Nothing of a
preflight is kept: it has a run directory of its own, no checkpoint, no export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dppo_megatron.config.schema import Recipe
from dppo_megatron.run.metrics import read_metrics
from dppo_megatron.run.run_dir import read_status

STEPS = 2
# A step from the weights the servers were sent must look as much like the learner as the step
# before (the servers' own numerics); a server on the previous weights shows the probe step.
JUMP_ALLOWED = 3.0


@dataclass(frozen=True)
class Thresholds:
    max_mismatch: float = 0.02  # train/mismatch_tv: bf16 rollouts on GPUs show ~1e-3, float8 ~1e-2
    min_routing_agreement: float = 0.9  # R3: the learner's own router against the replayed routes


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool | None  # None: not reached (an earlier part failed)
    detail: str


def preflight_overrides(recipe: Recipe, *, prompts: int, max_new_tokens: int, probe_lr: float) -> list[str]:
    """The recipe as a preflight runs it."""
    return [
        f"trainer.steps={STEPS}", f"trainer.prompts_per_step={prompts}", "trainer.mini_batches=1",
        "trainer.max_staleness=0", "trainer.eval_every=0", "trainer.save_every=0", "trainer.export_every=0",
        "trainer.save_at_end=false",
        f"rollout.max_new_tokens={min(max_new_tokens, recipe.rollout.max_new_tokens)}",
        f"optim.lr={max(probe_lr, recipe.optim.lr)}", "optim.warmup_steps=0", f"optim.min_lr={recipe.optim.min_lr}",
    ]


def checks(recipe: Recipe, run_dir: Path, thresholds: Thresholds = Thresholds()) -> list[Check]:
    """What the preflight's two steps showed, check by check."""
    status = read_status(run_dir) or {}
    metrics = {m["step"]: m for m in read_metrics(run_dir)}
    failure = status.get("message") if status.get("state") in ("failed", "killed") else None
    rollout = recipe.rollout
    found: list[Check] = []

    def add(name: str, passed: bool | None, detail: str) -> None:
        found.append(Check(name, passed, detail))

    first, second = metrics.get(0), metrics.get(1)
    sync = {"distributed": "weight sync by broadcast, inside SGLang's weight-update session",
            "tensor": "servers released and resumed, weights by handle inside SGLang's weight-update session",
            "disk": "weight sync from disk"}[rollout.weight_sync]
    same_before = "server logprobs = learner logprobs, initial weights"
    same_after = "server logprobs = learner logprobs, the weights sent"
    routes = "R3: the servers' routes = the learner's router"
    later = [same_before, sync, same_after] + ([routes] if rollout.r3 else [])
    if first is None:  # the servers did not start, were refused, or step 0 or its sync failed
        add(f"{rollout.servers} {rollout.engine} server(s), rollouts and the first weight sync", False,
            failure or "no step was logged")
        for name in later:
            add(name, None, "not reached")
        return found
    add(f"{rollout.servers} {rollout.engine} server(s) of the supported release, rollouts", True,
        f"{first.get('batch/samples_trained', '?')} responses, mean length {first.get('response/length_mean', 0):.0f} "
        "tokens")
    before = first["train/mismatch_tv"]
    add(same_before, before <= thresholds.max_mismatch,
        f"train/mismatch_tv {before:.3g} (at most {thresholds.max_mismatch:g})")
    add(sync, True, f"{first.get('time/sync', float('nan')):.1f} s for one version")
    if second is None:
        add(same_after, False, failure or "step 1 was not logged")
        return found
    after = second["train/mismatch_tv"]
    add(same_after, after <= thresholds.max_mismatch and after <= JUMP_ALLOWED * before + 1e-7,
        f"train/mismatch_tv {after:.3g} after the sync, {before:.3g} before (a server left on the old weights "
        f"shows the probe step: more than {JUMP_ALLOWED:g}x)")
    if rollout.r3:
        agreement = min(m.get("train/routing_agreement", 0.0) for m in (first, second))
        add(routes, agreement >= thresholds.min_routing_agreement,
            f"train/routing_agreement {agreement:.3f} (at least {thresholds.min_routing_agreement:g})")
    if failure:
        add("the run", False, failure)
    return found


def verdict_table(found: list[Check]) -> str:
    width = max(len(check.name) for check in found)
    marks = {True: "ok  ", False: "FAIL", None: "--  "}
    lines = [f"{marks[check.passed]}  {check.name:<{width}}  {check.detail}" for check in found]
    passed = all(check.passed for check in found)
    lines.append("preflight passed: the job can start" if passed else "preflight FAILED: fix the FAIL lines first")
    return "\n".join(lines)
