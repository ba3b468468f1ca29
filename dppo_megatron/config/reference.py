"""docs/recipes.md, generated from the schema (`dppo-megatron recipe-reference > docs/recipes.md`;
a test keeps the file in step)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Literal, get_args, get_origin, get_type_hints

from dppo_megatron.config.schema import Recipe

HEADER = """# Recipe reference

Generated from `dppo_megatron/config/schema.py` by `dppo-megatron recipe-reference`;
do not edit by hand.

A recipe is a YAML file. `defaults: [other.yaml, ...]` merges other recipes underneath (paths
relative to the file; mappings merge key by key, later files win, the file's own keys last).
Any key can be overridden on the command line: `dppo-megatron train R.yaml loss.mode=grpo
rollout.r3=false optim.lr=1e-6`. `dppo-megatron validate R.yaml` checks a recipe and prints
it resolved, with the process layout and a per-GPU memory estimate (for colocated servers, the
memory plan of docs/colocation.md); unknown keys, wrong types and impossible values are refused
with the key path and the allowed values.
"""


def _type_name(hint) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _type_name(inner[0]) + " or null"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if dataclasses.is_dataclass(hint):
        return "mapping"
    return hint.__name__


def _default(field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
        return "null" if value is None else f"`{str(value).lower() if isinstance(value, bool) else value}`"
    value = field.default_factory()
    if value in ([], {}):
        return f"`{value}`"
    return "see below"


def _section(cls, path: str, lines: list[str]) -> None:
    hints = get_type_hints(cls)
    nested = []
    lines += ["", f"## `{path}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        lines.append(f"| `{field.name}` | {_type_name(hint)} | {_default(field)} | {field.metadata.get('help', '')} |")
        inner = [a for a in (get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)]
        if inner:
            nested.append((inner[0], f"{path}.{field.name}"))
    for inner, inner_path in nested:
        _section(inner, inner_path, lines)


def reference() -> str:
    lines = [HEADER.rstrip()]
    top_hints = get_type_hints(Recipe)
    lines += ["", "## top level", "", "| key | meaning |", "|---|---|"]
    for field in dataclasses.fields(Recipe):
        lines.append(f"| `{field.name}` | {field.metadata.get('help', '')} |")
    for field in dataclasses.fields(Recipe):
        if dataclasses.is_dataclass(top_hints[field.name]):
            _section(top_hints[field.name], field.name, lines)
    return "\n".join(lines) + "\n"
