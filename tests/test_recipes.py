"""Recipes: every shipped one validates; `defaults:` and overrides resolve as documented; each
rule refuses a bad recipe with the key path."""

import subprocess
import sys
from pathlib import Path

import pytest

from dppo_megatron.config import RecipeError, load_recipe
from dppo_megatron.config.describe import memory_estimate
from dppo_megatron.config.placement import rank_coordinates
from dppo_megatron.config.validate import recipe_arch
from dppo_megatron.model.arch import parameter_counts

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
QUICKSTART = RECIPES / "tiny" / "quickstart.yaml"
SHIPPED = sorted(RECIPES.rglob("*.yaml"))


def test_the_expected_recipes_are_shipped():
    names = {str(p.relative_to(RECIPES)) for p in SHIPPED}
    for expected in ["qwen3-30b-a3b/dppo-binary-tv.yaml", "qwen3-30b-a3b/dppo-binary-tv-colocated.yaml",
                     "qwen3-30b-a3b/dppo-binary-kl.yaml",
                     "qwen3-30b-a3b/dppo-topk-kl.yaml", "qwen3-30b-a3b/grpo-clip-higher.yaml",
                     "qwen3-30b-a3b/cispo.yaml", "qwen3-235b-a22b/dppo-binary-tv.yaml",
                     "qwen3-8b-base/dppo-binary-tv.yaml", "qwen3-4b-base/dppo-binary-tv.yaml", "tiny/quickstart.yaml",
                     "qwen3-30b-a3b-thinking/dppo-binary-tv.yaml", "qwen3-30b-a3b-thinking/grpo-clip-higher.yaml"]:
        assert expected in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_recipe_validates(path, capsys):
    # The command's own entry point, in this process (a fresh interpreter per recipe spends its
    # time importing torch); the broken-dataset test below runs it as a command.
    from dppo_megatron.commands.cli import main

    code = main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "# learner:" in out and "# memory per learner GPU" in out


def test_30b_recipes_follow_the_published_setup_with_r3_off():
    """The authors' run (verl examples/dppo_trainer/run_qwen30b_dppo.sh) for every method of the
    paper; docs/paper-recipes.md gives the source of each setting."""
    for name, mode, low, high in [("dppo-binary-tv", "dppo_binary_tv", 0.15, 0.15),
                                  ("dppo-binary-kl", "dppo_binary_kl", 0.05, 0.05),
                                  ("dppo-topk-tv", "dppo_topk_tv", 0.15, 0.15),
                                  ("dppo-topk-kl", "dppo_topk_kl", 0.05, 0.05),
                                  ("grpo-clip-higher", "grpo", 0.2, 0.28), ("cispo", "cispo", 0.2, 0.28),
                                  ("pg-is", "pg_is", 0.2, 0.28), ("pg-tis", "pg_tis", 0.2, 0.28),
                                  ("minirl", "grpo_recompute", 0.2, 0.28),
                                  ("grpo-relax-high", "grpo_relax_high", 0.2, 0.28),
                                  ("grpo-relax-low", "grpo_relax_low", 0.2, 0.28),
                                  ("grpo-relax-both", "grpo_relax_both", 0.2, 0.28)]:
        recipe = load_recipe(RECIPES / "qwen3-30b-a3b" / f"{name}.yaml")
        assert (recipe.loss.mode, recipe.loss.low, recipe.loss.high) == (mode, low, high)
        assert recipe.loss.ratio_cap == (2.0 if mode == "pg_tis" else None)  # clip_ratio_c=10000: no truncation
        assert recipe.loss.relax_below == (0.1 if mode.startswith("grpo_relax") else None)
        assert recipe.rollout.r3 is False and recipe.rollout.n == 16 and recipe.rollout.temperature == 1.0
        assert recipe.trainer.prompts_per_step == 256 and recipe.trainer.mini_batches == 8
        assert recipe.trainer.steps == 500 and recipe.trainer.eval_every == 10 and recipe.trainer.eval_n == 1
        assert (recipe.optim.lr, recipe.optim.warmup_steps, recipe.optim.weight_decay) == (1e-6, 0, 0.01)
        assert recipe.rollout.max_new_tokens == 8192 and recipe.data.max_prompt_len == 2048
        assert recipe.loss.aggregation == "seq-mean-token-sum-norm" and recipe.loss.normalize_std is False
        assert (recipe.learner.tp, recipe.learner.ep) == (2, 8)
        assert load_recipe(RECIPES / "qwen3-30b-a3b" / f"{name}.yaml", ["rollout.r3=true"]).rollout.r3 is True


