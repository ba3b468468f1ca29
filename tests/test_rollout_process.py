"""Rank 0's rollouts run in a process of their own: what goes wrong there reaches rank 0 as it
was, and a process that dies is reported, not waited for. (Its samples, restarts and stop
signals are exercised end to end by tests/test_train.py.)"""

import os
import signal
import time
from pathlib import Path

import pytest

from dppo_megatron.config.validate import load_recipe, recipe_arch
from dppo_megatron.data.prompts import DatasetError
from dppo_megatron.data.toy import build_toy_tokenizer
from dppo_megatron.keys import KEYS_FILE, make_keys_file
from dppo_megatron.run.rollout_process import RolloutProcess, RolloutProcessError, run_rollouts
from dppo_megatron.run.run_dir import INIT_MODEL_DIR

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "quickstart.yaml"


def recipe_with_dataset(tmp_path: Path, rows: str):
    """A recipe whose dataset holds `rows` by the time the rollouts read it (after the recipe's
    own checks, which read a good file: a broken one would be refused there)."""
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "reverse 1 2 3 :", "answer": "3 2 1"}\n')
    build_toy_tokenizer(tmp_path / INIT_MODEL_DIR)
    make_keys_file(tmp_path / KEYS_FILE)  # as prepare_run_dir makes them
    recipe = load_recipe(QUICKSTART, ["data.generate=null", f"data.train={train}", "trainer.eval_every=0",
                                       "reward.workers=1"])
    train.write_text(rows)
    return recipe, recipe_arch(recipe)


def test_an_error_in_the_rollout_process_reaches_rank_0_as_it_was(tmp_path):
    recipe, arch = recipe_with_dataset(tmp_path, '{"prompt": "reverse 1 2 3 :", "answer": "3 2 1"}\n{"prompt": \n')
    with pytest.raises(DatasetError, match=r"train\.jsonl:2: not valid JSON"):
        RolloutProcess(run_rollouts(recipe, tmp_path, arch, ["http://127.0.0.1:9"]))


def test_a_rollout_process_that_dies_is_reported_with_its_exit_code(tmp_path):
    recipe, arch = recipe_with_dataset(tmp_path, '{"prompt": "reverse 1 2 3 :", "answer": "3 2 1"}\n')
    rollouts = RolloutProcess(run_rollouts(recipe, tmp_path, arch, ["http://127.0.0.1:9"]))
    try:
        os.kill(rollouts._process.pid, signal.SIGTERM)  # ignored: rank 0 decides when rollouts stop
        time.sleep(0.5)
        assert rollouts._process.is_alive()
        os.kill(rollouts._process.pid, signal.SIGKILL)
        with pytest.raises(RolloutProcessError, match=r"died \(exit code -9\)"):
            rollouts.evaluate()
    finally:
        rollouts.close()
