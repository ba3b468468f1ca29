"""`dppo-megatron train` end to end through the real pieces: the Megatron learner on 2 gloo
ranks, the embedded engine over HTTP, disk weight sync, R3 on; and colocated."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from dppo_megatron.keys import KEYS_FILE, headers, read_keys
from dppo_megatron.learner.checkpoint import latest_checkpoint
from dppo_megatron.processes import free_port
from dppo_megatron.run.metrics import read_metrics
from dppo_megatron.run.run_dir import read_status
from tests.train_runs import (
    QUICKSTART,
    REPO,
    QUICKSTART_AT_THE_END,
    QUICKSTART_STEPS,
    comparable,
    finish,
    log_tail,
    readme_main_command,
    start_train,
    wait_for_steps,
)

COLOCATED = REPO / "recipes" / "tiny" / "colocated.yaml"


def test_readme_main_command_trains_the_quickstart():
    assert readme_main_command() == ["dppo-megatron", "train", "recipes/tiny/quickstart.yaml"]


def test_quickstart_learns_the_toy_task_from_chance_to_mastery(quickstart):
    run_dir, elapsed = quickstart
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(QUICKSTART_STEPS))
    assert metrics[0]["reward/mean"] < 0.2  # chance: ~1/15 per position
    final_eval = [m["eval/mean_reward"] for m in metrics if "eval/mean_reward" in m][-1]
    assert final_eval >= 0.8, f"final eval mean reward {final_eval}"
    # It learned to end its answer: the reward reads what it wrote, special tokens included.
    assert metrics[0]["response/truncated_frac"] > 0.5
    assert metrics[-1]["response/truncated_frac"] <= 0.05 and metrics[-1]["reward/mean"] >= 0.8
    assert all(m["train/routing_agreement"] == 1.0 for m in metrics)  # R3: the learner replays the engine
    # One step off-policy after the first, and no server ever out of step with the schedule.
    assert [m["rollout/staleness_mean"] for m in metrics] == [0.0] + [1.0] * (QUICKSTART_STEPS - 1)
    assert all(m["rollout/stale_frac"] == 0.0 for m in metrics)
    assert elapsed < 600
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{QUICKSTART_STEPS:08d}"
    assert any((run_dir / "tensorboard").iterdir())
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "logs").is_dir()
    masked = assert_masked_tokens_add_up(run_dir, metrics)
    assert masked["A>0 masked"] > 0 and masked["A<0 masked"] > 0  # once the policy sharpens (step ~55)
    assert all(isinstance(row["token"], str) and row["count"] > 0 for row in masked["A>0"] + masked["A<0"])


def assert_masked_tokens_add_up(run_dir, metrics) -> dict:
    """masked_tokens.json (counted by the learner from the trust region's mask) holds as many
    tokens as the steps' train/tokens_masked metrics (counted by the loss) add up to."""
    masked = json.loads((run_dir / "masked_tokens.json").read_text())
    assert masked["A>0 masked"] + masked["A<0 masked"] == sum(m["train/tokens_masked"] for m in metrics)
    return masked


def test_the_exported_quickstart_model_scores_what_the_last_evaluation_did(quickstart, tmp_path):
    """The trained checkpoint, exported to HF and evaluated on its own, scores what the last
    in-loop evaluation did (same weights, same held-out prompts, same sampling seeds)."""
    run_dir, _ = quickstart
    final_eval = [m["eval/mean_reward"] for m in read_metrics(run_dir) if "eval/mean_reward" in m][-1]
    exported = tmp_path / "exported"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "dppo_megatron", "convert", "mcore-to-hf", "--ckpt",
                    str(run_dir / "checkpoints"), "--out", str(exported), "--hf-config", str(run_dir / "init_model")],
                   check=True, capture_output=True, timeout=300, env=env)
    result = subprocess.run([sys.executable, "-m", "dppo_megatron", "evaluate", str(QUICKSTART), "--model",
                             str(exported), "--run-dir", str(tmp_path / "eval"), f"rollout.base_port={free_port()}"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert scores["eval/mean_reward"] == pytest.approx(final_eval, abs=1e-6)


def test_a_run_losing_its_server_then_killed_then_stopped_by_sigterm_has_the_metrics_of_an_uninterrupted_run(
        quickstart, tmp_path):
    """A rollout server SIGKILLed: restarted with the current weights, its requests re-sent.
    The trainer SIGKILLed: the steps since the last checkpoint are redone from it. SIGTERM: a
    checkpoint at the end of the step and a clean exit. Either way the steps are the
    uninterrupted quickstart's, number for number (nothing in a step depends on trainer.steps):
    with asynchronous rollouts, the batch generated ahead is saved with each checkpoint."""
    run_dir = tmp_path / "interrupted"
    first = start_train(run_dir, "trainer.steps=12", *QUICKSTART_AT_THE_END, "trainer.save_every=4")
    server = f"serve-embedded.*{run_dir}"
    deadline = time.monotonic() + 120
    while subprocess.run(["pgrep", "-f", server], capture_output=True).returncode != 0:
        assert time.monotonic() < deadline and first.poll() is None, log_tail(run_dir)
        time.sleep(0.2)
    wait_for_steps(run_dir, 2, first)  # serving the run's steps
    killed = subprocess.run(["pkill", "-9", "-f", server], timeout=10)
    assert killed.returncode == 0, "no server process found to kill"
    wait_for_steps(run_dir, 6, first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None and checkpoint.name == "step_00000004"
    assert [p.name for p in (checkpoint / "rollouts").glob("*.npy")] == ["step_00000004.npy"]

    resumed = start_train(run_dir, "--resume", recipe=None)
    wait_for_steps(run_dir, 8, resumed)
    os.killpg(resumed.pid, signal.SIGTERM)
    assert finish(resumed, run_dir, timeout=120) == 0, log_tail(run_dir)
    stopped = len(read_metrics(run_dir))
    stop_checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert stop_checkpoint.name == f"step_{stopped:08d}" and 8 <= stopped < 12
    assert json.loads((stop_checkpoint / "learner_state.json").read_text())["trainer"]["step"] == stopped
    assert [p.name for p in (stop_checkpoint / "rollouts").glob("*.npy")] == [f"step_{stopped:08d}.npy"]
    assert "stop requested: checkpoint saved" in log_tail(run_dir)
    assert read_status(run_dir)["state"] == "stopped" and read_status(run_dir)["step"] == stopped

    log = (run_dir.parent / f"{run_dir.name}.log").read_text()
    assert f"resumed from {checkpoint} at step 4" in log
    assert log.count("restarting http://127.0.0.1:") == 1, log[-3000:]
    got = comparable(read_metrics(run_dir))
    assert [m["step"] for m in got] == list(range(stopped))  # no step lost or repeated
    assert got == comparable(read_metrics(quickstart[0]))[:stopped]
    assert_masked_tokens_add_up(run_dir, got)
    # TensorBoard, as its own reader loads the run: every step once, the killed segment's
    # steps after the checkpoint purged.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [event.step for event in events.Scalars("reward/mean")] == list(range(stopped))
    assert [event.value for event in events.Scalars("reward/mean")] == pytest.approx([m["reward/mean"] for m in got])


def test_a_run_that_fails_at_a_checkpoint_says_so_in_one_line_and_in_its_status(tmp_path):
    """A checkpoint that cannot be written (here `checkpoints` is a file; a full disk is the
    same to the trainer): the run ends with one line naming the error and what to do, and
    status.json says "failed" with the error, with no half-written file beside it."""
    run_dir = tmp_path / "failing"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a directory")
    process = start_train(run_dir, "trainer.steps=3", "trainer.save_every=1", "trainer.eval_every=0")
    assert finish(process, run_dir, timeout=300) != 0
    last = log_tail(run_dir).splitlines()[-2:]
    assert last[0].startswith("error: the run failed (exit 1) at step ") and "NotADirectoryError" in last[0], last
    assert last[1] == f"no checkpoint was saved; the run directory is {run_dir}", last
    status = read_status(run_dir)
    assert status["state"] == "failed" and "NotADirectoryError" in status["message"]
    assert not (run_dir / "status.json.tmp").exists()


def test_a_torn_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(tmp_path):
    """Checkpoints at steps 1, 2 and 3, then the largest file of step 3 cut to half its size (a
    node lost while writing, a full disk, a truncated copy): the resume finds it against the
    checkpoint's manifest, sets it aside naming the file, and goes on from step 2, not from a
    crash at step 0."""
    run_dir = tmp_path / "torn"
    first = start_train(run_dir, "trainer.steps=3", "trainer.save_every=1", "trainer.keep_checkpoints=3",
                        "trainer.eval_every=0")
    assert finish(first, run_dir, timeout=300) == 0, log_tail(run_dir)
    step3 = run_dir / "checkpoints" / "step_00000003"
    largest = max((f for f in step3.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    size = largest.stat().st_size
    largest.write_bytes(largest.read_bytes()[: size // 2])

    resumed = start_train(run_dir, "--resume", "trainer.steps=4", recipe=None)
    assert finish(resumed, run_dir, timeout=300) == 0, log_tail(run_dir)
    log = (run_dir.parent / f"{run_dir.name}.log").read_text()
    name = largest.relative_to(step3)
    assert (f"checkpoint step_00000003 is torn ({name} is {size // 2} bytes, {size} were written): set aside as "
            "step_00000003.torn; resuming from step_00000002") in log, log[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000002'} at step 2" in log
    assert (run_dir / "checkpoints" / "step_00000003.torn").is_dir()
    assert [m["step"] for m in read_metrics(run_dir)] == [0, 1, 2, 3]  # step 2 done again, none twice
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000004"

    # Every checkpoint left without its manifest: a clear error naming each, not a run from step 0.
    for manifest in (run_dir / "checkpoints").glob("step_0000000?/manifest.json"):
        manifest.unlink()
    failed = start_train(run_dir, "--resume", "trainer.steps=5", recipe=None)
    assert finish(failed, run_dir, timeout=300) == 1
    log = (run_dir.parent / f"{run_dir.name}.log").read_text()
    assert (f"no whole checkpoint is left in {run_dir / 'checkpoints'}: step_00000004 is torn (manifest.json is "
            "missing); step_00000003 is torn (manifest.json is missing); step_00000002 is torn") in log, log[-3000:]
    assert f"no whole checkpoint is left; the torn ones are kept in {run_dir / 'checkpoints'} as *.torn" in log
    assert [m["step"] for m in read_metrics(run_dir)] == [0, 1, 2, 3]


# Ten synchronous steps of the quickstart without evaluation or checkpoints: the uninterrupted run
# that the fault tests below compare against (distributed sync: the same weights as by disk or
# by handle, bit for bit, so the same samples and metrics).
PLAIN = ["trainer.steps=10", "rollout.weight_sync=distributed", "trainer.max_staleness=0", "trainer.eval_every=0",
         "trainer.save_every=0"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plain") / "plain"
    assert finish(start_train(run_dir, *PLAIN), run_dir, timeout=300) == 0, log_tail(run_dir)
    return run_dir


def test_a_lone_server_killed_under_distributed_sync_is_brought_back_and_when_it_cannot_the_step_is_saved(
        tmp_path, plain):
    """The quickstart with `rollout.weight_sync=distributed` and synchronous rollouts, its one
    server SIGKILLed three times, wherever the step then is (rollout, training or publish): the
    run restarts it each time and sends it the current weights before it generates again
    (a batch it could not finish is made again), and its metrics are an uninterrupted run's.
    Then the server killed with its port taken by a stranger, so that every restart fails: the
    run stops with one line and a checkpoint of the steps it finished, no traceback; with the
    port free again the resumed run ends as the uninterrupted one did."""
    import socket

    settings = PLAIN
    killed = tmp_path / "killed"
    process = start_train(killed, *settings)
    server = f"serve-embedded.*{killed}"
    for after_step, delay in ((2, 0.0), (4, 0.25), (6, 0.1)):  # early in a rollout, mid-step, ...
        wait_for_steps(killed, after_step, process)
        time.sleep(delay)
        assert subprocess.run(["pkill", "-9", "-f", server], timeout=10).returncode == 0, log_tail(killed)
    assert finish(process, killed, timeout=300) == 0, log_tail(killed)
    log = (killed.parent / f"{killed.name}.log").read_text()
    assert log.count("restarting http://127.0.0.1:") == 3 and "Traceback" not in log, log[-4000:]
    assert comparable(read_metrics(killed)) == comparable(read_metrics(plain))

    lost, port = tmp_path / "lost", free_port()
    process = start_train(lost, *settings, f"rollout.base_port={port}")
    wait_for_steps(lost, 3, process)
    with socket.socket() as stranger:  # it hangs up on whoever calls
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        assert subprocess.run(["pkill", "-9", "-f", f"serve-embedded.*{lost}"], timeout=10).returncode == 0
        time.sleep(0.2)
        stranger.bind(("127.0.0.1", port))
        stranger.listen()
        threading.Thread(target=hang_up_on_callers, args=(stranger,), daemon=True).start()
        assert finish(process, lost, timeout=300) == 1
        stranger.shutdown(socket.SHUT_RDWR)  # its accept() returns: the port is free again
    log = (lost.parent / f"{lost.name}.log").read_text()
    done = len(read_metrics(lost))
    checkpoint = latest_checkpoint(lost / "checkpoints")
    assert checkpoint is not None and checkpoint.name == f"step_{done:08d}", log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert (f"could not be restarted (3 attempts; last: port {port} on 127.0.0.1 is already in use") in log
    last = log.splitlines()[-2:]
    assert last[0].startswith("error: the run failed (exit 1) at step ") and "ServersLost" in last[0], last
    assert last[1] == f"resume from {checkpoint} with: dppo-megatron train --run-dir {lost} --resume", last
    resumed = start_train(lost, "--resume", recipe=None)
    assert finish(resumed, lost, timeout=300) == 0, log_tail(lost)
    assert comparable(read_metrics(lost)) == comparable(read_metrics(plain))


def test_a_failed_checkpoint_says_why_in_its_first_ranks_words_not_only_which_ranks_failed():
    """torch's CheckpointException (a full disk during a save) prints as "CheckpointException
    ranks:dict_keys([0, 1])"; the status and the failure line carry rank 0's own error."""
    from torch.distributed.checkpoint.api import CheckpointException

    from dppo_megatron.run.loop import explained

    full = OSError(28, "No space left on device")
    error = CheckpointException("save", {1: (RuntimeError("other"), None), 0: (full, None)})
    assert explained(error) == ("the checkpoint could not be written or read (rank 0): OSError: "
                                "[Errno 28] No space left on device")
    assert explained(ValueError("bad")) == "ValueError: bad"


def hang_up_on_callers(listening) -> None:
    while True:
        try:
            connection, _ = listening.accept()
        except OSError:  # closed
            return
        connection.close()


def test_a_run_killed_without_a_word_reads_as_killed_not_running(tmp_path):
    from dppo_megatron.run.run_dir import write_status

    code = f"from pathlib import Path; from dppo_megatron.run.run_dir import write_status; " \
           f"write_status(Path({str(tmp_path)!r}), 'running', 7, 10)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)  # then gone, as after a SIGKILL
    status = read_status(tmp_path)
    assert status["state"] == "killed" and status["step"] == 7 and "is gone" in status["message"]
    write_status(tmp_path, "running", 8, 10)  # this process: alive
    assert read_status(tmp_path)["state"] == "running"


def test_resuming_a_finished_run_says_so_and_starts_nothing(quickstart):
    run_dir, _ = quickstart
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "dppo_megatron", "train", "--run-dir", str(run_dir), "--resume"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{run_dir} already finished its {QUICKSTART_STEPS} steps" in result.stdout
    assert time.monotonic() - started < 60 and read_status(run_dir)["state"] == "finished"


def test_the_colocated_quickstart_trains_as_the_disaggregated_one_with_a_server_killed_while_released(
        tmp_path, plain):
    """The colocated quickstart (recipes/tiny/colocated.yaml: weights by handle from rank 0, the
    engine released while the learner trains) and the disaggregated synchronous one (the engine
    always resident) make the same samples and the same steps: every metric but the timings is
    equal. Killed while released, the engine is restarted at the next publish and serves the
    new weights before it generates again: the run's metrics do not change."""
    colocated = tmp_path / "colocated"
    process = start_train(colocated, *(s for s in PLAIN if not s.startswith("rollout.weight_sync=")), recipe=COLOCATED)
    log = colocated.parent / f"{colocated.name}.log"
    deadline, killed = time.monotonic() + 300, None
    while killed is None and time.monotonic() < deadline and process.poll() is None:
        started = re.search(r"started embedded server (\S+) \(pid (\d+)\)", log.read_text() if log.exists() else "")
        if started and len(read_metrics(colocated)) >= 3:
            key = read_keys(colocated / KEYS_FILE).api_key  # the run's servers ask for its key
            request = urllib.request.Request(started.group(1) + "/server_info", headers=headers(key))
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:
                    released = json.loads(answer.read())["memory_released"]
            except OSError:
                released = []
            if released:
                os.kill(int(started.group(2)), signal.SIGKILL)
                killed = len(read_metrics(colocated))
        time.sleep(0.01)
    assert killed is not None, log_tail(colocated)
    assert finish(process, colocated, timeout=300) == 0, log_tail(colocated)
    text = log.read_text()
    assert "down at resume" in text or "down while the learner trains" in text, log_tail(colocated)
    assert len(re.findall(r"started embedded server", text)) == 2  # restarted once, by the publish
    ours, theirs = comparable(read_metrics(colocated)), comparable(read_metrics(plain))
    assert len(ours) == len(theirs) == 10
    assert ours == theirs
    assert all(m["time/servers_released"] >= 0 for m in read_metrics(colocated))
    assert not (colocated / "weights").exists()  # nothing went through the disk
