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


def test_never_copies_all_logits_to_fp32():
    """The largest single allocation stays near one chunk, far below [tokens, V] in fp32."""
    tokens, vocab, chunk = 256, 4096, 16
    logits = torch.randn(tokens, vocab, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    top = torch.randint(0, vocab, (tokens, 8))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        stats = token_stats(logits, targets, topk_ids=top, topk_logprobs=torch.full((tokens, 8), -5.0),
                            with_entropy=True, chunk_tokens=chunk)
        (stats.logprob.sum() + stats.entropy.sum()).backward()
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    full_fp32 = tokens * vocab * 4
    grad_bf16 = tokens * vocab * 2  # the gradient of the logits themselves, in their dtype
    assert largest <= grad_bf16, f"largest allocation {largest} B vs fp32 copy {full_fp32} B"


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
