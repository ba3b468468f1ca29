"""Learner checkpoints: resume at the same and at another layout, and never load a partial one."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import Metadata

from dppo_megatron.convert.checkpoints import resolve_checkpoint
from dppo_megatron.learner.checkpoint import LATEST_FILE, STATE_FILE, latest_checkpoint, torn_files
from dppo_megatron.model.hf_io import CheckpointError
from dppo_megatron.model.manifest import MANIFEST_FILE, write_manifest
from dppo_megatron.run.checkpoints import superseded
from tests.distributed import run_torchrun_each
from tests.tiny_models import make_moe

WORKER = str(Path(__file__).parent / "workers" / "learner_checkpoint.py")
RESUME_TOL = 1e-5  # reduction order differs between layouts; the step itself moves logits ~0.2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """a: TP=2+EP=2 from HF, warm-up step, checkpoint, next step. b: TP=2 with the experts split
    by expert TP instead (EP=1, ETP=2) resumed from a's checkpoint. c: TP=2+EP=2 resumed from
    b's. d: TP=2+EP=2 resumed from a's (same layout). All in one torchrun, in this order."""
    root = tmp_path_factory.mktemp("ckpt")
    hf = make_moe(root / "hf")

    def run(ranks: int, *cases: tuple[str, str, str, str]) -> None:  # (name, tp, ep, resumed from)
        runs = [[root / name, tp, ep, hf, "-" if source == "-" else root / source / "before"]
                for name, tp, ep, source in cases]
        run_torchrun_each(WORKER, ranks, runs)
        for name, *_ in cases:
            results[name] = torch.load(root / name / "result.pt", weights_only=False)

    results = {"root": root, "hf": hf}
    # d must come out bit-identical to a although its process ran b and c first, so nothing left
    # over from an earlier model can stand in for what a checkpoint holds.
    run(2, ("a", "2", "2", "-"), ("b", "2", "1", "a"), ("c", "2", "2", "b"), ("d", "2", "2", "a"))
    return results


def max_diff(x, y) -> float:
    return (x - y).abs().max().item()


def test_resume_at_the_same_layout_is_bit_identical(runs):
    a, d = runs["a"], runs["d"]
    assert max_diff(a["before"], d["before"]) == 0.0
    assert a["metrics"] == d["metrics"]
    assert max_diff(a["after"], d["after"]) == 0.0
    assert d["step"] == a["step"] == 2 and d["trainer_state"] == {"note": "warm-up done"}


@pytest.mark.parametrize("saved, resumed", [("a", "b"), ("b", "c")], ids=["ep2-to-etp2", "etp2-to-ep2"])
def test_resume_at_another_layout_gives_the_same_logits_and_the_same_next_step(runs, saved, resumed):
    s, r = runs[saved], runs[resumed]
    assert max_diff(s["before"], r["before"]) <= RESUME_TOL
    for key in ("loss", "grad_norm", "mismatch_tv", "entropy", "kl_k3"):
        assert r["metrics"][key] == pytest.approx(s["metrics"][key], rel=1e-5, abs=1e-7), key
    step_effect = max_diff(s["after"], s["before"])
    assert step_effect > 0.05
    assert max_diff(s["after"], r["after"]) <= RESUME_TOL


def test_a_training_checkpoint_saved_at_ep2_exports_every_expert(runs, tmp_path):
    from tests.test_convert_cli import convert
    from tests.tiny_models import hf_logits, parity_tokens

    done = convert("mcore-to-hf", "--ckpt", runs["root"] / "a" / "after", "--out", tmp_path / "hf")
    assert done.returncode == 0, done.stderr[-3000:]
    exported = hf_logits(tmp_path / "hf", parity_tokens())
    assert max_diff(exported, runs["a"]["after"]) <= 1e-4  # the trained weights, experts and all
    assert max_diff(exported, hf_logits(runs["hf"], parity_tokens())) > 0.05  # and not the initial ones


def write_complete(root: Path, step: int) -> Path:
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / STATE_FILE).write_text("{}")
    return path


class _RunsCode:
    """A pickle that, loaded, creates the file it names: what a tampered .metadata could do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_checkpoint_whose_metadata_pickle_names_foreign_code_is_refused_before_it_runs(runs, tmp_path):
    """torch.distributed.checkpoint reads `.metadata` with pickle.load. A real checkpoint's
    passes the check (only torch's metadata types); one replaced by a pickle that would create
    a file, its manifest rewritten to match, is refused by convert and by the learner's load,
    naming the global, and the file is never created."""
    import shutil

    from dppo_megatron.model import dcp_metadata

    latest = latest_checkpoint(runs["root"] / "a" / "before")
    dcp_metadata.check(latest)  # torch's own: passes
    tampered = tmp_path / latest.name
    shutil.copytree(latest, tampered)
    ran = tmp_path / "ran"
    (tampered / ".metadata").write_bytes(pickle.dumps(_RunsCode(ran)))
    write_manifest(tampered)
    with pytest.raises(CheckpointError, match=r"\.metadata is refused: it names pathlib.*touch"):
        resolve_checkpoint(tampered)
    from dppo_megatron.learner.checkpoint import load_checkpoint

    with pytest.raises(CheckpointError, match="is refused"):
        load_checkpoint(tampered, learner=None)  # refused before any learner state is touched
    assert not ran.exists()


