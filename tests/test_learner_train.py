"""DPPO steps through the Megatron learner on 2 gloo ranks: on-policy at the first step,
the policy moves the way the advantages say, and the trust region masks tokens."""

import json
from pathlib import Path

import pytest

from tests.distributed import run_torchrun_each
from tests.tiny_models import make_moe

WORKER = str(Path(__file__).parent / "workers" / "learner_train.py")


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    return make_moe(tmp_path_factory.mktemp("hf") / "moe")


TRAIN_CASES = {  # name -> tp, pp, ep, mode, threshold
    "tp2-topk-kl": ("2", "1", "1", "dppo_topk_kl", "0.01"),  # top-K statistics through the vocab-parallel path
    "pp2-binary-tv": ("1", "2", "1", "dppo_binary_tv", "0.005"),  # the pipeline schedule trains too
    "ep2-grpo": ("1", "1", "2", "grpo", "0.2"),
}


@pytest.fixture(scope="module")
def runs(moe_checkpoint, tmp_path_factory):
    """Every case in one torchrun: 4 steps at each layout, and 2 steps at TP=2 with and without
    full activation recompute."""
    root = tmp_path_factory.mktemp("train")
    cases = [[root / name, *case, "4", moe_checkpoint] for name, case in TRAIN_CASES.items()]
    recompute = ("2", "1", "1", "dppo_topk_kl", "0.01", "2", moe_checkpoint)
    cases += [[root / "plain", *recompute], [root / "recompute", *recompute, "recompute"]]
    run_torchrun_each(WORKER, 2, cases)
    return root


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_steps_follow_the_advantages(runs, case):
    tp, pp, ep, mode, threshold = TRAIN_CASES[case]
    history = json.loads((runs / case / "metrics.json").read_text())
    policy = json.loads((runs / case / "policy.json").read_text())

    first = history[0]
    # mu came from transformers on the same weights: the learner starts exactly on-policy.
    assert first["mismatch_tv"] < 1e-6 and abs(first["ratio_mean"] - 1) < 1e-5 and first["kl_k3"] < 1e-6
    data_parallel = 2 // (int(tp) * int(pp))  # each DP rank brings its own 24 response tokens
    assert first["masked_frac"] == 0 and first["tokens"] == 24 * data_parallel

    # The objective -mean(A * log pi) over the batch falls: A > 0 responses become more likely,
    # A < 0 ones less.
    before, after = policy["before"], policy["after"]
    assert after["positive"] > before["positive"] + 1.0
    assert after["negative"] < before["negative"] - 1.0
    assert all(m["grad_norm"] > 0 and m["skipped_update"] == 0 for m in history)
    if mode.startswith("dppo"):
        # Once pi has moved past the (tight) trust region, tokens are masked.
        assert max(m["masked_frac"] for m in history[1:]) > 0


def test_full_activation_recompute_gives_the_same_steps(runs):
    plain = json.loads((runs / "plain" / "metrics.json").read_text())
    recomputed = json.loads((runs / "recompute" / "metrics.json").read_text())
    for a, b in zip(plain, recomputed):
        for key in ("loss", "grad_norm", "mismatch_tv", "kl_k3", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
