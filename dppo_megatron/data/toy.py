"""Toy tasks a tiny random model can learn by RL alone (shared/reference/toy-tasks.md): the
prompt is `reverse d1 d2 d3 :`, the answer the digits reversed. The tokenizer is word-level
and made locally, so nothing is downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

TOY_TOKENIZER = "toy-digits"
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
WORDS = ["reverse", ":"] + [str(d) for d in range(10)]


def toy_vocab_size() -> int:
    return len(SPECIAL_TOKENS) + len(WORDS)


def build_toy_tokenizer(directory: str | Path):
    """A Hugging Face fast tokenizer over the toy words, saved to `directory` and returned.
    <eos> has id 1, <pad> id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def reverse_digits_rows(count: int, digits: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        sequence = [str(rng.randrange(10)) for _ in range(digits)]
        rows.append({"prompt": "reverse " + " ".join(sequence) + " :", "answer": " ".join(reversed(sequence))})
    return rows


def write_toy_dataset(directory: str | Path, *, task: str, digits: int, train_rows: int, eval_rows: int,
                      seed: int) -> tuple[Path, Path]:
    """train.jsonl and eval.jsonl for `task` (eval rows drawn with another seed)."""
    if task != "reverse_digits":
        raise ValueError(f"unknown toy task {task!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, count, offset in (("train", train_rows, 0), ("eval", eval_rows, 1)):
        path = directory / f"{name}.jsonl"
        rows = reverse_digits_rows(count, digits, seed * 2 + offset)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(path)
    return paths[0], paths[1]