def test_latest_names_the_newest_complete_checkpoint(tmp_path):
    write_complete(tmp_path, 4)
    newest = write_complete(tmp_path, 8)
    (tmp_path / LATEST_FILE).write_text(newest.name)
    assert latest_checkpoint(tmp_path) == newest


def test_partial_and_half_written_checkpoints_are_never_loaded(tmp_path):
    complete = write_complete(tmp_path, 4)
    (tmp_path / "step_00000008.partial").mkdir()  # killed while saving
    (tmp_path / "step_00000012").mkdir()  # no state file: never finished
    (tmp_path / LATEST_FILE).write_text("step_00000012")
    assert latest_checkpoint(tmp_path) == complete
    assert latest_checkpoint(tmp_path / "missing") is None


def write_with_manifest(root: Path, step: int) -> Path:
    path = root / f"step_{step:08d}"
    (path / "model").mkdir(parents=True)
    (path / STATE_FILE).write_text('{"manifest": true}')
    (path / ".metadata").write_bytes(pickle.dumps(Metadata(state_dict_metadata={})))  # torch's index, empty
    (path / "model" / "__0_0.distcp").write_bytes(bytes(range(256)) * 40)
    write_manifest(path)
    return path


def test_a_checkpoint_cut_changed_or_missing_a_file_reads_as_torn_and_is_refused_by_convert(tmp_path):
    """Against its manifest: sizes for every file, sha256 for this caller's share of them; a
    missing manifest is torn for a checkpoint that says it wrote one, and whole for one written
    before manifests (no "manifest" in its state)."""
    shard = "model/__0_0.distcp"
    whole = write_with_manifest(tmp_path / "a", 1)
    assert torn_files(whole) == [] and resolve_checkpoint(whole) == whole

    cut = write_with_manifest(tmp_path / "b", 1)
    (cut / shard).write_bytes((cut / shard).read_bytes()[:5000])
    assert torn_files(cut) == [f"{shard} is 5000 bytes, 10240 were written"]

    flipped = write_with_manifest(tmp_path / "c", 1)
    data = bytearray((flipped / shard).read_bytes())
    data[7000] ^= 1  # same size: only the hash sees it
    (flipped / shard).write_bytes(bytes(data))
    changed = [f"{shard} has changed since it was written (sha256)"]
    assert torn_files(flipped) == changed
    files = sorted(json.loads((flipped / MANIFEST_FILE).read_text())["files"])
    position = files.index(shard)
    assert torn_files(flipped, share=(position % 2, 2)) == changed  # the rank that hashes it
    assert torn_files(flipped, share=(1 - position % 2, 2)) == []  # the other checks sizes only
    with pytest.raises(CheckpointError, match=r"step_00000001 is torn \(model/__0_0.distcp has changed"):
        resolve_checkpoint(tmp_path / "c")

    gone = write_with_manifest(tmp_path / "d", 1)
    (gone / shard).unlink()
    assert torn_files(gone) == [f"{shard} is missing"]
    (gone / MANIFEST_FILE).unlink()
    assert torn_files(gone) == [f"{MANIFEST_FILE} is missing"]
    assert torn_files(write_complete(tmp_path / "e", 1)) == []  # from before manifests


def test_retention_never_touches_a_checkpoint_set_aside_or_being_written(tmp_path):
    for step in (1, 2, 3):
        write_complete(tmp_path, step)
    (tmp_path / "step_00000004.torn").mkdir()
    (tmp_path / "step_00000005.partial").mkdir()
    newest = write_complete(tmp_path, 6)
    assert [p.name for p in superseded(tmp_path, newest, keep=2)] == ["step_00000001", "step_00000002"]


SHIELD_PROBE = """
import os, signal, time
from pathlib import Path

from dppo_megatron.learner.checkpoint import _start_checkpoint_writer_deaf_to_stop_signals

if __name__ == "__main__":
    os.setpgrp()  # a run of its own, as `dppo-megatron train` starts its ranks
    _start_checkpoint_writer_deaf_to_stop_signals()
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    signal.signal(signal.SIGTERM, lambda *_: None)  # this "rank" takes the stop and goes on
    os.killpg(os.getpgrp(), signal.SIGTERM)
    time.sleep(1)
    filesystem_async._results_queue.put("still serving")  # what the stop's checkpoint does
    print(filesystem_async._results_queue.get(timeout=10))
"""


def test_the_checkpoint_writers_helper_process_outlives_a_stop_signal_to_the_run(tmp_path):
    """Megatron's checkpoint writer talks to a manager process it starts at the first save; a
    SIGTERM to the run's process group (kill, scancel, Ctrl-C) killed it, and the checkpoint of
    that stop failed with BrokenPipeError."""
    import subprocess
    import sys

    probe = tmp_path / "probe.py"  # a file: the manager is spawned, and re-imports __main__
    probe.write_text(SHIELD_PROBE)
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "still serving", done.stderr[-3000:]
