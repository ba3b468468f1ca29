"""Megatron (our Qwen3 providers, loaded through the conversion table) against transformers as
the independent reference, at every parallel layout, and HF -> Megatron -> HF round trips."""

import json
from pathlib import Path

import pytest
import torch

from dppo_megatron.model.hf_io import HFCheckpointReader
from tests.distributed import run_torchrun
from tests.tiny_models import hf_logits, make_dense, make_moe, parity_tokens

LOGIT_TOL = 1e-4
WORKER = str(Path(__file__).parent / "workers" / "megatron_parity.py")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "dense": make_dense(root / "dense"),  # tied embeddings, like the small Qwen3 models
        "moe": make_moe(root / "moe"),  # norm_topk_prob, layer 1 dense (mlp_only_layers)
        "moe-unnormalized": make_moe(root / "moe-unnormalized", seed=1, norm_topk_prob=False, mlp_only_layers=()),
    }


LAYOUTS = [
    # ranks, tp, pp, ep, models
    (1, 1, 1, 1, ("dense", "moe", "moe-unnormalized")),
    (2, 2, 1, 1, ("dense", "moe")),  # TP=2 with sequence parallel
    (2, 1, 1, 2, ("moe",)),
    (2, 2, 1, 2, ("moe",)),  # TP=2 + EP=2 on 2 ranks (expert TP 1)
    (2, 1, 2, 1, ("dense", "moe")),  # PP=2: works on gloo
]


@pytest.fixture(scope="module")
def outputs(checkpoints, tmp_path_factory):
    """Every layout's logits and export: one torchrun per world size, the layouts of a size one
    after another in the same ranks."""
    root = tmp_path_factory.mktemp("parity")
    for world in sorted({layout[0] for layout in LAYOUTS}):
        runs = [{"tp": tp, "pp": pp, "ep": ep, "models": [str(checkpoints[m]) for m in models]}
                for ranks, tp, pp, ep, models in LAYOUTS if ranks == world]
        run_torchrun(WORKER, world, str(root), json.dumps(runs), timeout=300)
    return root


@pytest.mark.parametrize("ranks, tp, pp, ep, models", LAYOUTS, ids=lambda v: str(v))
def test_megatron_logits_match_transformers_and_export_is_bit_identical(checkpoints, outputs, ranks, tp, pp, ep,
                                                                          models):
    for name in models:
        result = outputs / f"tp{tp}-pp{pp}-ep{ep}" / name
        reference = hf_logits(checkpoints[name], parity_tokens())
        logits = torch.load(result / "logits.pt")
        diff = (logits - reference).abs().max().item()
        assert diff <= LOGIT_TOL, f"{name} at tp={tp} pp={pp} ep={ep}: max |logit diff| {diff:.3g}"

        original, exported = HFCheckpointReader(checkpoints[name]), HFCheckpointReader(result / "export")
        assert sorted(exported.names()) == sorted(original.names())
        for tensor_name in original.names():
            assert torch.equal(exported.get(tensor_name), original.get(tensor_name)), tensor_name


def test_export_from_tp2_ep2_loads_in_transformers_with_the_original_logits(checkpoints, outputs):
    export = outputs / "tp2-pp1-ep2" / "moe" / "export"
    assert len(list(export.glob("model-*-of-*.safetensors"))) > 1  # sharded, with an index
    torch.testing.assert_close(hf_logits(export, parity_tokens()), hf_logits(checkpoints["moe"], parity_tokens()),
                               atol=0, rtol=0)
