"""`dppo-megatron preflight` on this machine with the embedded engine (with a real SGLang server in
tests/test_sglang_server.py, as a SLURM job in tests/test_slurm.py): the verdict of two short
steps, the checks that fail and why, and the job `submit --preflight` renders."""

import os
import subprocess
import sys
from pathlib import Path

from dppo_megatron.config.validate import load_recipe
from dppo_megatron.processes import free_port
from dppo_megatron.run.checkpoints import latest_in_run
from dppo_megatron.run.metrics import read_metrics
from dppo_megatron.run.run_dir import RECIPE_FILE

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "tiny" / "quickstart.yaml"
THREE_NODE = REPO / "recipes" / "tiny" / "three-node.yaml"
QWEN3_30B = REPO / "recipes" / "qwen3-30b-a3b" / "dppo-binary-tv.yaml"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dppo_megatron", *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)


def verdict_lines(output: str) -> list[str]:
    return output[output.index("preflight of "):].splitlines()[1:]


def test_the_quickstart_preflight_passes_in_two_short_steps_and_a_stricter_verdict_of_it_fails(tmp_path):
    run_dir = tmp_path / "preflight"
    result = cli("preflight", str(QUICKSTART), "--run-dir", str(run_dir), f"rollout.base_port={free_port()}")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = verdict_lines(result.stdout)
    assert [line[:6] for line in lines[:-1]] == ["ok    "] * 5, lines
    assert lines[-1] == "preflight passed: the job can start"
    assert any("weight sync from disk" in line for line in lines)
    assert any(line.startswith("ok    R3: the servers' routes = the learner's router") for line in lines)
    # Two steps of the recipe, changed only where a check needs it; nothing kept.
    recipe = load_recipe(run_dir / RECIPE_FILE)
    assert (recipe.trainer.steps, recipe.trainer.prompts_per_step, recipe.trainer.mini_batches) == (2, 8, 1)
    assert recipe.optim.lr == 5e-4 and recipe.optim.warmup_steps == 0  # the quickstart's lr is above the probe's
    assert recipe.rollout.max_new_tokens == 6 and recipe.trainer.max_staleness == 0
    assert [m["step"] for m in read_metrics(run_dir)] == [0, 1] and latest_in_run(run_dir) is None

    strict = cli("preflight", "--verdict", str(run_dir), "--max-mismatch", "1e-12", "--min-routing-agreement", "1.5")
    assert strict.returncode == 1
    lines = verdict_lines(strict.stdout)
    assert any(line.startswith("FAIL  server logprobs = learner logprobs, initial weights") and "at most 1e-12" in line
               for line in lines), lines
    assert any(line.startswith("FAIL  R3:") and "at least 1.5" in line for line in lines), lines
    assert lines[-1] == "preflight FAILED: fix the FAIL lines first"


def test_a_preflight_whose_run_fails_names_the_failure_and_the_checks_not_reached(tmp_path):
    from dppo_megatron.run.run_dir import make_random_model

    broken = tmp_path / "no-weights"
    make_random_model(load_recipe(QUICKSTART), broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    result = cli("preflight", str(QUICKSTART), "model.random_init=null", f"model.path={broken}",
                 "--run-dir", str(tmp_path / "preflight"), f"rollout.base_port={free_port()}")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = verdict_lines(result.stdout)
    assert lines[0].startswith("FAIL  1 embedded server(s), rollouts and the first weight sync") and str(broken) in lines[0]
    assert sum(line.startswith("--    ") and line.endswith("not reached") for line in lines) == 4, lines


def test_preflight_refuses_what_it_cannot_run_here(tmp_path):
    spread = cli("preflight", str(THREE_NODE))
    assert spread.returncode == 2 and f"dppo-megatron submit --preflight {THREE_NODE}" in spread.stderr
    nothing = cli("preflight", "--verdict", str(tmp_path))
    assert nothing.returncode == 2 and "holds no run" in nothing.stderr
    bad = cli("preflight", str(QUICKSTART), "--prompts", "0")
    assert bad.returncode == 2 and "--prompts" in bad.stderr


def test_submit_preflight_renders_a_short_unrequeued_job_that_ends_with_the_verdict(tmp_path):
    result = cli("submit", "--preflight", str(QWEN3_30B), "--dry-run", "--partition", "gpu", "--max-mismatch", "0.01")
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --time=00:30:00" in result.stdout and "#SBATCH --no-requeue" in result.stdout
    verdict = ('"$PYTHON" -m dppo_megatron preflight --verdict "$RUN_DIR" --max-mismatch 0.01 '
               '--min-routing-agreement 0.9; exit $?')
    assert verdict in result.stdout.splitlines()
    script = tmp_path / "job.sbatch"
    script.write_text(result.stdout[: result.stdout.index("# job: ")])
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    train_job = cli("submit", str(QWEN3_30B), "--dry-run", "--partition", "gpu")
    assert "preflight --verdict" not in train_job.stdout and "# not a preflight" in train_job.stdout
