"""`dppo-megatron submit`: the rendered job for the cluster recipes, refusals before sbatch, and
real jobs on a three-node SLURM cluster started for these tests (tests/slurm_cluster.py: each
node a network namespace of its own on this machine)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dppo_megatron.config.validate import load_recipe
from dppo_megatron.learner.checkpoint import latest_checkpoint
from dppo_megatron.processes import free_port
from dppo_megatron.run.metrics import read_metrics
from dppo_megatron.run.placement import PlacementError, job_layout
from dppo_megatron.run.run_dir import read_status
from dppo_megatron.run.slurm import describe_job, job_problems, render
from tests.slurm_cluster import ClusterUnavailable, SlurmCluster
from tests.train_runs import QUICKSTART_AT_THE_END, comparable

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
QUICKSTART = RECIPES / "tiny" / "quickstart.yaml"
THREE_NODE = RECIPES / "tiny" / "three-node.yaml"
QWEN3_30B = RECIPES / "qwen3-30b-a3b" / "dppo-binary-tv.yaml"
QWEN3_30B_COLOCATED = RECIPES / "qwen3-30b-a3b" / "dppo-binary-tv-colocated.yaml"


def submit(*args: str, cluster: SlurmCluster | None = None) -> subprocess.CompletedProcess:
    """`dppo-megatron submit ARGS` here, or on the cluster's login node."""
    command = [sys.executable, "-m", "dppo_megatron", "submit", *args]
    env = dict(cluster.env if cluster else os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cluster.command(*command, cwd=REPO) if cluster else command, capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)


def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


# --- the rendered job (no cluster needed) -------------------------------------------------------


