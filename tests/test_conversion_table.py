"""The architecture reader, the HF <-> Megatron table, and layout validation (no Megatron run)."""

import json

import pytest
import torch

from dppo_megatron.model.arch import ArchError, Qwen3Arch
from dppo_megatron.model.layout import LayoutError, ParallelLayout
from dppo_megatron.model.mapping import hf_tensor_names, tensor_map, to_hf, to_megatron

QWEN3_30B_A3B = {  # the published config.json of Qwen3-30B-A3B (transformers 4 names)
    "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 40960, "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.001, "attention_bias": False,
}


def small_moe(**overrides) -> Qwen3Arch:
    config = dict(QWEN3_30B_A3B, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                  num_experts=4, num_experts_per_tok=2, vocab_size=100, mlp_only_layers=[1])
    config.update(overrides)
    return Qwen3Arch.from_hf(config)


def test_reads_the_qwen3_30b_a3b_config():
    arch = Qwen3Arch.from_hf(QWEN3_30B_A3B)
    assert arch.is_moe and arch.num_experts == 128 and arch.num_experts_per_tok == 8
    assert arch.moe_layers == list(range(48)) and arch.rope_theta == 1e6
    assert arch.padded_vocab_size == 152576 and arch.padded_vocab_size % 8 == 0


def test_reads_transformers_5_field_names(tmp_path):
    config = dict(QWEN3_30B_A3B)
    config["num_local_experts"] = config.pop("num_experts")
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config.pop("rope_theta")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert Qwen3Arch.from_hf(tmp_path) == Qwen3Arch.from_hf(QWEN3_30B_A3B)


def test_sparse_layer_rule_follows_mlp_only_layers_and_sparse_step():
    assert small_moe().moe_layers == [0, 2]
    assert small_moe(decoder_sparse_step=2, mlp_only_layers=[]).moe_layers == [1]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(architectures=["LlamaForCausalLM"]), "none of the supported"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling"),
        (dict(hidden_size=None), None),
    ],
)
def test_unsupported_configs_are_refused_with_the_field_named(change, message):
    config = dict(QWEN3_30B_A3B, **change)
    if message is None:
        del config["hidden_size"]
        message = "hidden_size"
    with pytest.raises(ArchError, match=message):
        Qwen3Arch.from_hf(config)


def random_hf_tensors(arch: Qwen3Arch) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {}
    hidden, hd = arch.hidden_size, arch.head_dim
    for name in hf_tensor_names(arch):
        if name.endswith(("q_proj.weight",)):
            shapes[name] = (arch.num_attention_heads * hd, hidden)
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            shapes[name] = (arch.num_key_value_heads * hd, hidden)
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            shapes[name] = (hd,)
        elif name.endswith("o_proj.weight"):
            shapes[name] = (hidden, arch.num_attention_heads * hd)
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            shapes[name] = (arch.vocab_size, hidden)
        elif name.endswith("mlp.gate.weight"):
            shapes[name] = (arch.num_experts, hidden)
        elif ".experts." in name:
            ffn = arch.moe_intermediate_size
            shapes[name] = (hidden, ffn) if "down_proj" in name else (ffn, hidden)
        elif "mlp." in name:
            ffn = arch.intermediate_size
            shapes[name] = (hidden, ffn) if "down_proj" in name else (ffn, hidden)
        else:
            shapes[name] = (hidden,)
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


@pytest.mark.parametrize("tied", [False, True])
def test_table_round_trips_every_tensor_exactly(tied):
    arch = small_moe(tie_word_embeddings=tied)
    hf = random_hf_tensors(arch)
    seen = set()
    for entry in tensor_map(arch):
        megatron = to_megatron(entry, [hf[n] for n in entry.hf], arch)
        assert tuple(megatron.shape) == entry.shape
        for name, tensor in to_hf(entry, megatron, arch):
            assert torch.equal(tensor, hf[name]), name
            seen.add(name)
    assert seen == set(hf)
    assert ("lm_head.weight" in seen) is not tied


def test_qkv_is_interleaved_per_query_group():
    arch = small_moe()
    entry = next(e for e in tensor_map(arch) if e.megatron.endswith("linear_qkv.weight"))
    hd, q_per_group = arch.head_dim, arch.num_attention_heads // arch.num_key_value_heads
    q = torch.arange(arch.num_attention_heads * hd).float()[:, None].expand(-1, arch.hidden_size)
    k = 1000 + torch.arange(arch.num_key_value_heads * hd).float()[:, None].expand(-1, arch.hidden_size)
    v = 2000 + torch.arange(arch.num_key_value_heads * hd).float()[:, None].expand(-1, arch.hidden_size)
    qkv = to_megatron(entry, [q, k, v], arch)[:, 0]
    group0 = qkv[: (q_per_group + 2) * hd]
    assert group0[: q_per_group * hd].tolist() == list(range(q_per_group * hd))
    assert group0[q_per_group * hd : (q_per_group + 1) * hd].tolist() == [1000.0 + i for i in range(hd)]
    assert group0[(q_per_group + 1) * hd :].tolist() == [2000.0 + i for i in range(hd)]


def test_vocab_rows_are_zero_padded():
    arch = small_moe()
    entry = tensor_map(arch)[0]
    emb = torch.randn(arch.vocab_size, arch.hidden_size)
    padded = to_megatron(entry, [emb], arch)
    assert padded.shape[0] == arch.padded_vocab_size and torch.all(padded[arch.vocab_size :] == 0)


def test_valid_layouts_pass():
    arch = Qwen3Arch.from_hf(QWEN3_30B_A3B)
    ParallelLayout(tp=2, ep=8).validate(16, arch)
    assert ParallelLayout(tp=2, ep=8).etp == 1 and ParallelLayout(tp=2).etp == 2  # the defaults
    ParallelLayout(tp=2).validate(2, arch)
    ParallelLayout(tp=4, pp=4, ep=8).validate(64, arch)


@pytest.mark.parametrize(
    "layout, world, message",
    [
        (ParallelLayout(tp=3), 3, "num_attention_heads 32 is not divisible by tp 3"),
        (ParallelLayout(tp=8), 8, "num_key_value_heads \\(query groups\\) 4 is not divisible by tp 8"),
        (ParallelLayout(ep=3), 3, "num_experts 128 is not divisible by ep 3"),
        (ParallelLayout(pp=5), 5, "num_hidden_layers 48 is not divisible by pp 5"),
        (ParallelLayout(tp=2), 3, "world size 3 is not a multiple of tp\\*pp = 2\\*1"),
        (ParallelLayout(ep=4), 6, "world size 6 is not a multiple of etp\\*ep\\*pp = 1\\*4\\*1"),
        # Experts copied on both TP ranks, each training on its half of the sequence.
        (ParallelLayout(tp=2, etp=1), 2, "with ep 1, etp must equal tp \\(got etp 1, tp 2\\)"),
    ],
)
def test_invalid_layouts_are_refused_naming_the_numbers(layout, world, message):
    with pytest.raises(LayoutError, match=message):
        layout.validate(world, Qwen3Arch.from_hf(QWEN3_30B_A3B))


def test_expert_parallel_on_a_dense_model_is_refused():
    dense = dict(QWEN3_30B_A3B, architectures=["Qwen3ForCausalLM"])
    with pytest.raises(LayoutError, match="need a MoE model"):
        ParallelLayout(ep=2).validate(2, Qwen3Arch.from_hf(dense))
