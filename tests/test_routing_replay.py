"""R3: with routing replay on, the learner routes every token and layer as the engine did,
even with its routers perturbed; with it off, it does not."""

import json
from pathlib import Path

import pytest
import torch

from dppo_megatron.rollout.engine import EmbeddedEngine
from dppo_megatron.rollout.protocol import RoutingShape, SamplingParams, generate_request, parse_generate_response
from tests.distributed import run_torchrun_each
from tests.tiny_models import make_moe

WORKER = str(Path(__file__).parent / "workers" / "routing_replay.py")


@pytest.fixture(scope="module")
def engine_samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("r3")
    hf = make_moe(root / "hf", mlp_only_layers=())  # both layers MoE: one per stage at PP=2
    engine = EmbeddedEngine(hf, enable_routed_experts=True, seed=0)
    samples = []
    for index, prompt in enumerate([[5, 17, 42, 99], [7, 7, 8], [250, 3, 14, 15, 92, 65], [1, 2]]):
        body = generate_request(f"r{index}", prompt, SamplingParams(max_new_tokens=8), return_routed_experts=True)
        sample = parse_generate_response(engine.generate(body), rid=f"r{index}", prompt_ids=prompt,
                                         routing=RoutingShape(num_layers=2, experts_per_token=2, num_experts=4))
        samples.append((prompt, sample.response_ids, sample.logprobs, sample.routed_experts))
    torch.save(samples, root / "samples.pt")
    return hf, root / "samples.pt"


R3_LAYOUTS = {"tp2-sequence-parallel": ("2", "1", "1", "off"), "pp2-recompute": ("1", "2", "1", "on"),
              "ep2": ("1", "1", "2", "off")}


@pytest.fixture(scope="module")
def agreements(engine_samples, tmp_path_factory):
    """The learner's routing agreement with the engine for every case, in one torchrun: R3 on at
    each layout, and R3 off at TP=2."""
    hf, samples = engine_samples
    root = tmp_path_factory.mktemp("agreement")
    # name -> (tp, pp, ep, r3, recompute)
    cases = {name: (tp, pp, ep, "on", recompute) for name, (tp, pp, ep, recompute) in R3_LAYOUTS.items()}
    cases["off"] = ("2", "1", "1", "off", "off")
    runs = []
    for name, (tp, pp, ep, r3, recompute) in cases.items():
        (root / name).mkdir()
        runs.append([root / name, tp, pp, ep, hf, samples, r3, recompute])
    run_torchrun_each(WORKER, 2, runs)
    return {name: json.loads((root / name / "agreement.json").read_text()) for name in cases}


@pytest.mark.parametrize("layout", list(R3_LAYOUTS))
def test_with_r3_the_learner_routes_exactly_as_the_engine(agreements, layout):
    assert agreements[layout] == {"train": 1.0, "forward": 1.0}


def test_without_r3_perturbed_routers_route_differently(agreements):
    agreement = agreements["off"]
    assert 0.0 < agreement["train"] < 0.9 and 0.0 < agreement["forward"] < 0.9
