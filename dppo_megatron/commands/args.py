"""What the recipe commands share: the recipe and its overrides from the command line, and the
exit code of a refused one."""

from __future__ import annotations

import sys
from pathlib import Path

from dppo_megatron.run.run_dir import RECIPE_FILE

EXIT_INVALID = 2  # a recipe, file or layout refused before anything started


def add_recipe_arguments(parser, *, optional: bool = False) -> None:
    if optional:
        parser.add_argument("recipe", nargs="?", help="recipe YAML (default with --run-dir: the run's own recipe.yaml)")
    else:
        parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. rollout.r3=false")


def recipe_and_overrides(args) -> tuple[Path | str | None, list[str]]:
    """The recipe a command runs and its overrides: the recipe given, or the run directory's own
    (`--run-dir D key=value` without a recipe). None, with the error printed, when neither is there."""
    overrides = list(args.overrides)
    recipe_path = args.recipe
    if recipe_path and "=" in recipe_path and not Path(recipe_path).exists():
        overrides.insert(0, recipe_path)  # `--run-dir D key=value`: no recipe given
        recipe_path = None
    if recipe_path is None:
        if args.run_dir is None or not (Path(args.run_dir) / RECIPE_FILE).is_file():
            print("error: give a recipe, or --run-dir of an existing run", file=sys.stderr)
            return None, overrides
        recipe_path = Path(args.run_dir) / RECIPE_FILE
    return recipe_path, overrides


def refuse(error: Exception) -> int:
    print(f"error: {error}", file=sys.stderr)
    return EXIT_INVALID
