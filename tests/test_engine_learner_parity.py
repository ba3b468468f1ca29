"""The embedded engine and the Megatron learner agree on the same weights (fp32): the
engine's logprobs of its own samples equal the learner's at TP=2 + EP=2."""

from pathlib import Path

import pytest
import torch

from dppo_megatron.rollout.engine import EmbeddedEngine
from dppo_megatron.rollout.protocol import SamplingParams, generate_request, parse_generate_response
from tests.distributed import run_torchrun_each
from tests.tiny_models import make_moe

WORKER = str(Path(__file__).parent / "workers" / "engine_learner_parity.py")
TEMPERATURE = 0.9


LAYOUTS = {"tp2-ep2": ("2", "2"), "ep2": ("1", "2")}


@pytest.fixture(scope="module")
def logprobs(tmp_path_factory):
    """The engine's logprobs of its own samples, and the learner's at each layout (one torchrun)."""
    root = tmp_path_factory.mktemp("parity")
    hf = make_moe(root / "hf")
    engine = EmbeddedEngine(hf, seed=0)
    samples, engine_logprobs = [], []
    for index, prompt in enumerate([[5, 17, 42, 99], [7, 7, 8], [250, 3, 14, 15, 92, 65], [1]]):
        body = generate_request(f"r{index}", prompt, SamplingParams(max_new_tokens=10, temperature=TEMPERATURE))
        sample = parse_generate_response(engine.generate(body), rid=f"r{index}", prompt_ids=prompt)
        samples.append((prompt, sample.response_ids))
        engine_logprobs.append(sample.logprobs)
    torch.save(samples, root / "samples.pt")
    runs = []
    for name, (tp, ep) in LAYOUTS.items():
        (root / name).mkdir()
        runs.append([root / name, tp, ep, hf, root / "samples.pt", TEMPERATURE])
    run_torchrun_each(WORKER, 2, runs)
    return engine_logprobs, {name: torch.load(root / name / "learner_logprobs.pt") for name in LAYOUTS}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_engine_logprobs_equal_learner_logprobs(logprobs, layout):
    engine_logprobs, learner = logprobs
    for engine_side, learner_side in zip(engine_logprobs, learner[layout]):
        diff = (torch.tensor(engine_side) - torch.tensor(learner_side)).abs().max().item()
        print(f"engine-learner max |logprob diff| {diff:.3g}")
        assert diff <= 1e-4, f"engine vs learner logprob differ by {diff:.3g}"
