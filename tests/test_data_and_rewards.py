"""Prompt datasets, their order over steps, and the rewards."""

import json

import pytest

from dppo_megatron.data.prompts import DatasetError, PromptOrder, encode_prompt, load_prompts, read_rows
from dppo_megatron.data.toy import build_toy_tokenizer, reverse_digits_rows, write_toy_dataset
from dppo_megatron.rewards import overlong_penalty, reward_function


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_toy_tokenizer(tmp_path_factory.mktemp("tok"))


def test_bad_jsonl_row_names_its_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "reverse 1 2 :", "answer": "2 1"}\n\n{"prompt": "reverse 3 :", "answer": \n')
    with pytest.raises(DatasetError, match=rf"{path}:3: not valid JSON"):
        load_prompts(path, tokenizer, prompt_key="prompt", answer_key="answer", chat_template=True, max_prompt_len=64)


def test_missing_field_names_the_line_and_the_fields_it_has(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n{"question": "a", "answer": "b"}\n')
    with pytest.raises(DatasetError, match=r"p.jsonl:2: no field 'prompt' \(has: answer, question\)"):
        read_rows(path, "prompt", "answer")


def test_dapo_math_layout_reads_as_is_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": "math_dapo", "prompt": [{"role": "user", "content": "What is 2+2?"}],
             "reward_model": {"ground_truth": "4", "style": "rule"}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dapo.parquet")
    ((where, prompt, answer),) = read_rows(tmp_path / "dapo.parquet", "prompt", "reward_model.ground_truth")
    assert where.endswith("dapo.parquet:row 1") and prompt[0]["content"] == "What is 2+2?" and answer == "4"


def test_chat_template_is_applied_when_the_tokenizer_has_one(tokenizer):
    plain = encode_prompt(tokenizer, "reverse 1 2 :", chat_template=True)  # toy tokenizer: no template
    assert tokenizer.decode(plain) == "reverse 1 2 :"
    tokenizer.chat_template = "{% for m in messages %}reverse {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} :{% endif %}"
    try:
        templated = encode_prompt(tokenizer, [{"role": "user", "content": "3 4"}], chat_template=True)
        assert tokenizer.decode(templated) == "reverse 3 4 :"
        assert encode_prompt(tokenizer, [{"role": "user", "content": "3 4"}], chat_template=False) == \
            tokenizer("3 4", add_special_tokens=False)["input_ids"]
    finally:
        tokenizer.chat_template = None


def test_the_thinking_switch_reaches_the_chat_template(tokenizer):
    """Like Qwen3's template: with enable_thinking false the generation prompt closes an empty
    thinking block (here the word 0); left out, the template's default (thinking) holds."""
    tokenizer.chat_template = ("{% for m in messages %}reverse {{ m['content'] }}{% endfor %}{% if add_generation_prompt %}"
                               " :{% if enable_thinking is defined and not enable_thinking %} 0{% endif %}{% endif %}")
    try:
        def text(**switch):
            return tokenizer.decode(encode_prompt(tokenizer, "3 4", chat_template=True, **switch))

        assert text() == text(enable_thinking=None) == text(enable_thinking=True) == "reverse 3 4 :"
        assert text(enable_thinking=False) == "reverse 3 4 : 0"
    finally:
        tokenizer.chat_template = None


def test_long_prompts_are_skipped_and_counted(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "reverse 1 :", "answer": "1"}) + "\n" +
                    json.dumps({"prompt": "reverse 1 2 3 4 5 6 :", "answer": "x"}) + "\n")
    prompts, skipped = load_prompts(path, tokenizer, prompt_key="prompt", answer_key="answer", chat_template=True,
                                    max_prompt_len=4)
    assert skipped == 1 and [p.answer for p in prompts] == ["1"]


def test_prompt_order_depends_only_on_the_step_and_covers_each_epoch():
    order = PromptOrder(10, 4, seed=3)
    first_epochs = [i for step in range(5) for i in order.batch(step)]
    assert sorted(first_epochs[:10]) == list(range(10)) and sorted(first_epochs[10:20]) == list(range(10))
    assert PromptOrder(10, 4, seed=3).batch(3) == order.batch(3)  # a resumed run: same prompts
    assert PromptOrder(10, 4, seed=4).batch(0) != order.batch(0)


def test_toy_dataset_is_reproducible_and_answers_are_reversed(tmp_path):
    train, held_out = write_toy_dataset(tmp_path, task="reverse_digits", digits=3, train_rows=5, eval_rows=2, seed=1)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert rows == reverse_digits_rows(5, 3, 2)
    for row in rows:
        assert row["prompt"].split()[1:-1] == row["answer"].split()[::-1]
    assert len(held_out.read_text().splitlines()) == 2


def test_reverse_digits_reward_gives_partial_credit_and_charges_extra_words():
    reward = reward_function("reverse_digits")
    assert reward("3 2 1", "3 2 1") == 1.0
    assert reward("3 0 1", "3 2 1") == pytest.approx(2 / 3)
    assert reward("3 2 1 1", "3 2 1") == pytest.approx(3 / 4)
    assert reward("", "3 2 1") == 0.0


def test_math_reward_checks_equivalence_of_the_boxed_answer():
    reward = reward_function("math", timeout=5)
    assert reward("so x = \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert reward("The answer is \\boxed{34}.", "34") == 1.0
    assert reward("The answer is \\boxed{35}.", "34") == 0.0
    assert reward("no answer at all", "34") == 0.0


def test_overlong_penalty_ramps_over_the_buffer():
    assert overlong_penalty(80, 100, 20, 1.0) == 0.0
    assert overlong_penalty(90, 100, 20, 1.0) == pytest.approx(-0.5)
    assert overlong_penalty(90, 100, 10, 1.0) == 0.0
    assert overlong_penalty(95, 100, 10, 1.0) == pytest.approx(-0.5)
    assert overlong_penalty(100, 100, 10, 2.0) == pytest.approx(-2.0)


def test_the_reward_reads_special_tokens_the_model_wrote_but_not_the_end_of_sequence(tokenizer):
    """A response padded with <unk> after a right answer has not answered cleanly."""
    from dppo_megatron.rewards.pool import response_text
    from dppo_megatron.rewards.toy import reverse_digits_reward

    ids = tokenizer("4 1 3", add_special_tokens=False)["input_ids"]
    ended = response_text(tokenizer, ids + [tokenizer.eos_token_id])
    padded = response_text(tokenizer, ids + [tokenizer.unk_token_id])
    assert ended == "4 1 3" and reverse_digits_reward(ended, "4 1 3") == 1.0
    assert padded == "4 1 3 <unk>" and reverse_digits_reward(padded, "4 1 3") == 0.75
    assert response_text(tokenizer, [tokenizer.eos_token_id] * 2) == "<eos>"  # only the last one ended it
