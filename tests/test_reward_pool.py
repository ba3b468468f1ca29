"""Rewards scored in worker processes as responses arrive: a response that hangs its worker
scores 0 without holding up the others, and the rewards a recipe names (a Python function, a
reward server) are the ones that score."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dppo_megatron.config.loading import RecipeError
from dppo_megatron.config.validate import load_recipe
from dppo_megatron.data.toy import build_toy_tokenizer
from dppo_megatron.rewards.pool import RewardPool
from dppo_megatron.run.configs import reward_spec

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "quickstart.yaml"
MODULE = '''
import time

def exact(response, answer):
    if answer == "hang":
        time.sleep(600)
    if answer == "raise":
        raise ValueError("no such answer")
    return 1.0 if response == answer else 0.25
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tokenizer directory and a module of reward functions on sys.path (workers inherit it)."""
    import sys

    root = tmp_path_factory.mktemp("rewards")
    tokenizer = build_toy_tokenizer(root / "tokenizer")
    (root / "my_rewards.py").write_text(MODULE)
    sys.path.insert(0, str(root))
    yield root, tokenizer
    sys.path.remove(str(root))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_a_hanging_reward_scores_zero_and_the_others_are_scored_meanwhile(toy):
    root, tokenizer = toy
    recipe = load_recipe(QUICKSTART, ["reward.kind=python", "reward.function=my_rewards:exact", "reward.timeout=1",
                                      "reward.workers=2"], check_files=True)
    with RewardPool(reward_spec(recipe), root / "tokenizer", workers=recipe.reward.workers) as pool:
        warm = pool.submit(encode(tokenizer, "1 2"), "1 2")
        assert warm.result(timeout=120) == 1.0  # the workers are up
        started = time.monotonic()
        hanging = pool.submit(encode(tokenizer, "1 2"), "hang")
        others = [pool.submit(encode(tokenizer, "3 2 1"), answer) for answer in ["3 2 1", "1 2 3", "raise"] * 4]
        # The other worker scores all the rest while the first one is stuck.
        assert [f.result(timeout=60) for f in others] == [1.0, 0.25, 0.0] * 4
        assert time.monotonic() - started < 2.0 + 1.0
        assert hanging.result(timeout=60) == 0.0
        assert time.monotonic() - started < 2.0 + 10.0  # the limit (timeout + grace), not the sleep
        counts = pool.counts.take()
        assert counts.timeouts == 1 and counts.errors == 4 and "no such answer" in counts.first_error
        # The killed worker was replaced: both workers score again.
        assert [f.result(timeout=120) for f in [pool.submit(encode(tokenizer, "5"), "5") for _ in range(8)]] == [1.0] * 8


class _RewardHandler(BaseHTTPRequestHandler):
    calls: list = []
    fail_first = 0

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(body)
        if type(self).fail_first > 0:  # a server that is still starting: 503, retried
            type(self).fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        reward = float(len(body["response"].split()) == len(body["answer"].split()))
        payload = json.dumps({"reward": reward}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def test_a_reward_server_named_by_the_recipe_scores_and_is_retried(toy):
    root, tokenizer = toy
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RewardHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _RewardHandler.calls, _RewardHandler.fail_first = [], 2
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/score"
        recipe = load_recipe(QUICKSTART, ["reward.kind=http", f"reward.url={url}", "reward.workers=1"])
        with RewardPool(reward_spec(recipe), root / "tokenizer", workers=1) as pool:
            scores = [pool.submit(encode(tokenizer, r), a).result(timeout=120)
                      for r, a in [("3 2 1", "1 2 3"), ("3 2", "1 2 3")]]
        assert scores == [1.0, 0.0]
        assert _RewardHandler.calls[-1] == {"response": "3 2", "answer": "1 2 3"}  # decoded text, reference answer
        assert len(_RewardHandler.calls) == 4  # two 503s, retried
    finally:
        server.shutdown()


def test_a_reward_function_that_cannot_be_imported_is_refused_with_the_recipe(toy):
    with pytest.raises(RecipeError, match="reward.function 'my_rewards:nope': my_rewards has no 'nope'"):
        load_recipe(QUICKSTART, ["reward.kind=python", "reward.function=my_rewards:nope"], check_files=True)
    with pytest.raises(RecipeError, match="cannot import 'no_such_module'"):
        load_recipe(QUICKSTART, ["reward.kind=python", "reward.function=no_such_module:f"], check_files=True)
