"""Every loss mode through the Megatron learner: the loss and gradient norm of one step at DP=2
(with EP=2) and at TP=2 equal those of a transformers model on the same weights and batch, with
the loss written from the paper's formulas (tests/loss_reference.py) and its gradient taken by
autograd through transformers. A micro-batch or data-parallel scaling error, a mode whose mask
or weight differs from its formula, or a top-K statistic computed on the wrong vocabulary
slice changes one of the two. With R3, the routes replayed are random expert choices the
routers would not make, and the reference forward is forced to them (row t of the routes: the
experts token t went to)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dppo_megatron.algo import LOSS_MODES, needs_old_logprob
from tests.distributed import run_torchrun_each
from tests.loss_reference import reference_loss, topk_divergences
from tests.tiny_models import make_moe

WORKER = str(Path(__file__).parent / "workers" / "loss_parity.py")
SEQUENCES, LENGTH, PROMPT, TOPK, MAX_RESPONSE = 8, 12, 4, 20, 8
RESPONSE_LENGTHS = [8, 5, 8, 3, 7, 8, 6, 4]
ADVANTAGES = [1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0, 1.0]


def thresholds(mode: str) -> dict:
    """Thresholds that split this batch's tokens into kept and dropped for every rule: the tiny
    model's probabilities are near 1/300, so |pi - mu| and the binary KL are small."""
    rule = mode.removesuffix("_recompute")
    extra = {"dppo_binary_tv": dict(low=0.001, high=0.001), "dppo_binary_kl": dict(low=3e-4, high=3e-4),
             "dppo_topk_tv": dict(low=0.09, high=0.09), "dppo_topk_kl": dict(low=0.05, high=0.05),
             }.get(rule, dict(low=0.2, high=0.28))
    if rule.startswith("grpo_relax"):
        extra["relax_below"] = 0.004
    if mode == "pg_tis":
        extra["ratio_cap"] = 2.0
    return extra


CASES = [dict(name=mode, mode=mode, aggregation="token-mean", **thresholds(mode)) for mode in LOSS_MODES] + [
    dict(name="dppo_binary_tv/dr-grpo", mode="dppo_binary_tv", aggregation="seq-mean-token-sum-norm",
         max_response_len=MAX_RESPONSE, **thresholds("dppo_binary_tv")),
    dict(name="grpo/seq-mean-token-mean", mode="grpo", aggregation="seq-mean-token-mean", **thresholds("grpo")),
]
R3_CASES = [CASES[0]]  # with routes replayed


def make_batch(arch_experts: int, experts_per_token: int, layers: int, vocab: int, model) -> dict:
    """Random tokens; mu a nearby distribution (the model's logits plus noise), its sampled
    token's logprob and its top-K with the sampled token forced in (as the rollout client
    does); random routes for every token and layer."""
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (SEQUENCES, LENGTH), generator=gen)
    mask = torch.zeros(SEQUENCES, LENGTH, dtype=torch.bool)
    for row, n in enumerate(RESPONSE_LENGTHS):
        mask[row, PROMPT : PROMPT + n] = True
    routes = torch.stack([torch.randperm(arch_experts, generator=gen)[:experts_per_token]
                          for _ in range(SEQUENCES * LENGTH * layers)]).view(SEQUENCES, LENGTH, layers, -1)
    with torch.no_grad():
        logits = forced_forward(model, tokens, routes).double()
    mu = torch.log_softmax(logits + 0.5 * torch.randn(logits.shape, generator=gen, dtype=torch.float64), dim=-1)
    rollout = torch.zeros(SEQUENCES, LENGTH)
    rollout[:, 1:] = mu[:, :-1].gather(2, tokens[:, 1:, None]).squeeze(2).float()
    topk_ids = torch.zeros(SEQUENCES, LENGTH, TOPK, dtype=torch.long)
    topk_ids[:, 1:] = mu[:, :-1].topk(TOPK, dim=-1).indices
    sampled = tokens[:, 1:]
    missing = ~(topk_ids[:, 1:] == sampled[..., None]).any(-1)
    topk_ids[:, 1:, -1] = torch.where(missing, sampled, topk_ids[:, 1:, -1])
    topk_logprobs = torch.zeros(SEQUENCES, LENGTH, TOPK)
    topk_logprobs[:, 1:] = mu[:, :-1].gather(2, topk_ids[:, 1:]).float()
    return dict(tokens=tokens, response_mask=mask, rollout_logprobs=rollout * mask,
                advantages=torch.tensor(ADVANTAGES), topk_ids=topk_ids, topk_logprobs=topk_logprobs,
                routed_experts=routes.to(torch.int16))


