"""Recipes from YAML: `defaults:` inheritance, `key=value` overrides, and conversion into the
typed schema with errors that name the key path and what it accepts."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml


class RecipeError(ValueError):
    """An invalid recipe. `problems` lists every problem found, each naming its key path."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        super().__init__(f"{source} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The recipe at `path` with its `defaults:` merged in: each listed file (relative to this
    one) in order, then this file's own keys on top. Mappings merge key by key; anything else
    is replaced."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise RecipeError([f"defaults: inheritance loop {chain}"], str(path))
    if not path.is_file():
        raise RecipeError([f"no such recipe file {path}"], str(path))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError([f"not valid YAML: {error}"], str(path)) from None
    if not isinstance(data, dict):
        raise RecipeError([f"the top level must be a mapping, got {type(data).__name__}"], str(path))
    defaults = data.pop("defaults", None) or []
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise RecipeError(["defaults: must be a file name or a list of file names"], str(path))
    merged: dict = {}
    for parent in defaults:
        merged = merge(merged, read_yaml(path.parent / parent, (*_seen, path)))
    return merge(merged, data)


def merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`section.key=value` strings (values parsed as YAML: `true`, `1e-6`, `[1, 2]`, `null`)."""
    data = dict(data)
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: expected key.path=value")
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    if problems:
        raise RecipeError(problems, "command line")
    return data


def build(cls, data: Any, path: str, problems: list[str]):
    """An instance of dataclass `cls` from `data`; every problem is appended to `problems`
    (and the field keeps its default) so that one run reports all of them."""
    if not isinstance(data, dict):
        problems.append(f"{path or 'recipe'}: expected a mapping, got {_describe(data)}")
        return cls()
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            where = f"{path}.{key}" if path else str(key)
            problems.append(f"{where}: unknown key; {path or 'the top level'} accepts {', '.join(names)}")
    values = {}
    for name in names:
        if name in data:
            where = f"{path}.{name}" if path else name
            values[name] = convert(hints[name], data[name], where, problems)
    return cls(**{k: v for k, v in values.items() if v is not _INVALID})


_INVALID = object()


def convert(hint, value, path: str, problems: list[str]):
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return convert(inner, value, path, problems)
    if value is None:
        problems.append(f"{path}: must not be null")
        return _INVALID
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path, problems)
    if origin is Literal:
        if value not in args:
            problems.append(f"{path}: {value!r} is not allowed; choose one of {', '.join(map(str, args))}")
            return _INVALID
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_describe(value)}")
            return _INVALID
        items = [convert(args[0], item, f"{path}[{i}]", problems) for i, item in enumerate(value)]
        return [i for i in items if i is not _INVALID]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {_describe(value)}")
            return _INVALID
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                problems.append(f"{path}: keys must be strings, got {_describe(key)}")
                continue
            if args[1] is str and isinstance(item, (bool, int, float)):
                item = str(item).lower() if isinstance(item, bool) else str(item)  # `NCCL_DEBUG_SUBSYS: 1`
            converted = convert(args[1], item, f"{path}.{key}", problems)
            if converted is not _INVALID:
                out[key] = converted
        return out
    if hint is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {_describe(value)}")
            return _INVALID
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {_describe(value)}")
            return _INVALID
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-6` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {_describe(value)}")
            return _INVALID
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {_describe(value)}")
            return _INVALID
        return value
    raise TypeError(f"schema type {hint} at {path} is not supported")  # a bug in the schema


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def to_dict(instance) -> dict:
    return dataclasses.asdict(instance)
