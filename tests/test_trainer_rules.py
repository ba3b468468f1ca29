"""The trainer's rules, each against numbers worked out by hand here: which samples are trained
(dynamic sampling, overlong responses), the overlong penalty, evaluation scores (avg@k, pass@k),
when checkpoints and exports are written and which are deleted, the learning-rate schedule the
recipe asks for, the STOP file, and the masked-token counts a checkpoint carries."""

import math
from pathlib import Path

import pytest
import torch

from dppo_megatron.config.validate import load_recipe
from dppo_megatron.rewards import overlong_penalty
from dppo_megatron.data.toy import build_toy_tokenizer, toy_vocab_size
from dppo_megatron.run.checkpoints import due_after, superseded
from dppo_megatron.run.masked_tokens import MaskedTokens
from dppo_megatron.run.rollouts import eval_scores, trained_samples

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "quickstart.yaml"
# Importing Megatron's scheduler says that it falls back to torch on a CPU, and repeats torch's
# and its own deprecation notices: expected here, not this test's subject.
pytestmark = [pytest.mark.filterwarnings("ignore:Transformer Engine and Apex are not installed"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_dynamic_sampling_drops_the_groups_whose_rewards_all_agree():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.2])  # groups of 2: equal, mixed, equal, mixed
    truncated = torch.zeros(8, dtype=torch.bool)
    kept = trained_samples(rewards, truncated, 2, dynamic_sampling=True, drop_truncated=False)
    assert kept.tolist() == [False, False, True, True, False, False, True, True]
    everything = trained_samples(rewards, truncated, 2, dynamic_sampling=False, drop_truncated=False)
    assert everything.all()


def test_overlong_drop_leaves_out_the_responses_cut_at_max_new_tokens():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    truncated = torch.tensor([False, True, False, True])
    kept = trained_samples(rewards, truncated, 2, dynamic_sampling=False, drop_truncated=True)
    assert kept.tolist() == [True, False, True, False]
    # Both rules: group 0 is mixed (its truncated response dropped), group 1 too.
    both = trained_samples(rewards, truncated, 2, dynamic_sampling=True, drop_truncated=True)
    assert both.tolist() == [True, False, True, False]


@pytest.mark.parametrize("length, expected", [(50, 0.0), (80, 0.0), (85, -0.25), (90, -0.5), (100, -1.0)])
def test_overlong_penalty_ramps_from_zero_to_minus_the_factor_over_the_buffer(length, expected):
    """DAPO: 0 up to max_new_tokens - buffer (here 100 - 20), then linear to -penalty at 100."""
    assert overlong_penalty(length, 100, 20, 1.0) == pytest.approx(expected)


def test_eval_scores_mean_avg_at_k_and_pass_at_k():
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.5], [0.0, 0.5, 0.0]])
    scores = eval_scores(rewards)
    assert scores["eval/mean_reward"] == pytest.approx(4.0 / 12)
    assert scores["eval/avg@3"] == pytest.approx((1 / 3 + 0 + 2.5 / 3 + 0.5 / 3) / 4)
    assert scores["eval/pass@3"] == pytest.approx(2 / 4)  # a 0.5 is not a pass


def test_checkpoints_come_every_save_every_steps_on_a_stop_and_at_the_end_exports_every_export_every():
    due = {done: due_after(done, 12, save_every=5, export_every=4, stop=(done == 7)) for done in range(1, 13)}
    assert [d for d, (save, _) in due.items() if save] == [5, 7, 10, 12]
    assert [d for d, (_, export) in due.items() if export] == [4, 8, 12]
    never = [due_after(d, 12, save_every=0, export_every=0, stop=False) for d in range(1, 12)]
    assert not any(save or export for save, export in never)
    assert due_after(12, 12, save_every=0, export_every=0, stop=False) == (True, False)
    assert due_after(12, 12, save_every=0, export_every=0, stop=False, save_at_end=False) == (False, False)
    assert due_after(7, 12, save_every=0, export_every=0, stop=True, save_at_end=False) == (True, False)


def test_only_the_newest_keep_checkpoints_survive_and_a_partial_one_is_left_alone(tmp_path):
    for step in (5, 10, 15):
        (tmp_path / f"step_{step:08d}").mkdir()
    (tmp_path / "step_00000020.partial").mkdir()  # another writer's, half done
    newest = tmp_path / "step_00000020"
    newest.mkdir()
    assert [p.name for p in superseded(tmp_path, newest, keep=2)] == ["step_00000005", "step_00000010"]
    assert [p.name for p in superseded(tmp_path, newest, keep=3)] == ["step_00000005"]
    assert superseded(tmp_path, newest, keep=4) == []