def test_dry_run_of_the_30b_recipe_with_r3_renders_the_whole_job(tmp_path):
    result = submit(str(QWEN3_30B), "rollout.r3=true", "--dry-run", "--partition", "gpu", "--time", "2-00:00:00",
                    "--account", "rl-team", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert directives(out) == [
        "--job-name=dppo-qwen3-30b-a3b-dppo-binary-tv", "--nodes=4", "--ntasks-per-node=1",
        f"--output={tmp_path / 'run' / 'slurm' / 'job-%j.out'}", "--open-mode=append", "--gpus-per-node=8",
        "--exclusive", "--partition=gpu", "--account=rl-team", "--time=2-00:00:00", "--signal=B:USR1@600",
        "--requeue",
    ]
    assert "export NCCL_DEBUG=WARN" in out  # NCCL settings from the recipe's slurm.env
    assert "--nproc-per-node=8" in out and "-m dppo_megatron run-rank \"$RUN_DIR\" --job-layout \"$LAYOUT\"" in out
    assert out.count("--gpus-per-node=8 --kill-on-bad-exit") == 2  # both steps see the node's GPUs
    assert "serve-node \"$LAYOUT\"" in out
    # Each step's own task count: the job's (one per node) is refused on a step of fewer nodes.
    assert '--nodes="$NUM_SERVER_NODES" --ntasks="$NUM_SERVER_NODES"' in out
    assert '--nodes="$NUM_LEARNER_NODES" --ntasks="$NUM_LEARNER_NODES"' in out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing

    layout = out[out.index("# job: 4 node(s)"):].splitlines()
    assert layout[1].startswith("node 0: learner ranks 0-7 (torchrun, 8 per node, GPUs 0-7; TP 2 PP 1 EP 8)")
    assert layout[2].startswith("node 1: learner ranks 8-15")
    servers = [line for line in layout if ": server " in line]
    assert [s.split(":")[0] for s in servers] == ["node 2", "node 2", "node 3", "node 3"]
    assert "CUDA_VISIBLE_DEVICES=4,5,6,7" in servers[1] and "CUDA_VISIBLE_DEVICES=0,1,2,3" in servers[2]
    for index, line in enumerate(servers):
        command = line.split(f"server {index}: ", 1)[1]
        assert " -m sglang.launch_server --model-path Qwen/Qwen3-30B-A3B-Base --host 0.0.0.0 " in command
        assert f"--port {30000 + index} --tp-size 4 --dp-size 1 --ep-size 1 --mem-fraction-static 0.8" in command
        assert "--skip-tokenizer-init --weight-version 0 --enable-return-routed-experts --config " in command
        assert command.endswith("/keys.yaml")  # the run's keys, by file: never on the command line

    off = submit(str(QWEN3_30B), "--dry-run", "--partition", "gpu")
    assert off.returncode == 0 and "--enable-return-routed-experts" not in off.stdout


def test_dry_run_of_the_colocated_30b_recipe_is_a_2_node_job_with_the_servers_on_the_learner_gpus(tmp_path):
    """The authors' layout: 4 servers of TP 4 on the learner's own 2 x 8 GPUs, two per node."""
    result = submit(str(QWEN3_30B_COLOCATED), "--dry-run", "--partition", "gpu", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "--nodes=2" in directives(out) and "--gpus-per-node=8" in directives(out)
    layout = out[out.index("# job: 2 node(s), 8 GPU(s) per node"):].splitlines()
    assert layout[1].startswith("node 0: learner ranks 0-7 (torchrun, 8 per node, GPUs 0-7; TP 2 PP 1 EP 8)")
    assert layout[2].startswith("node 1: learner ranks 8-15 (torchrun, 8 per node, GPUs 0-7")
    servers = [line for line in layout if ": server " in line]
    placed = [(line.split(":")[0], re.search(r"CUDA_VISIBLE_DEVICES=(\S+) ", line).group(1)) for line in servers]
    assert placed == [("node 0", "0,1,2,3"), ("node 0", "4,5,6,7"), ("node 1", "0,1,2,3"), ("node 1", "4,5,6,7")]
    for index, line in enumerate(servers):
        assert f"--port {30000 + index} --tp-size 4 --dp-size 1 --ep-size 1 --mem-fraction-static 0.7" in line
        assert "--enable-memory-saver" in line  # SGLang releases and resumes its memory only with it
    assert not (tmp_path / "run").exists()


def test_rendered_scripts_are_valid_bash(tmp_path):
    for recipe_path, overrides in [(QWEN3_30B, []), (QUICKSTART, []), (RECIPES / "qwen3-4b-base" / "dppo-binary-tv.yaml",
                                   ["slurm.setup=['source /opt/venv/bin/activate']", "slurm.requeue=false"])]:
        recipe = load_recipe(recipe_path, overrides)
        script = tmp_path / f"{recipe.name}.sbatch"
        script.write_text(render(recipe, tmp_path / "run dir", workdir=tmp_path))
        checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
    assert "source /opt/venv/bin/activate" in script.read_text()
    assert "#SBATCH --no-requeue" in script.read_text()


def test_the_job_layout_puts_learners_first_and_servers_on_the_rollout_nodes(tmp_path):
    recipe = load_recipe(QWEN3_30B, ["rollout.r3=true"])
    layout = job_layout(recipe, tmp_path, ["gpu-a1", "gpu-a2", "gpu-b1", "gpu-b2"])
    assert layout.learner_nodes == ["gpu-a1", "gpu-a2"] and layout.master_addr == "gpu-a1"
    assert layout.server_nodes == ["gpu-b1", "gpu-b2"]
    assert layout.urls == ["http://gpu-b1:30000", "http://gpu-b1:30001", "http://gpu-b2:30002", "http://gpu-b2:30003"]
    assert layout.agents["http://gpu-b2:30003"] == "http://gpu-b2:29400"
    assert [s.gpus for s in layout.specs_on("gpu-b2")] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert all(s.routed_experts for s in layout.specs_on("gpu-b1"))
    layout.save(tmp_path / "layout.json")
    assert type(layout).load(tmp_path / "layout.json") == layout

    shared = load_recipe(RECIPES / "qwen3-4b-base" / "dppo-binary-tv.yaml")  # rollout.nodes 0
    layout = job_layout(shared, tmp_path, ["node7"])
    assert layout.server_nodes == ["node7"] and [s.gpus for s in layout.specs_on("node7")] == [(4,), (5,), (6,), (7,)]

    with pytest.raises(PlacementError, match="the job has 3 node.*needs 4: learner.nodes 2 \\+ rollout.nodes 2"):
        job_layout(recipe, tmp_path, ["a", "b", "c"])
    loopback = load_recipe(QWEN3_30B, ["rollout.host=127.0.0.1"])
    with pytest.raises(PlacementError, match="rollout.host 127.0.0.1 is reachable only from its own node"):
        job_layout(loopback, tmp_path, ["a", "b", "c", "d"])


@pytest.mark.parametrize("recipe_path, overrides, flags, message", [
    (QWEN3_30B, ["slurm.gpus_per_node=4"], [],
     "learner.ranks_per_node: 8 ranks need as many GPUs on each learner node; slurm.gpus_per_node asks for 4"),
    (RECIPES / "qwen3-4b-base" / "dppo-binary-tv.yaml", ["slurm.gpus_per_node=6"], [],
     "the learner's 4 GPUs + 4 for servers = 8 GPUs on each learner node; slurm.gpus_per_node asks for 6"),
    (QWEN3_30B, ["rollout.gpus_per_node=16", "rollout.servers=8"], [],
     "rollout.gpus_per_node: 16 GPUs on each rollout node; slurm.gpus_per_node asks for 8"),
    (QWEN3_30B, ["slurm.gpus_per_node=0"], [], "rollout.engine sglang needs GPUs"),
    (QWEN3_30B, [], ["--nodes", "2"], "--nodes 2: the recipe lays out 4 node(s)"),
    (QWEN3_30B, ["slurm.time=two days"], [], "slurm.time: 'two days' is not a SLURM time limit"),
    (QWEN3_30B, ["slurm.env={NCCL-DEBUG: INFO}"], [], "slurm.env.NCCL-DEBUG: not a valid environment variable name"),
])
def test_impossible_jobs_are_refused_before_sbatch(tmp_path, recipe_path, overrides, flags, message):
    result = submit(str(recipe_path), *overrides, *flags, "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert not (tmp_path / "run").exists()  # nothing written, nothing submitted


def test_job_problems_accept_the_shipped_cluster_recipes():
    for path in sorted(RECIPES.glob("qwen3-*/*.yaml")):
        recipe = load_recipe(path)
        assert job_problems(recipe) == [], path
        assert describe_job(recipe, Path("/tmp/run")).startswith("# job: ")


# --- real jobs on a three-node SLURM cluster -----------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        with SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=3) as running:
            yield running
    except ClusterUnavailable as reason:
        if os.environ.get("CI"):  # CI runs as root on a machine that has both: never skip there
            pytest.fail(f"the SLURM test cluster did not start in CI: {reason}")
        pytest.skip(f"no SLURM cluster here: {reason}")


def submit_job(cluster: SlurmCluster, run_dir: Path, *overrides: str, recipe: Path = QUICKSTART) -> str:
    """Submit `recipe` from the login node with ports of its own; return the job id."""
    ports = [f"rollout.base_port={free_port()}", f"slurm.master_port={free_port()}", f"slurm.agent_port={free_port()}"]
    result = submit(str(recipe), *ports, *overrides, "--run-dir", str(run_dir), cluster=cluster)
    assert result.returncode == 0, result.stderr
    match = re.search(r"submitted job (\d+)", result.stdout)
    assert match, result.stdout
    assert f"job log        {run_dir / 'slurm' / f'job-{match.group(1)}.out'}" in result.stdout
    return match.group(1)


def wait_until_requeued(cluster: SlurmCluster, job_id: str, run_dir: Path, timeout: float = 300) -> None:
    """Until the job script has requeued the job: it says so, and the job is pending again."""
    deadline = time.monotonic() + timeout
    while "requeueing the job" not in job_log(run_dir) or cluster.job_state(job_id) != "PENDING":
        assert time.monotonic() < deadline, f"{cluster.job_state(job_id)}:\n{job_log(run_dir)[-3000:]}"
        time.sleep(0.5)


def wait_for_steps(cluster: SlurmCluster, job_id: str, run_dir: Path, steps: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(read_metrics(run_dir)) < steps:
        assert time.monotonic() < deadline and cluster.job_state(job_id), f"no step {steps}:\n{job_log(run_dir)}"
        time.sleep(0.2)


def job_log(run_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob("job-*.out")))


def test_a_missing_partition_is_refused_before_sbatch(cluster, tmp_path):
    result = submit(str(QUICKSTART), "--partition", "h100", "--run-dir", str(tmp_path / "run"), cluster=cluster)
    assert result.returncode == 2
    assert "slurm.partition: no partition 'h100' on this cluster (partitions: debug*)" in result.stderr
    assert not (tmp_path / "run").exists()
    too_big = submit(str(QUICKSTART), "learner.nodes=4", "--run-dir", str(tmp_path / "run"), cluster=cluster)
    assert too_big.returncode == 2
    assert "the job needs 4 nodes" in too_big.stderr and "partition debug has 3" in too_big.stderr


def assert_laid_out_on_three_nodes(run_dir: Path, job_id: str, runs: int) -> list[str]:
    """Learner rank 0 on node0, rank 1 on node1 (each run of the job says so), the servers and
    their agent on node2; the servers reached by node name, not loopback. Returns their urls."""
    log = job_log(run_dir)
    for line in ("learner node 0 (node0): ranks 0-0 of 2", "learner node 1 (node1): ranks 1-1 of 2",
                 "learner on node0,node1 (rendezvous node0:", "rollout servers on node2"):
        assert log.count(line) == runs, (line, log[-3000:])
    layout = json.loads((run_dir / "job" / "layout.json").read_text())
    assert layout["learner_nodes"] == ["node0", "node1"] and layout["server_nodes"] == ["node2"]
    urls = [f"http://node2:{server['spec']['port']}" for server in layout["servers"]]
    assert log.count(f"node2: {len(urls)} server(s) healthy: {', '.join(urls)}") == runs
    assert read_status(run_dir)["state"] == "finished" and read_status(run_dir)["slurm_job_id"] == job_id
    assert log.count("the trainer is done; stopping the servers") == runs, log[-3000:]  # told, not killed
    return urls


def test_a_three_node_job_with_a_server_killed_then_stopped_and_requeued_matches_train_on_one_machine(
        cluster, quickstart, tmp_path):
    """recipes/tiny/three-node.yaml with two servers: learner ranks on node0 and node1 (EP=2
    spans them: the experts' all-to-all crosses nodes), two embedded engines on node2 under its
    agent, R3 on, the weights sent to them over the network by the distributed sync.

    One server is SIGKILLed mid-run: the other takes its requests, node2's agent restarts it
    when the trainer asks (the client, or the publisher finding it dead), and it rejoins the
    weight-update groups at the next broadcast (the senders form them again), then serves again. Later the job is stopped as before a time
    limit (`scancel --signal=USR1 --batch`): checkpoint, requeue, resume on the same nodes.
    Every step comes once, with the numbers of the quickstart trained on one machine by `train`."""
    run_dir = tmp_path / "three-node"
    steps = 12
    job_id = submit_job(cluster, run_dir, f"trainer.steps={steps}", "rollout.servers=2", *QUICKSTART_AT_THE_END,
                        recipe=THREE_NODE)
    wait_for_steps(cluster, job_id, run_dir, 2)
    layout = json.loads((run_dir / "job" / "layout.json").read_text())
    port = layout["servers"][0]["spec"]["port"]
    found = subprocess.run(["pgrep", "-f", f"serve-embedded.*{run_dir}.*--port {port} "], capture_output=True,
                           text=True)
    victims = [int(pid) for pid in found.stdout.split()]
    assert len(victims) == 1, found
    assert victims[0] in cluster.processes_on(cluster.nodes[2])  # the server runs on node2
    os.kill(victims[0], signal.SIGKILL)
    rejoined = f"weight-update groups formed again: none left, http://node2:{port} joined"
    deadline = time.monotonic() + 300
    while rejoined not in job_log(run_dir):
        assert time.monotonic() < deadline and cluster.job_state(job_id), job_log(run_dir)[-3000:]
        time.sleep(0.5)
    wait_for_steps(cluster, job_id, run_dir, len(read_metrics(run_dir)) + 2)  # served by both again
    signalled = cluster.run("scancel", "--signal=USR1", "--batch", job_id)  # as SLURM before the time limit
    assert signalled.returncode == 0, signalled.stderr

    wait_until_requeued(cluster, job_id, run_dir)
    stopped_at = latest_checkpoint(run_dir / "checkpoints")
    assert stopped_at is not None and 4 <= int(stopped_at.name.split("_")[1]) < steps
    # SLURM holds a requeued job for cred_expire seconds (10 on the test cluster) before it starts.
    assert cluster.wait_until_gone(job_id, timeout=400), f"job still {cluster.job_state(job_id)}:\n{job_log(run_dir)}"
    log = job_log(run_dir)
    assert f"job {job_id} (restart 1)" in log
    assert f"resumed from {stopped_at} at step {int(stopped_at.name.split('_')[1])}" in log
    assert f"finished: {steps} steps" in log, log[-3000:]
    urls = assert_laid_out_on_three_nodes(run_dir, job_id, runs=2)
    agent = layout["agent_port"]
    assert log.count(f"asking http://node2:{agent} to restart {urls[0]}") == 1, log[-3000:]
    assert f"restarting http://127.0.0.1:{port} (restart 1)" in log  # the agent, which sees it on loopback
    # Restarted at the client's call (it died mid-rollout) or by the publisher (found dead when
    # the weights went out): once either way.
    assert log.count(rejoined) == 1 and (f"rollout server {urls[0]} restarted\n" in log
                                         or f"{urls[0]} did not answer /health: restarting it" in log), log[-3000:]
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(steps))  # none lost, none repeated
    assert comparable(metrics) == comparable(read_metrics(quickstart[0]))[:steps]
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{steps:08d}"
    assert not (run_dir / "weights").exists() or not any((run_dir / "weights").iterdir())  # sent, not written


def test_one_node_jobs_side_by_side_one_warned_before_its_time_limit_one_failing(cluster, tmp_path):
    """Two one-node jobs at once (they share the cluster as users' jobs do).

    A two-minute job asking for USR1 100 s before its limit: SLURM's own signal, not ours. It
    comes about 20 s in, while the job is still in its setup lines (a slow `module load`): the
    stop waits for the trainer's first step instead of killing the starting job. It runs with
    R3 off but the engine's routes recorded: the learner's own routing then differs from the
    engine's on some token-layer pairs, and the metric says how often.

    A checkpoint directory with a config but no weights passes the recipe checks and fails in
    the other job: its log says that it failed, and why."""
    from dppo_megatron.run.run_dir import make_random_model

    broken = tmp_path / "broken-model"
    make_random_model(load_recipe(QUICKSTART), broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    run_dir, failing_dir = tmp_path / "time-limited", tmp_path / "failing"
    job_id = submit_job(cluster, run_dir, "trainer.steps=5000", "trainer.save_every=0", "trainer.eval_every=0",
                        "--time", "2", "slurm.signal_seconds=100", "slurm.setup=['sleep 30']",
                        "rollout.r3=false", "rollout.record_routes=true")
    failing_id = submit_job(cluster, failing_dir, "model.random_init=null", f"model.path={broken}", "trainer.steps=3")

    wait_until_requeued(cluster, job_id, run_dir)
    log = job_log(run_dir)
    cluster.run("scancel", job_id)  # requeued, it would run again and stop again
    caught = log.index("caught USR1: asking the trainer to checkpoint and stop")
    assert caught < log.index("learner on node")  # caught during setup, before anything started
    status = read_status(run_dir)
    assert status["state"] == "stopped" and 0 < status["step"] < 5000
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{status['step']:08d}"
    assert len(read_metrics(run_dir)) == status["step"]
    assert "DUE TO TIME LIMIT" not in log  # it stopped before SLURM killed it
    agreement = [m["train/routing_agreement"] for m in read_metrics(run_dir)]
    assert all(0.5 < a < 1.0 for a in agreement), agreement

    assert cluster.wait_until_gone(failing_id, timeout=300), job_log(failing_dir)
    log = job_log(failing_dir)
    assert "FAILED: the learner exited with code" in log, log[-3000:]
    status = read_status(failing_dir)
    assert status["state"] == "failed" and str(broken) in status["message"], status
    assert status["message"] in log


def test_a_preflight_job_on_three_nodes_ends_with_its_verdict(cluster, tmp_path):
    """`submit --preflight` of the three-node recipe: learner ranks on node0 and node1, the server
    on node2 under its agent, the weights broadcast across nodes; the job log ends with the table."""
    run_dir = tmp_path / "preflight"
    job_id = submit_job(cluster, run_dir, "--preflight", recipe=THREE_NODE)
    assert cluster.wait_until_gone(job_id, timeout=400), job_log(run_dir)[-3000:]
    log = job_log(run_dir)
    assert "learner on node0,node1" in log and "rollout servers on node2" in log
    table = log[log.index("preflight of "):].splitlines()
    assert any(line.startswith("ok    weight sync by broadcast, inside SGLang's weight-update session")
               for line in table), table
    assert "preflight passed: the job can start" in table, table
    recipe = load_recipe(run_dir / "recipe.yaml")
    assert (recipe.trainer.steps, recipe.slurm.requeue, recipe.slurm.time) == (2, False, "00:30:00")
    assert latest_checkpoint(run_dir / "checkpoints") is None  # nothing kept
