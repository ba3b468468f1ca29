"""The dependency rules of DESIGN.md, checked on the source: algo/ imports no Megatron and no
HTTP; rollout/ imports no Megatron; learner/ never talks HTTP."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dppo_megatron"
MEGATRON = {"megatron", "transformer_engine", "dppo_megatron.learner"}
HTTP = {"http", "urllib", "requests", "httpx", "aiohttp", "socket", "dppo_megatron.rollout"}
RULES = {"algo": MEGATRON | HTTP, "rollout": MEGATRON, "learner": HTTP}


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def forbidden(module: str, banned: set[str]) -> bool:
    return any(module == b or module.startswith(b + ".") for b in banned)


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports_respect_the_design_rules(package):
    directory = PACKAGE / package
    if not directory.is_dir():
        pytest.skip(f"dppo_megatron/{package} does not exist yet")
    offenders = {
        f"{path.relative_to(PACKAGE)}: {module}"
        for path in directory.rglob("*.py")
        for module in imported_modules(path)
        if forbidden(module, RULES[package])
    }
    assert not offenders, f"forbidden imports in dppo_megatron/{package}: {sorted(offenders)}"


def test_the_rule_check_catches_an_offending_import(tmp_path):
    offending = tmp_path / "bad.py"
    offending.write_text("import torch\nfrom megatron.core import parallel_state\n")
    assert any(forbidden(m, RULES["algo"]) for m in imported_modules(offending))