@pytest.mark.parametrize("setting, model, moe", [("qwen3-30b-a3b-thinking", "Qwen/Qwen3-30B-A3B", True),
                                                 ("qwen3-8b-base", "Qwen/Qwen3-8B-Base", False)])
def test_the_thinking_and_dense_recipes_follow_the_papers_table(setting, model, moe):
    """The paper's table of scaling-experiment settings (no script was published for these):
    MoE Thinking and Dense Base, with DPPO-Binary-TV at 0.2 and GRPO-ClipHigher at 0.2 / 0.27."""
    for name, mode, low, high in [("dppo-binary-tv", "dppo_binary_tv", 0.2, 0.2),
                                  ("dppo-binary-kl", "dppo_binary_kl", 0.05, 0.05),
                                  ("grpo-clip-higher", "grpo", 0.2, 0.27), ("cispo", "cispo", 0.2, 0.28)]:
        recipe = load_recipe(RECIPES / setting / f"{name}.yaml")
        assert recipe.model.path == model and (recipe.loss.mode, recipe.loss.low, recipe.loss.high) == (mode, low, high)
        assert recipe.data.max_prompt_len == 1024 and recipe.optim.lr == 1e-6 and recipe.rollout.temperature == 1.0
        assert (recipe.rollout.max_new_tokens, recipe.rollout.n, recipe.trainer.prompts_per_step) == (
            (16384, 16, 256) if moe else (8000, 8, 128))
        assert recipe.trainer.prompts_per_step // recipe.trainer.mini_batches == 32  # ppo_mini_batch_size
        assert (recipe.trainer.eval_every, recipe.trainer.eval_n) == ((5, 32) if moe else (10, 32))
        assert (recipe.trainer.eval_temperature, recipe.trainer.eval_top_p) == (0.7, 0.95)
        assert recipe.data.enable_thinking is (True if moe else None) and recipe.rollout.r3 is False


def test_overrides_reach_nested_keys_and_parse_yaml_values():
    recipe = load_recipe(QUICKSTART, ["loss.mode=grpo", "rollout.r3=false", "optim.lr=1e-5", "trainer.steps=7"])
    assert (recipe.loss.mode, recipe.rollout.r3, recipe.optim.lr, recipe.trainer.steps) == ("grpo", False, 1e-5, 7)


