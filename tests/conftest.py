"""Suite-wide hooks and fixtures."""

import fcntl
import json
import os
import time
from pathlib import Path

import pytest
import torch

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

# As the dppo-megatron command does without CUDA (commands/cli.py): torch.compile hands functions
# back as they are, so that the rank programs the tests start (and the tests themselves) do not
# spend seconds importing torch's compiler stack when Megatron Core compiles its fused kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

# The suite runs on 2 workers (pytest-xdist, `--dist loadscope`, see the README): each test
# module goes whole to one worker, so that its module-scoped fixtures (a torchrun over every
# layout) run once. Modules are handed out longest first (seconds measured on 2 cores), so that
# the last ones are short and neither worker waits long for the other at the end; the two
# longest share the quickstart run, which the `quickstart` fixture makes once for both, and
# test_slurm's tests that read it go last in their module, when it is made. (Whole modules
# rather than `xdist_group` marks: xdist 3.8 renames a grouped test through `_nodeid`, which
# pytest 9.2 no longer reads, so the marks are ignored.)
LONGEST_FIRST = ("test_train", "test_slurm", "test_sglang_server", "test_embedded_engine", "test_convert_cli",
                 "test_sglang_contract", "test_learner_checkpoint", "test_learner_parity", "test_learner_loss_parity",
                 "test_node_agent", "test_rollout_client", "test_preflight", "test_colocation", "test_learner_train", "test_token_stats", "test_cpu_bridge",
                 "test_engine_learner_parity", "test_recipes", "test_reward_pool")


SGLANG_MODULES = ("test_sglang_contract", "test_sglang_server", "test_embedded_engine")  # SGLang's own code


def pytest_collection_modifyitems(config, items) -> None:
    def order(item) -> tuple[int, bool]:
        module = item.module.__name__.rsplit(".", 1)[-1]
        rank = LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)
        return rank, module != "test_train" and "quickstart" in getattr(item, "fixturenames", ())

    items.sort(key=order)


def pytest_collection_finish(session) -> None:
    # SGLang's environment for the contract tests and the real server takes minutes to make on
    # a fresh machine: start it now, so that it is made while the tests before them run.
    if any(item.module.__name__.rsplit(".", 1)[-1] in SGLANG_MODULES for item in session.items):
        start_building()


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory) -> tuple[Path, float]:
    """The README's main command (run from the repository root, into a temporary run dir): one
    120-step run that the learning, export, evaluate, resume and multi-node tests share, made
    once for all the workers of the suite (the first to ask makes it, under a file lock; the
    others wait for it). Returns the run directory and the seconds it took."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the workers' base directories sit side by side in it
    root, done = shared / "quickstart", shared / "quickstart.json"
    with open(shared / "quickstart.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            run_dir = root / "run"
            root.mkdir(exist_ok=True)
            started = time.monotonic()
            _, _, recipe = readme_main_command()
            code = finish(start_train(run_dir, f"trainer.steps={QUICKSTART_STEPS}", *QUICKSTART_AT_THE_END,
                                      recipe=REPO / recipe), run_dir, timeout=600)
            assert code == 0, log_tail(run_dir)
            done.write_text(json.dumps({"run_dir": str(run_dir), "seconds": time.monotonic() - started}))
    made = json.loads(done.read_text())
    return Path(made["run_dir"]), made["seconds"]
