"""`dppo-megatron evaluate`: score a Hugging Face checkpoint on a recipe's held-out prompts, with
the recipe's rollout servers and sampling."""

from __future__ import annotations

import json
from pathlib import Path

from dppo_megatron.commands.args import add_recipe_arguments, refuse
from dppo_megatron.config.loading import RecipeError
from dppo_megatron.config.validate import load_recipe, recipe_arch
from dppo_megatron.model import manifest
from dppo_megatron.model.arch import ArchError
from dppo_megatron.rollout.servers import ServerManager
from dppo_megatron.run.placement import server_specs
from dppo_megatron.run.rollouts import Rollouts
from dppo_megatron.run.run_dir import dataset_paths, new_run_dir, prepare_run_dir


def add_parser(subparsers) -> None:
    evaluate = subparsers.add_parser(
        "evaluate", help="score a Hugging Face checkpoint on a recipe's held-out prompts",
        description="Start the recipe's rollout servers on MODEL and report mean reward, avg@k and pass@k on "
                    "the held-out prompts (data.eval, or the toy task's held-out set).",
    )
    add_recipe_arguments(evaluate)
    evaluate.add_argument("--model", required=True, help="Hugging Face checkpoint directory to evaluate")
    evaluate.add_argument("--run-dir", help="where logs and eval.json go (default runs/<name>-eval-<timestamp>)")
    evaluate.set_defaults(handler=_evaluate)


def _evaluate(args) -> int:
    as_model = ["model.random_init=null", f"model.path={Path(args.model).resolve()}"]
    try:
        recipe = load_recipe(args.recipe, list(args.overrides) + as_model, check_files=True)
        if dataset_paths(recipe, Path("."))[1] is None:
            raise RecipeError(["data.eval: evaluation needs held-out prompts"], args.recipe)
        manifest.check(args.model, "--model")  # an export the run wrote carries one; a torn one is refused
    except (RecipeError, ArchError, ValueError) as error:
        return refuse(error)
    run_dir = Path(args.run_dir or new_run_dir(recipe, "eval"))
    prepare_run_dir(recipe, run_dir)
    with ServerManager(server_specs(recipe, run_dir), run_dir / "logs") as manager:
        rollouts = Rollouts(recipe, run_dir, recipe_arch(recipe), manager.urls, manager.restart)
        try:
            metrics = rollouts.evaluate()
        finally:
            rollouts.close()
    result = {"model": str(args.model), "prompts": recipe.data.eval or "toy held-out set", **metrics}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0
