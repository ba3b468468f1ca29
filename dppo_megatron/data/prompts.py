"""Prompt datasets: rows from JSONL or Parquet, tokenized with the tokenizer's chat template,
served in a seeded order that depends only on the step (so a resumed run sees the same
prompts)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    """A dataset that cannot be read; the message names the file and line (or row)."""


@dataclass(frozen=True)
class Prompt:
    index: int  # position in the dataset
    prompt_ids: list[int]
    answer: str
    where: str  # "file:line", for messages about this row


def read_rows(path: str | Path, prompt_key: str, answer_key: str) -> list[tuple[str, object, str]]:
    """(where, prompt, answer) of every row. A prompt is a string or a list of chat messages."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as error:  # noqa: BLE001 - pyarrow's errors have no common base worth naming
            raise DatasetError(f"{path}: not a Parquet file pyarrow can read ({type(error).__name__}: {error})") from None
        records = ((f"{path}:row {i + 1}", row) for i, row in enumerate(table.to_pylist()))
    elif path.suffix in (".jsonl", ".json"):
        records = _jsonl_records(path)
    else:
        raise DatasetError(f"{path}: unknown format {path.suffix!r}; use .jsonl or .parquet")
    rows = []
    for where, record in records:
        prompt = _field(record, prompt_key, where)
        answer = _field(record, answer_key, where)
        if not (isinstance(prompt, str) or _is_chat(prompt)):
            raise DatasetError(f"{where}: {prompt_key!r} must be a string or a list of {{role, content}} messages")
        if isinstance(answer, (int, float)):
            answer = str(answer)
        if not isinstance(answer, str):
            raise DatasetError(f"{where}: {answer_key!r} must be a string, got {type(answer).__name__}")
        rows.append((where, prompt, answer))
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def _jsonl_records(path: Path):
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:  # its own "line 1" would be this line's
                raise DatasetError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield f"{path}:{number}", record


def _field(record: dict, key: str, where: str):
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            have = ", ".join(sorted(value)) if isinstance(value, dict) else type(value).__name__
            raise DatasetError(f"{where}: no field {key!r} (has: {have})")
        value = value[part]
    return value


def _is_chat(prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)


def encode_prompt(tokenizer, prompt, *, chat_template: bool, enable_thinking: bool | None = None) -> list[int]:
    """Token ids of one prompt: through the chat template (with the generation prompt) when the
    tokenizer has one and it is wanted, else the plain text. `enable_thinking`: the template's
    thinking switch (Qwen3), None to leave the template's default."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        switch = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **switch)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_prompts(path, tokenizer, *, prompt_key: str, answer_key: str, chat_template: bool,
                 max_prompt_len: int, enable_thinking: bool | None = None) -> tuple[list[Prompt], int]:
    """Tokenized prompts, and how many were skipped for being longer than `max_prompt_len`."""
    prompts, skipped = [], 0
    for where, prompt, answer in read_rows(path, prompt_key, answer_key):
        ids = encode_prompt(tokenizer, prompt, chat_template=chat_template, enable_thinking=enable_thinking)
        if not ids:
            raise DatasetError(f"{where}: the prompt is empty after tokenization")
        if len(ids) > max_prompt_len:
            skipped += 1
            continue
        prompts.append(Prompt(len(prompts), ids, answer, where))
    if not prompts:
        raise DatasetError(f"{path}: every prompt is longer than data.max_prompt_len={max_prompt_len}")
    return prompts, skipped


class PromptOrder:
    """Which prompts step k gets: an endless stream of seeded epoch permutations, cut into
    batches. A function of the step alone, so resuming needs no state."""

    def __init__(self, size: int, per_step: int, *, seed: int, shuffle: bool = True):
        self.size, self.per_step, self.seed, self.shuffle = size, per_step, seed, shuffle
        self._epochs: dict[int, list[int]] = {}

    def _epoch(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            order = list(range(self.size))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epochs = {epoch: order}  # only the current epoch is kept
        return self._epochs[epoch]

    def batch(self, step: int) -> list[int]:
        start = step * self.per_step
        return [self._epoch(i // self.size)[i % self.size] for i in range(start, start + self.per_step)]
