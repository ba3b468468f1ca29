"""R3: with routing replay on, the learner routes every token and layer as the engine did,
even with its routers perturbed; with it off, it does not."""

import json
from pathlib import Path

import pytest
import torch

from dppo_megatron.rollout.engine import EmbeddedEngine
from dppo_megatron.rollout.protocol import RoutingShape, SamplingParams, generate_request, parse_generate_response
from tests.distributed import run_torchrun
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


@pytest.mark.parametrize(
    "tp, pp, ep, recompute",
    [("2", "1", "1", "off"), ("1", "2", "1", "on"), ("1", "1", "2", "off")],
    ids=["tp2-sequence-parallel", "pp2-recompute", "ep2"],
)
def test_with_r3_the_learner_routes_exactly_as_the_engine(engine_samples, tmp_path, tp, pp, ep, recompute):
    hf, samples = engine_samples
    run_torchrun(WORKER, 2, str(tmp_path), tp, pp, ep, str(hf), str(samples), "on", recompute)
    agreement = json.loads((tmp_path / "agreement.json").read_text())
    assert agreement == {"train": 1.0, "forward": 1.0}


def test_without_r3_perturbed_routers_route_differently(engine_samples, tmp_path):
    hf, samples = engine_samples
    run_torchrun(WORKER, 2, str(tmp_path), "2", "1", "1", str(hf), str(samples), "off", "off")
    agreement = json.loads((tmp_path / "agreement.json").read_text())
    assert 0.0 < agreement["train"] < 0.9 and 0.0 < agreement["forward"] < 0.9