def test_the_recipes_warm_up_and_cosine_decay_reach_the_optimizer_step_by_step():
    """optim.warmup_steps 3, cosine decay to min_lr over the whole run (steps x mini_batches
    optimizer steps), against the formulas: lr = lr_max * s / W in the warm-up, then
    min + (max - min) * (1 + cos(pi * (s - W) / (D - W))) / 2."""
    from dppo_megatron.learner.learner import lr_scheduler
    from dppo_megatron.run.configs import learner_configs

    recipe = load_recipe(QUICKSTART, ["optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=3",
                                      "optim.decay_style=cosine", "trainer.steps=5", "trainer.mini_batches=2"])
    _, config, _ = learner_configs(recipe)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = lr_scheduler(optimizer, config)
    seen = []
    for _ in range(10):  # 5 steps x 2 mini-batches
        seen.append(optimizer.param_groups[0]["lr"])
        scheduler.step(1)
    seen.append(optimizer.param_groups[0]["lr"])
    warmup, decay, top, bottom = 3, 10, 1.0, 0.1
    expected = [top * s / warmup if s <= warmup else
                bottom + (top - bottom) * (1 + math.cos(math.pi * (s - warmup) / (decay - warmup))) / 2
                for s in range(11)]
    assert seen == pytest.approx(expected)
    constant = load_recipe(QUICKSTART, ["optim.lr=0.5"])
    _, config, _ = learner_configs(constant)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = lr_scheduler(optimizer, config)
    for _ in range(5):
        scheduler.step(1)
        assert optimizer.param_groups[0]["lr"] == 0.5


def test_a_stop_file_is_agreed_by_every_rank_and_cleared(tmp_path):
    import torch.distributed as dist

    from dppo_megatron.processes import free_port
    from dppo_megatron.run.stop import StopRequest

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        stop = StopRequest(tmp_path / "STOP", dist.group.WORLD)
        assert not stop.agreed()
        (tmp_path / "STOP").touch()
        assert stop.agreed()
        stop.clear()
        assert not (tmp_path / "STOP").exists() and not stop.agreed()
    finally:
        dist.destroy_process_group()
        import signal

        for sig in (signal.SIGTERM, signal.SIGUSR1):  # StopRequest caught them for this process
            signal.signal(sig, signal.SIG_DFL)


def test_masked_token_counts_survive_a_checkpoint_and_list_the_most_frequent_with_their_text(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    build_toy_tokenizer(tokenizer)
    vocab = toy_vocab_size()
    from transformers import AutoTokenizer

    seven = AutoTokenizer.from_pretrained(tokenizer).convert_tokens_to_ids("7")
    counts = torch.zeros(2, vocab, dtype=torch.float64)
    counts[0, seven], counts[0, 3], counts[1, seven] = 6, 2, 1
    before = MaskedTokens(vocab, str(tokenizer), top=5)
    before.add(counts)
    before.save(tmp_path)
    after = MaskedTokens(vocab, str(tokenizer), top=5)
    after.load(tmp_path)
    after.add(counts)  # a resumed run goes on counting
    summary = after.summary()
    assert summary["A>0 masked"] == 16 and summary["A<0 masked"] == 2
    assert [(row["id"], row["token"], row["count"]) for row in summary["A>0"]][0] == (seven, "7", 12)
    assert summary["A>0"][0]["share"] == pytest.approx(12 / 16) and len(summary["A>0"]) == 2
    after.write(tmp_path)
    assert (tmp_path / "masked_tokens.json").read_text().count('"token": "7"') == 2
    # A checkpoint from before the counts were kept: counting starts from zero.
    fresh = MaskedTokens(vocab, str(tokenizer))
    fresh.load(tmp_path / "nothing-here")
    assert fresh.counts.sum() == 0


def test_evaluation_samples_at_its_own_temperature_and_top_p_when_the_recipe_sets_them():
    from dppo_megatron.config.loading import RecipeError
    from dppo_megatron.rollout.protocol import SamplingParams
    from dppo_megatron.run.configs import eval_sampling_params

    train = SamplingParams(max_new_tokens=9, temperature=1.0, top_p=1.0, top_k=-1, stop_token_ids=(1,))
    same = eval_sampling_params(load_recipe(QUICKSTART), train)
    assert same == train
    paper = eval_sampling_params(load_recipe(QUICKSTART, ["trainer.eval_temperature=0.7", "trainer.eval_top_p=0.95"]),
                                 train)
    assert (paper.temperature, paper.top_p, paper.max_new_tokens, paper.stop_token_ids) == (0.7, 0.95, 9, (1,))
    with pytest.raises(RecipeError, match="trainer.eval_top_p: must be in \\(0, 1\\], got 1.5"):
        load_recipe(QUICKSTART, ["trainer.eval_top_p=1.5"])