def forced_forward(model, tokens: torch.Tensor, routes: torch.Tensor | None) -> torch.Tensor:
    """transformers' forward; with `routes` [b, s, layers, k], every MoE router sends token t
    to routes[:, t, layer] with its softmax weights there (renormalised: norm_topk_prob)."""
    if routes is None:
        return model(tokens).logits
    originals = []
    for index, layer in enumerate(model.model.layers):
        gate = layer.mlp.gate
        ids = routes[:, :, index].reshape(-1, routes.shape[-1]).long()

        def forced(hidden, gate=gate, ids=ids):
            router_logits = torch.nn.functional.linear(hidden.reshape(-1, gate.hidden_dim), gate.weight)
            probs = torch.softmax(router_logits, dtype=torch.float, dim=-1)
            weights = probs.gather(1, ids)
            if gate.norm_topk_prob:
                weights = weights / weights.sum(-1, keepdim=True)
            return router_logits, weights.to(router_logits.dtype), ids

        originals.append((gate, gate.forward))
        gate.forward = forced
    try:
        return model(tokens).logits
    finally:
        for gate, forward in originals:
            gate.forward = forward


def reference_step(hf_dir: Path, batch: dict, case: dict, *, r3: bool) -> dict:
    """The case's loss, its gradient norm over every parameter, and the tokens it drops, from
    transformers in float32 with the loss in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    logits = forced_forward(model, batch["tokens"], batch["routed_experts"] if r3 else None)
    log_pi = torch.log_softmax(logits.double(), dim=-1)[:, :-1]  # position t - 1 predicts token t
    logprob = log_pi.gather(2, batch["tokens"][:, 1:, None]).squeeze(2)
    tv, kl = topk_divergences(log_pi.detach(), batch["topk_ids"][:, 1:], batch["topk_logprobs"][:, 1:])
    mask = batch["response_mask"][:, 1:]
    options = {k: v for k, v in case.items() if k not in ("name", "mode")}
    if needs_old_logprob(case["mode"]):
        options["old_logprob"] = logprob.detach()
    loss, grad = reference_loss(case["mode"], logprob.detach(), batch["rollout_logprobs"][:, 1:].double(),
                                batch["advantages"].double(), mask, topk_tv=tv, topk_kl=kl, **options)
    logprob.backward(grad)
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    signed = mask & (batch["advantages"][:, None] != 0)
    return {"loss": loss, "grad_norm": float(grad_norm), "tokens_masked": int((signed & (grad == 0)).sum()),
            "tokens_kept": int((signed & (grad != 0)).sum())}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("loss-parity")
    # Both layers MoE (R3 replays every layer); no load-balancing loss, so that the gradient is
    # the policy loss's alone.
    hf = make_moe(root / "hf", mlp_only_layers=(), router_aux_loss_coef=0.0)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    config = model.config
    batch = make_batch(config.num_experts, config.num_experts_per_tok, config.num_hidden_layers, config.vocab_size,
                       model)
    torch.save(batch, root / "batch.pt")
    return root, hf, batch


LAYOUTS = {"dp2-ep2": ("1", "2"), "tp2": ("2", "1")}


@pytest.fixture(scope="module")
def learner_results(setup):
    """Every case at each layout, and the R3 cases at TP=2, in one torchrun."""
    root, hf, _ = setup
    runs = [[root / name, tp, ep, hf, root / "batch.pt", json.dumps(CASES), "off"]
            for name, (tp, ep) in LAYOUTS.items()]
    runs.append([root / "tp2-r3", "2", "1", hf, root / "batch.pt", json.dumps(R3_CASES), "on"])
    run_torchrun_each(WORKER, 2, runs, timeout=600)
    return {name: json.loads((root / name / "results.json").read_text()) for name in [*LAYOUTS, "tp2-r3"]}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_one_learner_step_has_the_loss_and_gradient_norm_of_the_formula(setup, learner_results, case):
    _, hf, batch = setup
    expected = reference_step(hf, batch, case, r3=False)
    # The batch exercises the rule: tokens with A != 0 kept, and where the mode masks, some
    # dropped. The *_recompute modes anchor to pi_old, which is pi itself at a batch's first
    # update: they drop nothing there, and weigh each token by pi / mu.
    masks = case["mode"] not in ("cispo", "pg_is", "pg_tis") and not needs_old_logprob(case["mode"])
    assert expected["tokens_kept"] > 0 and (expected["tokens_masked"] > 0) == masks, expected
    for layout in LAYOUTS:
        got = learner_results[layout][case["name"]]
        assert got["tokens_masked"] == expected["tokens_masked"], layout
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5, abs=1e-8), layout
        assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4), layout


@pytest.mark.parametrize("case", R3_CASES, ids=[c["name"] for c in R3_CASES])
def test_with_r3_the_step_follows_routes_the_routers_would_not_pick(setup, learner_results, case):
    _, hf, batch = setup
    forced = reference_step(hf, batch, case, r3=True)
    natural = reference_step(hf, batch, case, r3=False)
    # The random routes change the model's answer: the test can tell routes apart.
    assert abs(forced["grad_norm"] - natural["grad_norm"]) > 1e-3 * natural["grad_norm"]
    got = learner_results["tp2-r3"][case["name"]]
    assert got["tokens_masked"] == forced["tokens_masked"]
    assert got["loss"] == pytest.approx(forced["loss"], rel=1e-5, abs=1e-8)
    assert got["grad_norm"] == pytest.approx(forced["grad_norm"], rel=1e-4)
