"""token_stats against a float64 full-vocabulary reference, on one rank and split over
TP = 2 and 4 gloo ranks."""

from pathlib import Path

import pytest
import torch

from dppo_megatron.algo import token_stats
from tests.distributed import run_torchrun
from tests.token_stats_reference import all_cases, make_case, reference

STAT_TOL = 1e-6
WORKER = str(Path(__file__).parent / "workers" / "token_stats_tp.py")


def assert_matches_reference(case, got: dict[str, torch.Tensor]) -> None:
    want = reference(case)
    for key in ("logprob", "entropy", "topk_tv", "topk_kl"):
        err = (got[key].double() - want[key]).abs().max().item()
        assert err <= STAT_TOL, f"{case.name}: {key} off by {err:.3g}"
    # Gradients in the logits' dtype: fp32 to its rounding, bf16 to bf16 rounding.
    tol = dict(atol=1e-6, rtol=1e-5) if case.logits.dtype == torch.float32 else dict(atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(got["grad"].double(), want["grad"], **tol, msg=lambda m: f"{case.name} grad: {m}")


def single_rank(case, **kwargs) -> dict[str, torch.Tensor]:
    logits = case.logits.clone().requires_grad_()
    stats = token_stats(
        logits, case.target_ids, topk_ids=case.topk_ids, topk_logprobs=case.topk_logprobs,
        temperature=case.temperature, vocab_size=case.vocab_size, with_entropy=True, **kwargs,
    )
    loss = (case.logprob_weights * stats.logprob).sum() + (case.entropy_weights * stats.entropy).sum()
    loss.backward()
    return {"logprob": stats.logprob, "entropy": stats.entropy, "topk_tv": stats.topk_tv,
            "topk_kl": stats.topk_kl, "grad": logits.grad}


@pytest.mark.parametrize("case", all_cases(), ids=lambda c: c.name)
@pytest.mark.parametrize("chunk_tokens", [None, 1, 7])
def test_single_rank_matches_float64_reference(case, chunk_tokens):
    assert_matches_reference(case, single_rank(case, chunk_tokens=chunk_tokens))


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_matches_float64_reference(tp, tmp_path):
    run_torchrun(WORKER, tp, str(tmp_path))
    for case in all_cases():
        ranks = [torch.load(tmp_path / f"{case.name}-rank{r}.pt") for r in range(tp)]
        for r in ranks[1:]:  # every rank ends with the same per-token results
            for key in ("logprob", "entropy", "topk_tv", "topk_kl"):
                assert torch.equal(r[key], ranks[0][key]), f"{case.name}: {key} differs between ranks"
        got = dict(ranks[0], grad=torch.cat([r["grad"] for r in ranks], dim=1))
        assert_matches_reference(case, got)


def test_sampled_token_inside_and_outside_topk_both_occur():
    for case in all_cases():
        inside = (case.topk_ids == case.target_ids[:, None]).any(dim=1)
        assert inside.any() and (~inside).any(), case.name


def test_padded_columns_get_no_probability_and_no_gradient():
    case = make_case("pad", seed=5, tokens=6, vocab_size=90, padded_vocab=128, topk=3, temperature=1.0)
    got = single_rank(case)
    assert torch.all(got["grad"][:, 90:] == 0)
    # With the padding counted, the garbage logits (50.0) would take nearly all the mass.
    assert got["logprob"].max() > -20


def test_outputs_without_entropy_or_topk_are_none_and_logprob_unchanged():
    case = all_cases()[0]
    full = token_stats(case.logits, case.target_ids, topk_ids=case.topk_ids, topk_logprobs=case.topk_logprobs,
                       with_entropy=True)
    plain = token_stats(case.logits, case.target_ids)
    assert plain.entropy is None and plain.topk_tv is None and plain.topk_kl is None
    # With top-K ids, sum(e) is assembled as other + sum over the ids: same value to rounding.
    torch.testing.assert_close(plain.logprob, full.logprob, atol=STAT_TOL, rtol=0)


def test_topk_divergences_carry_no_gradient():
    case = all_cases()[0]
    logits = case.logits.clone().requires_grad_()
    stats = token_stats(logits, case.target_ids, topk_ids=case.topk_ids, topk_logprobs=case.topk_logprobs)
    assert not stats.topk_tv.requires_grad and not stats.topk_kl.requires_grad
    assert stats.logprob.requires_grad


def test_identical_policies_have_zero_topk_divergence():
    logits = torch.randn(5, 64, dtype=torch.float64).float()
    mu = torch.log_softmax(logits.double(), -1)
    top = mu.topk(4, dim=-1)
    stats = token_stats(logits, top.indices[:, 0], topk_ids=top.indices, topk_logprobs=top.values.float())
    assert stats.topk_tv.abs().max() < 1e-6 and stats.topk_kl.abs().max() < 1e-6


def test_empty_batch_gives_empty_results():
    logits = torch.randn(0, 32, requires_grad=True)
    stats = token_stats(logits, torch.zeros(0, dtype=torch.long), with_entropy=True)
    assert stats.logprob.shape == (0,) and stats.entropy.shape == (0,)
    stats.logprob.sum().backward()
    assert logits.grad.shape == (0, 32)


@pytest.mark.parametrize("tokens", [256, 1024])
def test_memory_beyond_the_gradient_is_the_budget_plus_o_tokens_times_k(tokens):
    """Forward and backward: the gradient of the logits is allocated once, in their own dtype;
    every other allocation fits one chunk buffer (half the budget), and all of them together
    are the budget (forward and backward buffers) plus O(tokens x K), whatever the number of
    tokens. An fp32 [tokens, V] tensor anywhere (16 KiB a token here) breaks all three."""
    vocab, k, budget = 4096, 8, 1 << 20
    logits = torch.randn(tokens, vocab, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    top = torch.randint(0, vocab, (tokens, k))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        stats = token_stats(logits, targets, topk_ids=top, topk_logprobs=torch.full((tokens, k), -5.0),
                            with_entropy=True, memory_budget=budget)
        (stats.logprob.sum() + stats.entropy.sum()).backward()
    sizes = sorted((e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0), reverse=True)
    gradient, rest = sizes[0], sizes[1:]
    assert logits.grad.dtype == torch.bfloat16 and gradient == tokens * vocab * 2
    assert max(rest) <= budget // 2, f"an allocation of {max(rest)} B; one chunk buffer is {budget // 2} B"
    assert sum(rest) <= 2 * budget + 256 * tokens * (k + 4), f"{sum(rest)} B beyond the gradient"


def test_the_memory_budget_sets_the_chunk_and_not_the_result():
    logits = torch.randn(64, 1000, dtype=torch.float64).float()
    targets = torch.randint(0, 1000, (64,))
    small = token_stats(logits, targets, with_entropy=True, memory_budget=3 * 8 * 1001)  # 3 tokens a chunk
    large = token_stats(logits, targets, with_entropy=True)
    torch.testing.assert_close(small.logprob, large.logprob, atol=1e-6, rtol=0)
    torch.testing.assert_close(small.entropy, large.entropy, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="memory_budget"):
        token_stats(logits, targets, memory_budget=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_ids=torch.tensor([0, 99])), "target_ids must lie in"),
        (dict(target_ids=torch.tensor([0.0, 1.0])), "integer"),
        (dict(topk_ids=torch.zeros(2, 3, dtype=torch.long)), "given together"),
        (dict(topk_ids=torch.zeros(2, 3, dtype=torch.long), topk_logprobs=torch.zeros(2, 4)), "shape"),
        (dict(temperature=0.0), "temperature"),
        (dict(vocab_size=10), "target_ids must lie in"),
    ],
)
def test_bad_inputs_are_refused_with_the_argument_named(kwargs, message):
    args = dict(target_ids=torch.tensor([0, 20]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        token_stats(torch.randn(2, 32), **args)


def test_repeated_topk_ids_do_not_change_the_logprob():
    """Positions without a real top-K set (prompt tokens, padding) may carry repeated ids."""
    logits = torch.randn(6, 50, dtype=torch.float64).float()
    targets = torch.randint(0, 50, (6,))
    repeated = torch.zeros(6, 4, dtype=torch.long)
    with_repeats = token_stats(logits, targets, topk_ids=repeated, topk_logprobs=torch.full((6, 4), -9.0),
                               with_entropy=True)
    plain = token_stats(logits, targets, with_entropy=True)
    torch.testing.assert_close(with_repeats.logprob, plain.logprob, atol=1e-6, rtol=0)
    torch.testing.assert_close(with_repeats.entropy, plain.entropy, atol=1e-6, rtol=0)
