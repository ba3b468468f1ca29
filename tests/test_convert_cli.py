"""`dppo-megatron convert` as users run it: hf-to-mcore, verify, mcore-to-hf, and its errors."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from dppo_megatron.model.hf_io import HFCheckpointReader
from tests.tiny_models import hf_logits, make_dense, make_moe, parity_tokens


def convert(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    exe = shutil.which("dppo-megatron")
    command = [exe] if exe else [sys.executable, "-m", "dppo_megatron"]
    return subprocess.run(command + ["convert", *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return make_moe(tmp_path_factory.mktemp("hf") / "moe")


def test_round_trip_through_a_tp2_ep2_checkpoint_and_a_config_that_does_not_describe_it(moe, tmp_path):
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    done = convert("hf-to-mcore", "--hf-dir", moe, "--out", mcore, "--tp", 2, "--ep", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "read: 26/26 tensors (100%)" in done.stdout and not (tmp_path / "mcore.partial").exists()

    # At a tolerance no float32 forward meets, verify fails and says so, with the difference it
    # measured (which passes at the default tolerance: the bf16 test below).
    checked = convert("verify", "--hf-dir", moe, "--ckpt", mcore, "--tp", 2, "--ep", 2, "--tolerance", "1e-12")
    assert checked.returncode == 1 and "FAILED: above the tolerance" in checked.stdout, checked.stderr[-3000:]
    diff = float(re.search(r"max_abs_logit_diff=(\S+)", checked.stdout).group(1))
    assert 0 < diff <= 1e-4
    for run in (done, checked):  # no library warnings repeated by every rank
        assert "Warning" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]

    # A config that does not describe the checkpoint is named, and nothing is written.
    dense = make_dense(tmp_path / "dense")
    mismatch = convert("mcore-to-hf", "--ckpt", mcore, "--out", tmp_path / "x", "--hf-config", dense)
    assert mismatch.returncode == 2, mismatch.stderr[-2000:]
    assert "holds shape" in mismatch.stderr or "no tensor" in mismatch.stderr, mismatch.stderr[-2000:]
    assert not (tmp_path / "x").exists()

    exported = convert("mcore-to-hf", "--ckpt", mcore, "--out", back, "--hf-config", moe)
    assert exported.returncode == 0, exported.stderr[-3000:]
    original, copy = HFCheckpointReader(moe), HFCheckpointReader(back)
    assert sorted(copy.names()) == sorted(original.names())
    assert all(torch.equal(copy.get(n), original.get(n)) for n in original.names())
    assert (back / "generation_config.json").is_file()
    torch.testing.assert_close(hf_logits(back, parity_tokens()), hf_logits(moe, parity_tokens()), atol=0, rtol=0)


def test_bf16_checkpoints_convert_bit_identically_at_pp2_and_export_without_their_hf_config(tmp_path):
    """A bf16 checkpoint (as real Qwen3 ones are) split over 2 pipeline stages verifies in
    float32 and comes back bit-identical; the export needs no --hf-config: the checkpoint kept
    a copy of the model's config."""
    bf16 = make_moe(tmp_path / "bf16", dtype=torch.bfloat16)
    assert convert("hf-to-mcore", "--hf-dir", bf16, "--out", tmp_path / "mcore", "--pp", 2).returncode == 0
    checked = convert("verify", "--hf-dir", bf16, "--ckpt", tmp_path / "mcore")
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert float(re.search(r"max_abs_logit_diff=(\S+)", checked.stdout).group(1)) <= 1e-4
    assert convert("mcore-to-hf", "--ckpt", tmp_path / "mcore", "--out", tmp_path / "back").returncode == 0
    original, copy = HFCheckpointReader(bf16), HFCheckpointReader(tmp_path / "back")
    for name in original.names():
        assert copy.get(name).dtype == torch.bfloat16 and torch.equal(copy.get(name), original.get(name)), name


def test_invalid_layout_is_refused_before_any_process_starts(moe, tmp_path):
    done = convert("hf-to-mcore", "--hf-dir", moe, "--out", tmp_path / "x", "--tp", 3, timeout=60)
    assert done.returncode == 2
    assert "num_attention_heads 4 is not divisible by tp 3" in done.stderr
    assert "torch.distributed" not in done.stderr  # refused before torchrun


def test_weights_that_do_not_match_the_config_are_listed(moe, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    shutil.copy(make_dense(tmp_path / "dense") / "config.json", wrong / "config.json")
    shutil.copy(moe / "model.safetensors", wrong / "model.safetensors")
    done = convert("hf-to-mcore", "--hf-dir", wrong, "--out", tmp_path / "x", timeout=60)
    assert done.returncode == 2
    assert "missing 3 (model.layers.0.mlp.down_proj.weight" in done.stderr
    assert "unexpected" in done.stderr and "model.layers.0.mlp.experts.0.down_proj.weight" in done.stderr


def test_missing_checkpoint_is_named(tmp_path):
    done = convert("mcore-to-hf", "--ckpt", tmp_path / "nothing", "--out", tmp_path / "x", timeout=60)
    assert done.returncode == 2 and "neither a Megatron checkpoint nor a directory of them" in done.stderr


def test_exported_files_all_get_the_mode_of_a_new_file(tmp_path):
    """safetensors writes its files 0600; an export's weights are as readable as its config."""
    import os

    from dppo_megatron.model.hf_io import HFCheckpointWriter

    writer = HFCheckpointWriter(tmp_path / "export", max_shard_bytes=64)
    for index in range(3):
        writer.add(f"tensor.{index}", torch.zeros(16))
    exported = writer.close(config={"architectures": []})
    mask = os.umask(0)
    os.umask(mask)
    modes = {path.name: path.stat().st_mode & 0o777 for path in exported.iterdir()}
    assert len([n for n in modes if n.endswith(".safetensors")]) == 3
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_a_spooled_export_reads_back_in_safetensors_and_transformers_as_written(tmp_path):
    """The writer that streams each tensor to disk (large exports) makes files that safetensors'
    own reader and the in-memory writer agree on, tensor for tensor."""
    from safetensors import safe_open

    from dppo_megatron.model.hf_io import HFCheckpointWriter

    tensors = {"a.f32": torch.randn(5, 3), "b.bf16": torch.randn(7, dtype=torch.bfloat16),
               "c.i64": torch.arange(4), "d.empty": torch.zeros(0, 2), "e.f16": torch.randn(2, 2).half()}
    exported = {}
    for spool in (False, True):
        writer = HFCheckpointWriter(tmp_path / f"spool-{spool}", max_shard_bytes=40, spool=spool)
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        exported[spool] = writer.close(config={})
    for spool, directory in exported.items():
        index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
        assert sorted(index) == sorted(tensors) and len(set(index.values())) > 1  # several shards
        for name, tensor in tensors.items():
            with safe_open(directory / index[name], "pt") as f:
                assert torch.equal(f.get_tensor(name), tensor) and f.get_tensor(name).dtype == tensor.dtype, name
    assert sorted(p.name for p in exported[True].iterdir()) == sorted(p.name for p in exported[False].iterdir())
