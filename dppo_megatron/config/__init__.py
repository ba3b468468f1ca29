"""Recipes: the typed schema, YAML loading with `defaults:` and overrides, validation."""

from dppo_megatron.config.loading import RecipeError
from dppo_megatron.config.schema import Recipe
from dppo_megatron.config.validate import load_recipe

__all__ = ["Recipe", "RecipeError", "load_recipe"]