def test_defaults_chain_merges_mappings_and_later_files_win(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nrollout: {n: 4, temperature: 0.7}\n")
    (tmp_path / "b.yaml").write_text("defaults: a.yaml\nrollout: {n: 6}\n")
    (tmp_path / "c.yaml").write_text(f"defaults: [{QUICKSTART}, b.yaml]\nname: c\n")
    recipe = load_recipe(tmp_path / "c.yaml")
    assert recipe.name == "c" and recipe.rollout.n == 6 and recipe.rollout.temperature == 0.7
    assert recipe.rollout.engine == "embedded"  # from the quickstart, untouched by a/b


def test_defaults_loop_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: b.yaml\n")
    (tmp_path / "b.yaml").write_text("defaults: a.yaml\n")
    with pytest.raises(RecipeError, match="inheritance loop"):
        load_recipe(tmp_path / "a.yaml")


# One bad recipe per rule: (overrides on the quickstart, what the message must say).
INVALID = {
    "unknown key": (["loss.mod=grpo"], "loss.mod: unknown key; loss accepts mode, low"),
    "unknown section": (["trainr.steps=3"], "trainr: unknown key"),
    "wrong type": (["trainer.steps=many"], "trainer.steps: expected an integer"),
    "bool type": (["rollout.r3=maybe"], "rollout.r3: expected true or false"),
    "choice": (["loss.mode=ppo"], "loss.mode: 'ppo' is not allowed; choose one of dppo_binary_tv"),
    "aggregation choice": (["loss.aggregation=sum"], "loss.aggregation: 'sum' is not allowed"),
    "engine choice": (["rollout.engine=vllm"], "rollout.engine: 'vllm' is not allowed; choose one of sglang, embedded"),
    "null": (["trainer.steps=null"], "trainer.steps: must not be null"),
    "positive": (["trainer.steps=0"], "trainer.steps: must be >= 1"),
    "group size": (["rollout.n=1"], "rollout.n: group advantages need at least 2"),
    "lr": (["optim.lr=0"], "optim.lr: must be > 0"),
    "temperature": (["rollout.temperature=0"], "rollout.temperature: must be > 0"),
    "top_p": (["rollout.top_p=1.5"], "rollout.top_p: must be in (0, 1]"),
    "thresholds": (["loss.low=0"], "loss.low/loss.high: thresholds must be > 0"),
    "ratio cap": (["loss.ratio_cap=0.5"], "loss.ratio_cap: null or >= 1"),
    "PG-TIS needs its cap": (["loss.mode=pg_tis"], "loss.mode pg_tis truncates the importance weight: set loss.ratio_cap"),
    "relax needs its threshold": (["loss.mode=grpo_relax_high"],
                                  "loss.mode grpo_relax_high: loss.relax_below must be a rollout probability in (0, 1]"),
    "relax threshold elsewhere": (["loss.relax_below=0.1"], "loss.relax_below: only the grpo_relax_* modes use it"),
    "top-K needs K": (["loss.mode=dppo_topk_kl", "rollout.topk_logprobs=0"], "rollout.topk_logprobs must be >= 1"),
    "K within the vocabulary": (["loss.mode=dppo_topk_kl", "rollout.topk_logprobs=20"],
                                "rollout.topk_logprobs: 20 is more than the vocabulary (15 tokens)"),
    "model source": (["model.path=/models/x"], "model: give exactly one of model.path"),
    "r3 on dense": (["model.random_init.architecture=qwen3"], "rollout.r3: routing replay needs a MoE model"),
    "layout": (["learner.ep=4"], "learner: world size 2 is not a multiple of etp*ep*pp = 1*4*1"),
    "tp divides heads": (["learner.ep=1", "learner.tp=2", "model.random_init.num_key_value_heads=1"],
                         "learner: num_key_value_heads (query groups) 1 is not divisible by tp 2"),
    "mini-batches split": (["trainer.mini_batches=3"], "trainer.mini_batches: 256 responses per step"),
    "mini-batch feeds DP": (["trainer.prompts_per_step=1", "rollout.n=2", "trainer.mini_batches=2"],
                            "cannot feed 2 data-parallel ranks"),
    "toy data needs toy reward": (["reward.kind=math"], "reward.kind: data.generate.task reverse_digits"),
    "eval needs data": (["data.generate=null", "data.train=x.jsonl", "reward.kind=math"],
                        "trainer.eval_every: evaluation needs held-out prompts"),
    "overlong buffer": (["reward.overlong=penalty"], "reward.overlong_buffer: the penalty needs"),
    "sglang GPUs": (["rollout.engine=sglang", "rollout.servers=4", "rollout.server_tp=8", "rollout.nodes=1"],
                    "rollout.servers: 4 servers of 8 GPUs (server_tp x server_dp) do not fit rollout.nodes 1 x "
                    "rollout.gpus_per_node 8: room for 1"),
    # 15 GPUs of 16, but the third server of a node would straddle two nodes.
    "no server across nodes": (["rollout.engine=sglang", "rollout.servers=5", "rollout.server_tp=3", "rollout.nodes=2"],
                               "rollout.servers: 5 servers of 3 GPUs (server_tp x server_dp) do not fit rollout.nodes 2"),
    "shared-node GPUs": (["rollout.engine=sglang", "rollout.servers=3", "rollout.gpus_per_node=2"],
                         "room for 2"),
    "distributed sync into data-parallel replicas": (["rollout.engine=sglang", "rollout.weight_sync=distributed",
                                                      "rollout.server_dp=2"],
                                                     "rollout.server_dp: SGLang takes no distributed weight"),
    "dense layers in a MoE model on SGLang": (["rollout.engine=sglang", "model.random_init.mlp_only_layers=[1]"],
                                              "model: layers [1] of this Qwen3-MoE model have a dense MLP"),
    "sglang interpreter for the embedded engine": (["rollout.sglang_python=/opt/sglang/bin/python"],
                                                   "rollout.sglang_python: only SGLang servers use it"),
    "reward function form": (["reward.kind=python", "reward.function=myrewards.score"],
                             "reward.function: reward.kind python needs 'module:function', got 'myrewards.score'"),
    "reward url": (["reward.kind=http", "reward.url=localhost:8000"], "reward.url: reward.kind http needs an http(s)"),
    "reward workers": (["reward.workers=-1"], "reward.workers: 0 (one per core) or a count, got -1"),
    "staleness": (["trainer.max_staleness=-1"], "trainer.max_staleness: 0 (synchronous) or more steps, got -1"),
    "slurm time": (["slurm.time=soon"], "slurm.time: 'soon' is not a SLURM time limit"),
    "slurm env": (["slurm.env={1BAD: x}"], "slurm.env.1BAD: not a valid environment variable name"),
    "slurm env values": (["slurm.env=[NCCL_DEBUG]"], "slurm.env: expected a mapping, got list"),
}


@pytest.mark.parametrize("rule", sorted(INVALID))
def test_invalid_recipe_is_refused_naming_the_key(rule):
    overrides, message = INVALID[rule]
    with pytest.raises(RecipeError) as caught:
        load_recipe(QUICKSTART, overrides)
    assert message in str(caught.value), str(caught.value)


def test_a_wandb_project_without_wandb_installed_is_refused(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(RecipeError, match="trainer.wandb_project: 'rl' is set but wandb is not installed"):
        load_recipe(QUICKSTART, ["trainer.wandb_project=rl"])


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "dppo_megatron", "train", str(QUICKSTART), "--run-dir",
                                 str(tmp_path / "run"), f"rollout.base_port={port}"], capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 2 and f"rollout.base_port: port {port} is in use" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_every_problem_is_reported_at_once():
    with pytest.raises(RecipeError) as caught:
        load_recipe(QUICKSTART, ["rollout.r3=maybe", "trainer.steps=x"])
    assert len(caught.value.problems) == 2


def test_train_refuses_an_invalid_recipe_before_starting_anything(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "dppo_megatron", "train", str(QUICKSTART), "--run-dir",
                             str(run_dir), "loss.mode=ppo", "rollout.n=1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "loss.mode: 'ppo' is not allowed" in result.stderr
    assert not run_dir.exists()


def test_train_refuses_missing_dataset_files(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dppo_megatron", "train", str(QUICKSTART), "--run-dir",
                             str(tmp_path / "run"), "data.generate=null", "reward.kind=math", "trainer.eval_every=0",
                             f"data.train={tmp_path / 'missing.jsonl'}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "data.train: no such file" in result.stderr


# One broken dataset per fault: (file name, content, what the message must say).
BROKEN_DATASETS = {
    "malformed line": ("bad.jsonl", '{"prompt": "a", "answer": "1"}\n{"prompt": "b" "answer": "2"}\n',
                       "bad.jsonl:2: not valid JSON (Expecting ',' delimiter at column 16)"),
    "empty file": ("empty.jsonl", "", "empty.jsonl: no rows"),
    "missing key": ("keys.jsonl", '{"prompt": "a", "answer": "1"}\n{"question": "b", "answer": "2"}\n',
                    "keys.jsonl:2: no field 'prompt' (has: answer, question)"),
    "wrong type": ("types.jsonl", '{"prompt": "a", "answer": ["1"]}\n', "types.jsonl:1: 'answer' must be a string"),
    "not an object": ("list.jsonl", '["a", "1"]\n', "list.jsonl:1: expected a JSON object, got list"),
    "fake parquet": ("fake.parquet", "not parquet at all", "fake.parquet: not a Parquet file pyarrow can read"),
}


@pytest.mark.parametrize("fault", sorted(BROKEN_DATASETS))
def test_a_broken_dataset_is_refused_with_its_file_and_line_before_anything_starts(tmp_path, fault):
    name, content, message = BROKEN_DATASETS[fault]
    (tmp_path / name).write_text(content)
    data = ["data.generate=null", "reward.kind=math", "trainer.eval_every=0", f"data.train={tmp_path / name}"]
    with pytest.raises(RecipeError) as caught:
        load_recipe(QUICKSTART, data)
    assert f"data.train: {tmp_path / name}" in str(caught.value) and message in str(caught.value), str(caught.value)


def test_validate_and_train_refuse_a_broken_dataset_and_leave_no_run_directory(tmp_path):
    (tmp_path / "eval.jsonl").write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": 2.5}\n{oops\n')
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "answer": "1"}\n')
    data = ["data.generate=null", "reward.kind=math", f"data.train={tmp_path / 'train.jsonl'}",
            f"data.eval={tmp_path / 'eval.jsonl'}"]
    for command in (["validate", str(QUICKSTART)], ["train", str(QUICKSTART), "--run-dir", str(tmp_path / "run")]):
        result = subprocess.run([sys.executable, "-m", "dppo_megatron", *command, *data], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"data.eval: {tmp_path / 'eval.jsonl'}:3: not valid JSON" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_recipe_asking_for_more_positions_than_the_model_has_is_refused():
    with pytest.raises(RecipeError, match="data.max_prompt_len 16 \\+ rollout.max_new_tokens 1000 exceed the "
                                          "model's 512 positions"):
        load_recipe(QUICKSTART, ["rollout.max_new_tokens=1000"])


def test_memory_estimate_and_rank_grid_for_the_30b_recipe():
    recipe = load_recipe(RECIPES / "qwen3-30b-a3b" / "dppo-binary-tv.yaml")
    arch = recipe_arch(recipe)
    dense, experts = parameter_counts(arch)
    assert 30.0e9 < dense + experts < 31.0e9 and 28.5e9 < experts < 29.5e9  # Qwen3-30B-A3B: 30.5B
    estimate = memory_estimate(recipe, arch)
    # 16 ranks, TP 2 / EP 8, bf16: weights 2 bytes per local parameter, fp32 gradients 4.
    local = dense / 2 + experts / 8
    assert estimate.weights == pytest.approx(local * 2) and estimate.grads == pytest.approx(local * 4)
    rows = rank_coordinates(recipe)
    assert len(rows) == 16 and rows[3] == dict(rank=3, node=0, tp=1, dp=1, pp=0, ep=3, edp=0)
    assert rows[9]["node"] == 1 and rows[9]["edp"] == 1


def test_sglang_command_line_from_the_30b_recipe_with_r3_on(tmp_path):
    """One switch, rollout.r3, turns on routes on the server, in the requests and in the learner."""
    from dppo_megatron.rollout.servers import server_command
    from dppo_megatron.run.configs import learner_configs
    from dppo_megatron.run.placement import server_specs

    recipe = load_recipe(RECIPES / "qwen3-30b-a3b" / "dppo-binary-tv.yaml", ["rollout.r3=true"])
    specs = server_specs(recipe, tmp_path)
    assert len(specs) == 4 and [s.port for s in specs] == [30000, 30001, 30002, 30003]
    assert [s.gpus for s in specs] == [(0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 2, 3), (4, 5, 6, 7)]
    assert server_command(specs[1]) == [
        sys.executable, "-m", "sglang.launch_server", "--model-path", "Qwen/Qwen3-30B-A3B-Base",
        "--host", "0.0.0.0", "--port", "30001", "--tp-size", "4", "--dp-size", "1", "--ep-size", "1",
        "--mem-fraction-static", "0.8", "--skip-tokenizer-init", "--weight-version", "0",
        "--enable-return-routed-experts", "--config", str((tmp_path / "keys.yaml").resolve()),  # the keys, by file
    ]
    options, _, loss = learner_configs(recipe)
    assert options.routing_replay is True and loss.temperature == recipe.rollout.temperature
    off = load_recipe(RECIPES / "qwen3-30b-a3b" / "dppo-binary-tv.yaml")
    assert "--enable-return-routed-experts" not in server_command(server_specs(off, tmp_path)[0])
    assert learner_configs(off)[0].routing_replay is False


def test_recipe_reference_in_docs_is_generated_from_the_schema():
    from dppo_megatron.config.reference import reference

    docs = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
    assert docs.read_text() == reference(), "regenerate: dppo-megatron recipe-reference > docs/recipes.md"


# --- colocated servers (rollout.colocate) --------------------------------------------------------

QWEN3_30B = RECIPES / "qwen3-30b-a3b" / "dppo-binary-tv.yaml"
COLOCATED_30B = RECIPES / "qwen3-30b-a3b" / "dppo-binary-tv-colocated.yaml"
# The 30B recipe with its 4 servers of TP 4 on the learner's 2 x 8 GPUs.
COLOCATE = ["rollout.colocate=true", "rollout.nodes=0", "rollout.gpus_per_node=0", "rollout.weight_sync=tensor"]

# One bad colocated recipe per rule: (overrides on the colocated 30B recipe, what the message must say).
COLOCATED_INVALID = {
    "no asynchronous rollouts": (["trainer.max_staleness=1"],
                                 "trainer.max_staleness: 1 with rollout.colocate: asynchronous rollouts generate while "
                                 "the learner trains, and colocated servers and the learner take turns on the same GPUs"),
    "servers on the learner nodes": (["rollout.nodes=2"], "rollout.nodes: colocated servers run on the learner nodes; "
                                                          "set 0, got 2"),
    "no NCCL broadcast into one's own GPU": (["rollout.weight_sync=distributed"],
                                             "rollout.weight_sync: distributed with rollout.colocate: NCCL refuses two "
                                             "ranks of one communicator on one GPU"),
    "servers tile a node": (["rollout.server_tp=3", "rollout.servers=5"],
                            "rollout.server_tp x server_dp: servers of 3 GPUs do not tile a learner node's 8 GPUs"),
    "servers cover the learner's GPUs": (["rollout.servers=3"],
                                         "rollout.servers: 3, but colocated servers of 4 GPUs (server_tp x server_dp) "
                                         "cover learner.nodes 2 x learner.ranks_per_node 8 GPUs with 4"),
    "servers cover every node": (["rollout.server_tp=8", "rollout.servers=1"],
                                 "rollout.servers: 1, but colocated servers of 8 GPUs"),
    "no tensor updates into replicas": (["rollout.server_dp=2", "rollout.servers=2"],
                                        "rollout.server_dp: SGLang takes no tensor weight updates into a server with "
                                        "data-parallel replicas (server_dp 2)"),
}


@pytest.mark.parametrize("rule", sorted(COLOCATED_INVALID))
def test_a_colocated_recipe_breaking_a_rule_is_refused_naming_the_field(rule):
    overrides, message = COLOCATED_INVALID[rule]
    with pytest.raises(RecipeError) as caught:
        load_recipe(QWEN3_30B, COLOCATE + overrides)
    assert message in str(caught.value), str(caught.value)


def test_tensor_weight_sync_is_refused_without_colocated_servers():
    for recipe in (QWEN3_30B, QUICKSTART):
        with pytest.raises(RecipeError, match="rollout.weight_sync: tensor hands the servers CUDA IPC / shared-memory "
                                              "handles, .* it needs rollout.colocate true"):
            load_recipe(recipe, ["rollout.weight_sync=tensor"])


def test_colocated_sglang_servers_take_the_learner_gpus_from_gpu_0_and_ignore_rollout_gpus_per_node():
    from dppo_megatron.config.placement import server_placements

    for gpus_per_node in (0, 8):
        recipe = load_recipe(QWEN3_30B, COLOCATE + [f"rollout.gpus_per_node={gpus_per_node}"])
        assert [(p.node, p.gpus, p.port) for p in server_placements(recipe)] == [
            (0, (0, 1, 2, 3), 30000), (0, (4, 5, 6, 7), 30001), (1, (0, 1, 2, 3), 30002), (1, (4, 5, 6, 7), 30003)]
    eight = load_recipe(QWEN3_30B, COLOCATE + ["rollout.server_tp=8", "rollout.servers=2"])
    assert [(p.node, p.gpus) for p in server_placements(eight)] == [(0, tuple(range(8))), (1, tuple(range(8)))]
    with pytest.raises(RecipeError, match="rollout.gpus_per_node: must be >= 1, got 0"):  # still counted when not colocated
        load_recipe(QWEN3_30B, ["rollout.gpus_per_node=0"])


def test_a_colocated_embedded_engine_stays_a_cpu_process_on_the_first_node():
    from dppo_megatron.config.placement import server_placements

    recipe = load_recipe(QUICKSTART, ["rollout.colocate=true", "rollout.weight_sync=tensor", "rollout.servers=2"])
    assert [(p.node, p.gpus) for p in server_placements(recipe)] == [(0, ()), (0, ())]


# --- the colocated memory plan ---------------------------------------------------------------------

GIB = 1024**3
# The quickstart's MoE on 4 ranks (TP 2, EP 2) in bf16, with 2 colocated SGLang servers of TP 2
# on a GPU of 16 GiB: small enough to count every parameter by hand.
SMALL_COLOCATED = ["model.dtype=bfloat16", "model.random_init.moe_intermediate_size=32", "learner.ranks_per_node=4",
                   "learner.tp=2", "learner.ep=2", "learner.micro_batch_size=2", "learner.recompute=false",
                   "learner.token_stats_memory_mib=1", "learner.gpu_memory_gib=16", "rollout.engine=sglang",
                   "rollout.dtype=auto", "rollout.colocate=true", "rollout.weight_sync=tensor", "rollout.servers=2",
                   "rollout.server_tp=2", "rollout.mem_fraction=0.25", "rollout.max_new_tokens=48",
                   "data.max_prompt_len=16"]


def small_colocated_by_hand(*, recompute: bool) -> dict[str, float]:
    """The plan of SMALL_COLOCATED, in bytes, from the model's dimensions: hidden 64, 2 layers,
    4 query and 2 KV heads of 16, 4 experts of width 32 with 2 per token, the toy vocabulary of
    15 padded to 1024, untied embeddings."""
    h, layers, vocab = 64, 2, 1024
    attention = h * 16 * (2 * 4 + 2 * 2) + 2 * h + 2 * 16  # q, k, v, o; the two norms, q_norm, k_norm
    router = h * 4
    dense = 2 * vocab * h + h + layers * (attention + router)  # embeddings, output layer, final norm
    experts = layers * 4 * 3 * h * 32  # gate, up, down of each expert
    assert (dense, experts) == (156544, 49152)
    dense_local, expert_local = dense / 2, experts / 2  # TP 2 for the dense part, EP 2 (ETP 1) for experts
    weights = (dense_local + expert_local) * 2  # bf16
    grads = (dense_local + expert_local) * 4  # fp32 gradient buffers, whole on every rank
    # Adam moments and fp32 master weights, sharded over DP 4 / TP 2 = 2 and expert-DP 4 / EP 2 = 2.
    optimizer = 12 * (dense_local / 2 + expert_local / 2)
    tokens = 2 * (16 + 48) / 2  # micro-batch of 2 sequences of 64 tokens, split over TP 2 (sequence parallel)
    attention_kept = 2 * h + (2 * 4 + 2 * 2) * 16  # input, normed input; q, k, v, attention output
    moe_kept = 2 * h + 2 * (h + 3 * 32)  # input, normed input; each of 2 routed copies: input, gate, up, act
    kept = layers * h + attention_kept + moe_kept if recompute else layers * (attention_kept + moe_kept)
    activations = tokens * kept * 2
    logits = 2 * (2 * 64 * vocab / 2 * 2) + 1024**2  # logits [128, 1024 / TP 2] bf16 and their gradient; 1 MiB
    sglang_weights = (dense + experts) * 2 / 2  # bf16 over server TP 2
    kv_cache = 0.25 * 16 * GIB - sglang_weights  # mem_fraction of the GPU, less the weights
    return {"learner weights": weights, "learner gradients": grads, "learner optimizer state": optimizer,
            "learner activations": activations, "learner logits": logits, "learner CUDA context": 1 * GIB,
            "SGLang weights": sglang_weights, "SGLang KV cache": kv_cache,
            "kv tokens": kv_cache // (layers * 2 * 1 * 16 * 2)}  # one KV head per GPU, K and V, bf16


@pytest.mark.parametrize("recompute", [False, True])
def test_the_memory_plan_of_a_small_colocated_moe_matches_the_hand_count(recompute):
    from dppo_megatron.config.memory_plan import memory_plan

    recipe = load_recipe(QUICKSTART, SMALL_COLOCATED + [f"learner.recompute={str(recompute).lower()}"])
    plan = memory_plan(recipe, recipe_arch(recipe))
    expected = small_colocated_by_hand(recompute=recompute)
    assert plan.kv_tokens == expected.pop("kv tokens")
    resident = {"generating": ["learner weights", "learner CUDA context", "SGLang weights", "SGLang KV cache"],
                "training": ["learner weights", "learner gradients", "learner optimizer state", "learner activations",
                             "learner logits", "learner CUDA context"]}
    for phase, names in resident.items():
        for name, value in expected.items():
            assert plan.item(name).bytes_in(phase) == pytest.approx(value if name in names else 0), (phase, name)
    # SGLang's runtime: CUDA context, graphs and the decode's activations; released, what the memory saver keeps.
    assert (plan.item("SGLang runtime").generating, plan.item("SGLang runtime").training) == (3 * GIB, 1 * GIB)
    assert plan.total("generating") == pytest.approx(sum(expected[n] for n in resident["generating"]) + 3 * GIB)
    assert plan.total("training") == pytest.approx(sum(expected[n] for n in resident["training"]) + 1 * GIB)

    kept = memory_plan(load_recipe(QUICKSTART, SMALL_COLOCATED + ["learner.offload_while_generating=false"]),
                       recipe_arch(recipe))
    assert kept.item("learner optimizer state").generating == pytest.approx(expected["learner optimizer state"])
    assert kept.item("learner gradients").generating == pytest.approx(expected["learner gradients"])


def test_the_colocated_30b_recipes_memory_plan_fits_80gb_gpus_and_validate_prints_it(capsys):
    from dppo_megatron.commands.cli import main
    from dppo_megatron.config.memory_plan import memory_plan

    recipe = load_recipe(COLOCATED_30B)
    plan = memory_plan(recipe, recipe_arch(recipe))
    assert plan.peak_phase == "generating" and plan.total("generating") <= 80 * GIB
    assert plan.total("training") <= 80 * GIB and plan.kv_tokens >= 100 * 10240  # a hundred whole sequences
    assert main(["validate", str(COLOCATED_30B)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("# memory plan per GPU"):].splitlines()
    assert table[1].split() == ["item", "generating", "training", "set", "by"]
    assert table[4].startswith("learner optimizer state") and table[4].split()[3:5] == ["-", "21.33"]
    assert "peak: generating, 68.19 of 80.00 GiB: fits" in out


@pytest.mark.parametrize("overrides, message", [
    (["learner.offload_while_generating=false"],
     "rollout.mem_fraction: the memory plan's generating phase takes 105.9 GiB per GPU, more than the GPU's 80 GiB "
     "(learner.gpu_memory_gib); its largest item is SGLang KV cache, 41.8 GiB"),
    (["rollout.mem_fraction=0.9"], "the memory plan's generating phase takes 84.2 GiB per GPU"),
    (["learner.recompute=false", "learner.micro_batch_size=8"],
     "learner.micro_batch_size: the memory plan's training phase takes 262.7 GiB per GPU, more than the GPU's 80 GiB "
     "(learner.gpu_memory_gib); its largest item is learner activations, 191.2 GiB"),
    (["learner.gpu_memory_gib=40"],  # an H100 80GB's half: now training is the peak
     "learner.distributed_optimizer: the memory plan's training phase takes 52.5 GiB per GPU, more than the GPU's "
     "40 GiB (learner.gpu_memory_gib); its largest item is learner optimizer state, 21.3 GiB"),
    (["rollout.mem_fraction=0.18"], "rollout.mem_fraction: SGLang's KV cache gets 0.18 GiB, room for 7914 tokens, "
                                    "less than one sequence of 10240"),
])
def test_a_colocated_plan_that_does_not_fit_is_refused_naming_its_phase_and_largest_item(overrides, message):
    with pytest.raises(RecipeError) as caught:
        load_recipe(COLOCATED_30B, overrides)
    assert message in str(caught.value), str(caught.value)


def test_train_and_submit_refuse_a_colocated_plan_that_does_not_fit_before_anything_starts(tmp_path):
    import json

    from dppo_megatron.model.known import KNOWN_CONFIGS

    model = tmp_path / "Qwen3-30B-A3B-Base"  # a local checkpoint, as train and submit want one
    model.mkdir()
    (model / "config.json").write_text(json.dumps(KNOWN_CONFIGS["Qwen/Qwen3-30B-A3B-Base"]))
    overrides = [f"model.path={model}", "learner.offload_while_generating=false"]
    for command in ("train", "submit"):
        result = subprocess.run([sys.executable, "-m", "dppo_megatron", command, str(COLOCATED_30B), *overrides,
                                 "--run-dir", str(tmp_path / command)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "rollout.mem_fraction: the memory plan's generating phase takes 105.9 GiB per GPU" in result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / command).exists()


def test_the_memory_plan_in_docs_colocation_is_what_validate_prints(capsys):
    from dppo_megatron.commands.cli import main

    docs = (Path(__file__).resolve().parents[1] / "docs" / "colocation.md").read_text()
    section = docs[docs.index("## The memory plan"):]
    documented = section[section.index("# memory plan per GPU"):].split("```")[0].strip()
    assert main(["validate", str(COLOCATED_30B)]) == 0
    out = capsys.readouterr().out
    assert documented == out[out.index("# memory plan per GPU"):].split("\n\n")[0].strip()
    assert main(["validate", str(COLOCATED_30B), "learner.offload_while_generating=false"]) == 2
    refusal = capsys.readouterr().err.splitlines()[-1]
    assert refusal in section
