"""The layering of the package (docs/architecture.md), checked on the source: every import,
at the top of a module or inside a function, runs down the layers; algo/ and model/ import no
Megatron and no HTTP; rollout/ no Megatron; learner/ no HTTP; only run/ joins the learner and the
rollout side; and no chain of imports comes back to where it started."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dppo_megatron"
ROOT = "dppo_megatron"

# A module may import from its own package and from packages of a lower layer, never up or
# sideways.
LAYERS = {
    "__init__": -1,  # the root package: its version only
    "processes": -1,  # ports and child processes: for anything that starts processes (the reward pool too)
    "keys": -1,  # the servers' API keys: made by the run, read by servers, agents and clients
    "algo": 0, "model": 0, "data": 0, "rewards": 0,
    "config": 1, "learner": 1, "rollout": 1,
    "convert": 2,
    "run": 3,
    "commands": 4,
    "__main__": 5,
}
MEGATRON = {"megatron", "transformer_engine"}
HTTP = {"http", "urllib", "requests", "httpx", "aiohttp", "socket"}
SPEAKS_HTTP = {"http", "urllib.request", "urllib.error", "requests", "httpx", "aiohttp"}
FORBIDDEN = {
    "algo": MEGATRON | HTTP,
    "model": MEGATRON | HTTP,
    "data": MEGATRON | HTTP,
    "rewards": MEGATRON,  # a reward server is HTTP (rewards/remote.py)
    "config": MEGATRON | HTTP,
    "rollout": MEGATRON,
    "learner": HTTP,
    "run": SPEAKS_HTTP,  # the run layer talks to servers through rollout/, never itself
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, `from a import b` as a.b where a.b is a module."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def project_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the project modules it imports (only names that are modules)."""
    files = {module_name(path, package): path for path in package.rglob("*.py")}
    return {name: {m for m in imported_modules(path) if m in files and m != name} for name, path in files.items()}


def top_package(module: str) -> str:
    """The top-level package (or module) of `module`; "__init__" for the root package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def forbidden(module: str, banned: set[str]) -> bool:
    return any(module == b or module.startswith(b + ".") for b in banned)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_module_belongs_to_a_layer():
    unknown = {top_package(m) for m in project_graph()} - set(LAYERS)
    assert not unknown, f"place {sorted(unknown)} in LAYERS (and in docs/architecture.md)"


def test_imports_only_run_down_the_layers():
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in project_graph().items()
        for target in targets
        if top_package(target) != top_package(module) and LAYERS[top_package(target)] >= LAYERS[top_package(module)]
    )
    assert not upward, "imports running up or sideways:\n" + "\n".join(upward)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_design_rules(package):
    offenders = {
        f"{path.relative_to(PACKAGE)}: {module}"
        for path in (PACKAGE / package).rglob("*.py")
        for module in imported_modules(path)
        if forbidden(module, FORBIDDEN[package])
    }
    assert not offenders, f"forbidden imports in dppo_megatron/{package}: {sorted(offenders)}"


def test_only_the_run_layer_joins_the_learner_and_the_rollout_side():
    reaches: dict[str, set[str]] = {}
    for module, targets in project_graph().items():
        reaches.setdefault(top_package(module), set()).update(top_package(t) for t in targets)
    joined = sorted(p for p, wings in reaches.items() if {"learner", "rollout"} <= wings and p != "run")
    assert not joined, f"{joined} import both learner/ and rollout/: only run/ may"


def test_no_import_cycles():
    cycle = find_cycle(project_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_an_upward_import_a_cycle_and_a_forbidden_one(tmp_path):
    package = tmp_path / ROOT
    for name, text in {
        "__init__.py": "",
        "algo/__init__.py": "",
        "algo/loss.py": "import torch\nfrom megatron.core import parallel_state\n",
        "config/__init__.py": "",
        "config/check.py": "def f():\n    from dppo_megatron.run.loop import train\n",
        "run/__init__.py": "",
        "run/loop.py": "from dppo_megatron.config import check\n",
    }.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    graph = project_graph(package)
    assert graph["dppo_megatron.config.check"] == {"dppo_megatron.run.loop"}  # found inside a function
    assert find_cycle(graph) == ["dppo_megatron.config.check", "dppo_megatron.run.loop",
                                 "dppo_megatron.config.check"]
    assert any(forbidden(m, FORBIDDEN["algo"]) for m in imported_modules(package / "algo" / "loss.py"))
    assert LAYERS[top_package("dppo_megatron.run.loop")] > LAYERS[top_package("dppo_megatron.config.check")]


def test_no_function_in_the_package_is_over_100_lines():
    import ast

    long = []
    for source in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                long.append(f"{source.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "split these:\n" + "\n".join(long)


def test_the_rollout_clients_recipe_settings_have_their_one_default_in_the_schema():
    """No second default to drift from the recipe's (it was 256 in flight and 1 per call against
    the schema's 64 and 16)."""
    from dataclasses import MISSING, fields

    from dppo_megatron.config.schema import RolloutConfig
    from dppo_megatron.rollout.client import ClientConfig
    from dppo_megatron.run.configs import client_config

    recipe_fields = {f.name for f in fields(RolloutConfig)}
    shared = [f for f in fields(ClientConfig) if f.name in recipe_fields]
    assert len(shared) == 4 and all(f.default is MISSING for f in shared), shared
    built, defaults = client_config(RolloutConfig()), RolloutConfig()
    assert all(getattr(built, f.name) == getattr(defaults, f.name) for f in shared)
