"""`dppo-megatron train` and `dppo-megatron validate`.

`train` checks the recipe before any process starts, prepares the run directory (resolved
recipe, the random model and toy data of CPU recipes), then runs the trainer on the learner's
ranks of this machine. A run directory that already holds a checkpoint is resumed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from dppo_megatron.config.loading import RecipeError
from dppo_megatron.config.schema import Recipe
from dppo_megatron.config.validate import describe, learner_world_size, load_recipe, random_init_config
from dppo_megatron.convert.qwen3_arch import ArchError
from dppo_megatron.learner.checkpoint import latest_checkpoint
from dppo_megatron.run_dir import INIT_MODEL_DIR, RECIPE_FILE, STOP_FILE, dataset_paths

EXIT_INVALID = 2


def add_parser(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="train from a recipe (resumes a run directory that has a checkpoint)",
        description="Train from a YAML recipe: dppo-megatron train recipes/tiny/quickstart.yaml loss.mode=grpo",
    )
    train.add_argument("recipe", nargs="?", help="recipe YAML (default with --run-dir: the run's own recipe.yaml)")
    train.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. rollout.r3=false")
    train.add_argument("--run-dir", help="run directory (default: trainer.run_dir, else runs/<name>-<timestamp>)")
    train.add_argument("--resume", action="store_true",
                       help="continue the newest run of this recipe under runs/ (or --run-dir) from its last checkpoint")
    train.set_defaults(handler=_train)

    evaluate = subparsers.add_parser(
        "evaluate", help="score a Hugging Face checkpoint on a recipe's held-out prompts",
        description="Start the recipe's rollout servers on MODEL and report mean reward, avg@k and pass@k on "
                    "the held-out prompts (data.eval, or the toy task's held-out set).",
    )
    evaluate.add_argument("recipe")
    evaluate.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. trainer.eval_n=16")
    evaluate.add_argument("--model", required=True, help="Hugging Face checkpoint directory to evaluate")
    evaluate.add_argument("--run-dir", help="where logs and eval.json go (default runs/<name>-eval-<timestamp>)")
    evaluate.set_defaults(handler=_evaluate)

    validate = subparsers.add_parser("validate", help="check a recipe; print it resolved, the layout and memory")
    validate.add_argument("recipe")
    validate.add_argument("overrides", nargs="*", help="key.path=value overrides")
    validate.set_defaults(handler=_validate)


def _validate(args) -> int:
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        print(describe(recipe, asdict(recipe)))
    except (RecipeError, ArchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID
    print(f"\n{args.recipe}: valid")
    return 0


def _train(args) -> int:
    from dppo_megatron.launch_utils import run_ranks

    overrides = list(args.overrides)
    recipe_path = args.recipe
    if recipe_path and "=" in recipe_path and not Path(recipe_path).exists():
        overrides.insert(0, recipe_path)  # `train --run-dir D key=value`: no recipe given
        recipe_path = None
    run_dir = Path(args.run_dir) if args.run_dir else None
    if recipe_path is None:
        if run_dir is None or not (run_dir / RECIPE_FILE).is_file():
            print("error: give a recipe, or --run-dir of an existing run", file=sys.stderr)
            return EXIT_INVALID
        recipe_path = run_dir / RECIPE_FILE
    try:
        run_dir = run_dir or _run_dir(load_recipe(recipe_path, overrides), resume=args.resume)
        recipe = load_recipe(recipe_path, overrides + [f"trainer.run_dir={run_dir}"], check_files=True)
    except (RecipeError, ArchError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID
    if recipe.learner.nodes > 1 or recipe.rollout.nodes > 0:
        print(f"error: the recipe spans {recipe.learner.nodes + recipe.rollout.nodes} nodes (learner.nodes "
              f"{recipe.learner.nodes} + rollout.nodes {recipe.rollout.nodes}); `train` runs on this machine only: "
              "submit it with `dppo-megatron submit`, or set learner.nodes=1 rollout.nodes=0 to run learners and "
              "servers side by side here", file=sys.stderr)
        return EXIT_INVALID
    resuming = latest_checkpoint(run_dir / "checkpoints") is not None
    if args.resume and not resuming:
        print(f"error: --resume: {run_dir} has no complete checkpoint", file=sys.stderr)
        return EXIT_INVALID
    prepare_run_dir(recipe, run_dir)
    (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop asked of an earlier run is not for this one
    print(f"{'resuming' if resuming else 'starting'} {recipe.name} in {run_dir} on {learner_world_size(recipe)} "
          f"learner rank(s)", flush=True)
    return run_ranks(["-m", "dppo_megatron.trainer", str(run_dir)], learner_world_size(recipe))


def _evaluate(args) -> int:
    import json

    from dppo_megatron.config.validate import recipe_arch
    from dppo_megatron.placement import server_specs
    from dppo_megatron.rollout.servers import ServerManager
    from dppo_megatron.trainer import Rollouts

    as_model = ["model.random_init=null", f"model.path={Path(args.model).resolve()}"]
    try:
        recipe = load_recipe(args.recipe, list(args.overrides) + as_model, check_files=True)
        if dataset_paths(recipe, Path("."))[1] is None:
            raise RecipeError(["data.eval: evaluation needs held-out prompts"], args.recipe)
    except (RecipeError, ArchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID
    run_dir = Path(args.run_dir or Path("runs") / f"{recipe.name}-eval-{time.strftime('%Y%m%d-%H%M%S')}")
    prepare_run_dir(recipe, run_dir)
    with ServerManager(server_specs(recipe, run_dir), run_dir / "logs") as manager:
        metrics = Rollouts(recipe, run_dir, recipe_arch(recipe), manager.urls, manager.restart).evaluate()
    result = {"model": str(args.model), "prompts": recipe.data.eval or "toy held-out set", **metrics}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


def _run_dir(recipe: Recipe, *, resume: bool) -> Path:
    if recipe.trainer.run_dir:
        return Path(recipe.trainer.run_dir)
    if resume:
        runs = sorted(Path("runs").glob(f"{recipe.name}-*"), key=lambda p: p.stat().st_mtime)
        runs = [r for r in runs if latest_checkpoint(r / "checkpoints") is not None]
        if not runs:
            raise FileNotFoundError(f"--resume: no run of {recipe.name} with a checkpoint under runs/")
        return runs[-1]
    return Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(recipe: Recipe, run_dir: Path) -> None:
    """The resolved recipe, and what a CPU recipe makes for itself: the random model with its
    toy tokenizer, the toy dataset. Made once; a resumed run finds them in place."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RECIPE_FILE).write_text(yaml.safe_dump(asdict(recipe), sort_keys=False))
    if recipe.model.random_init is not None and not (run_dir / INIT_MODEL_DIR / "config.json").is_file():
        make_random_model(recipe, run_dir / INIT_MODEL_DIR)
    toy = recipe.data.generate
    train_path, _ = dataset_paths(recipe, run_dir)
    if toy is not None and not train_path.is_file():
        from dppo_megatron.data.toy import write_toy_dataset

        write_toy_dataset(train_path.parent, task=toy.task, digits=toy.digits, train_rows=toy.train_rows,
                          eval_rows=toy.eval_rows, seed=recipe.trainer.seed)


def make_random_model(recipe: Recipe, directory: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from dppo_megatron.data.toy import build_toy_tokenizer

    fields = random_init_config(recipe)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(recipe.trainer.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    partial = directory.with_name(directory.name + ".partial")
    model.save_pretrained(partial)
    build_toy_tokenizer(partial)
    GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id).save_pretrained(partial)
    partial.replace(directory)
