"""`dppo-megatron validate`: check a recipe; print it resolved, with the model, the process layout
and a per-GPU memory estimate (for colocated SGLang servers, the memory plan of both turns,
docs/colocation.md). `dppo-megatron recipe-reference` prints docs/recipes.md."""

from __future__ import annotations

from dataclasses import asdict

from dppo_megatron.commands.args import add_recipe_arguments, refuse
from dppo_megatron.config.loading import RecipeError
from dppo_megatron.config.validate import load_recipe
from dppo_megatron.model.arch import ArchError


def add_parser(subparsers) -> None:
    validate = subparsers.add_parser("validate", help="check a recipe; print it resolved, the layout and memory")
    add_recipe_arguments(validate)
    validate.set_defaults(handler=_validate)

    reference = subparsers.add_parser("recipe-reference", help="print the recipe reference (docs/recipes.md)")
    reference.set_defaults(handler=_reference)


def _validate(args) -> int:
    from dppo_megatron.config.describe import describe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        print(describe(recipe, asdict(recipe)))
    except (RecipeError, ArchError) as error:
        return refuse(error)
    print(f"\n{args.recipe}: valid")
    return 0


def _reference(args) -> int:
    from dppo_megatron.config.reference import reference

    print(reference(), end="")
    return 0
