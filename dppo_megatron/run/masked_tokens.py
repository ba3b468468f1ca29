"""Which tokens the trust region masks, over the whole run: the paper's list of the most often
clipped tokens (numbers, "Wait", "Since": tokens that matter), for any loss mode.

Rank 0 adds each step's counts (`Learner.take_masked_token_counts`), writes the most frequent
ids with their text to RUN_DIR/masked_tokens.json after every step, and keeps the full counts in
each checkpoint, so that a resumed run goes on counting from where its checkpoint was.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

MASKED_TOKENS_FILE = "masked_tokens.json"
COUNTS_FILE = "masked_token_counts.pt"  # inside a checkpoint
SIDES = ("A>0", "A<0")


class MaskedTokens:
    def __init__(self, vocab_size: int, tokenizer_dir: str, *, top: int = 50):
        self.counts = torch.zeros(2, vocab_size, dtype=torch.float64)
        self.tokenizer_dir, self.top = tokenizer_dir, top
        self._tokenizer = None

    def add(self, counts: torch.Tensor) -> None:
        self.counts += counts

    def save(self, checkpoint_dir: Path) -> None:
        ids = self.counts.nonzero()  # sparse: a run masks a small part of a 150k vocabulary
        torch.save({"shape": tuple(self.counts.shape), "ids": ids, "values": self.counts[ids[:, 0], ids[:, 1]]},
                   checkpoint_dir / COUNTS_FILE)

    def load(self, checkpoint_dir: Path) -> None:
        path = checkpoint_dir / COUNTS_FILE
        if not path.exists():  # a checkpoint from before the counts were kept: start from zero
            return
        saved = torch.load(path, weights_only=True)  # tensors and ints only: nothing a file can run
        if tuple(saved["shape"]) != tuple(self.counts.shape):
            raise ValueError(f"{path}: counts of shape {saved['shape']}, the model's vocabulary is "
                             f"{self.counts.shape[1]}")
        self.counts.zero_()
        self.counts[saved["ids"][:, 0], saved["ids"][:, 1]] = saved["values"]

    def summary(self) -> dict:
        """The `top` most often masked ids on each side, with their text, count and share of
        that side's masked tokens."""
        out = {}
        for row, side in enumerate(SIDES):
            total = float(self.counts[row].sum())
            values, ids = self.counts[row].topk(min(self.top, self.counts.shape[1]))
            out[side] = [{"id": int(i), "token": self._decode(int(i)), "count": int(v), "share": float(v) / total}
                         for v, i in zip(values.tolist(), ids.tolist()) if v > 0]
            out[f"{side} masked"] = int(total)
        return out

    def write(self, run_dir: Path) -> None:
        path = run_dir / MASKED_TOKENS_FILE
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.summary(), indent=1, ensure_ascii=False))
        temporary.replace(path)

    def _decode(self, token_id: int) -> str:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._tokenizer.decode([token_id])
