"""Suite-wide hooks and fixtures."""

import time
from pathlib import Path

import pytest

from tests.sglang_contract import start_building
from tests.train_runs import (
    QUICKSTART_AT_THE_END,
    QUICKSTART_STEPS,
    REPO,
    finish,
    log_tail,
    readme_main_command,
    start_train,
)


def pytest_collection_finish(session) -> None:
    # SGLang's environment for the contract tests takes minutes to make on a fresh machine:
    # start it now, so that it is made while the tests before them run.
    if any(item.module.__name__.endswith("test_sglang_contract") for item in session.items):
        start_building()


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory) -> tuple[Path, float]:
    """The README's main command (run from the repository root, into a temporary run dir): one
    120-step run that the learning, export, evaluate, resume and multi-node tests share. Returns
    the run directory and the seconds it took."""
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    started = time.monotonic()
    _, _, recipe = readme_main_command()
    code = finish(start_train(run_dir, f"trainer.steps={QUICKSTART_STEPS}", *QUICKSTART_AT_THE_END,
                              recipe=REPO / recipe), run_dir, timeout=600)
    assert code == 0, log_tail(run_dir)
    return run_dir, time.monotonic() - started
