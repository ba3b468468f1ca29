"""`dppo-megatron train`: check the recipe before any process starts, prepare the run directory
(resolved recipe, the random model and toy data of CPU recipes), then run the trainer on the
learner's ranks of this machine. A run directory that already holds a checkpoint is resumed."""

from __future__ import annotations

import sys
from pathlib import Path

from dppo_megatron.commands.args import EXIT_INVALID, add_recipe_arguments, recipe_and_overrides, refuse
from dppo_megatron.config.loading import RecipeError
from dppo_megatron.config.placement import learner_world_size
from dppo_megatron.config.schema import Recipe
from dppo_megatron.config.validate import load_recipe
from dppo_megatron.model.arch import ArchError
from dppo_megatron.processes import run_ranks
from dppo_megatron.rollout.servers import port_is_free
from dppo_megatron.run.checkpoints import CHECKPOINTS_DIR, latest_in_run
from dppo_megatron.run.placement import server_specs
from dppo_megatron.run.run_dir import STOP_FILE, new_run_dir, prepare_run_dir, read_status, with_run_dir


def add_parser(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="train from a recipe (resumes a run directory that has a checkpoint)",
        description="Train from a YAML recipe: dppo-megatron train recipes/tiny/quickstart.yaml loss.mode=grpo",
    )
    add_recipe_arguments(train, optional=True)
    train.add_argument("--run-dir", help="run directory (default: trainer.run_dir, else runs/<name>-<timestamp>)")
    train.add_argument("--resume", action="store_true",
                       help="continue the newest run of this recipe under runs/ (or --run-dir) from its last checkpoint")
    train.set_defaults(handler=_train)


def _train(args) -> int:
    recipe_path, overrides = recipe_and_overrides(args)
    if recipe_path is None:
        return EXIT_INVALID
    try:
        recipe = load_recipe(recipe_path, overrides, check_files=True)
        run_dir = Path(args.run_dir or recipe.trainer.run_dir or _run_dir(recipe, resume=args.resume))
    except (RecipeError, ArchError, FileNotFoundError) as error:
        return refuse(error)
    recipe = with_run_dir(recipe, run_dir)
    if recipe.learner.nodes > 1 or recipe.rollout.nodes > 0:
        print(f"error: the recipe spans {recipe.learner.nodes + recipe.rollout.nodes} nodes (learner.nodes "
              f"{recipe.learner.nodes} + rollout.nodes {recipe.rollout.nodes}); `train` runs on this machine only: "
              "submit it with `dppo-megatron submit`, or set learner.nodes=1 rollout.nodes=0 to run learners and "
              "servers side by side here", file=sys.stderr)
        return EXIT_INVALID
    specs = server_specs(recipe, run_dir)
    busy = [spec.port for spec in specs if not port_is_free(spec.host, spec.port)]
    if busy:
        print(f"error: rollout.base_port: port {busy[0]} is in use on this machine (another run's server?); "
              f"pick free ports with rollout.base_port=N (the run needs {len(specs)} from N on)", file=sys.stderr)
        return EXIT_INVALID
    resuming = latest_in_run(run_dir) is not None
    if args.resume and not resuming:
        print(f"error: --resume: {run_dir} has no complete checkpoint", file=sys.stderr)
        return EXIT_INVALID
    status = read_status(run_dir) or {}
    if resuming and status.get("state") == "finished" and status.get("total_steps", 0) >= recipe.trainer.steps:
        print(f"{run_dir} already finished its {recipe.trainer.steps} steps; to train further, resume it with a "
              f"larger trainer.steps (dppo-megatron train --run-dir {run_dir} --resume trainer.steps=N)")
        return 0
    prepare_run_dir(recipe, run_dir)
    (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop asked of an earlier run is not for this one
    ranks = learner_world_size(recipe)
    print(f"{'resuming' if resuming else 'starting'} {recipe.name} in {run_dir} on {ranks} learner rank(s)", flush=True)
    code = run_ranks(["-m", "dppo_megatron", "run-rank", str(run_dir)], ranks)
    if code != 0:
        print(failure_line(run_dir, code), file=sys.stderr, flush=True)
    return code


def failure_line(run_dir: Path, code: int) -> str:
    """The last line of a failed run: what failed, where the run stands, how to go on."""
    status = read_status(run_dir) or {}
    checkpoint = latest_in_run(run_dir)
    why = status.get("message") if status.get("state") in ("failed", "killed") else None
    line = f"error: the run failed (exit {code})" + (f" at step {status['step']}: {why}" if why else "")
    if checkpoint is not None:
        return f"{line}\nresume from {checkpoint} with: dppo-megatron train --run-dir {run_dir} --resume"
    if torn := sorted((run_dir / CHECKPOINTS_DIR).glob("step_*.torn")):
        return f"{line}\nno whole checkpoint is left; the torn ones are kept in {torn[0].parent} as *.torn"
    return f"{line}\nno checkpoint was saved; the run directory is {run_dir}"


def _run_dir(recipe: Recipe, *, resume: bool) -> Path:
    """A new run directory, or with --resume the newest run of this recipe that has a checkpoint."""
    if not resume:
        return new_run_dir(recipe)
    runs = sorted(Path("runs").glob(f"{recipe.name}-*"), key=lambda p: p.stat().st_mtime)
    runs = [r for r in runs if latest_in_run(r) is not None]
    if not runs:
        raise FileNotFoundError(f"--resume: no run of {recipe.name} with a checkpoint under runs/")
    return runs[-1]
