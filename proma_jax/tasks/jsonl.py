"""A task from the user's own JSONL file of {"prompt": ..., "answer": ...} records.

Each non-blank line must be a JSON object with string fields "prompt" (non-empty) and "answer",
whose characters are all in the tokenizer's alphabet; anything else raises a ValueError naming the
file and line. The val split is a second file, or a deterministic held-out fraction of the first.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from proma_jax.tasks.base import Example, Task
from proma_jax.tasks.tokenizer import CharTokenizer


def load_jsonl(path: str | os.PathLike, tokenizer: CharTokenizer | None = None) -> list[Example]:
  """The examples of a JSONL file, in file order; blank lines are skipped.

  Raises ValueError "<path>, line <n>: <reason>" for a line that is not a JSON object, lacks a
  string "prompt" or "answer", has an empty prompt, or uses a character outside the alphabet of
  `tokenizer` (default `CharTokenizer()`).
  """
  tokenizer = tokenizer or CharTokenizer()
  examples = []
  with open(path, encoding="utf-8") as file:
    for line_number, line in enumerate(file, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict):
          raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        for key in ("prompt", "answer"):
          if key not in record:
            raise ValueError(f"missing key {key!r}")
          if not isinstance(record[key], str):
            raise ValueError(f"{key!r} must be a string, got {type(record[key]).__name__}")
          tokenizer.check_text(record[key])
        if not record["prompt"]:
          raise ValueError("empty prompt")
      except ValueError as error:  # json.JSONDecodeError is a ValueError too.
        raise ValueError(f"{path}, line {line_number}: {error}") from error
      examples.append(Example(record["prompt"], record["answer"]))
  if not examples:
    raise ValueError(f"{path}: no examples")
  return examples


def split_held_out(
    examples: list[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
  """(train, val): a seeded random ceil(val_fraction * N) examples go to val, the rest to train."""
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  num_val = math.ceil(val_fraction * len(examples))
  if num_val >= len(examples):
    raise ValueError(
        f"holding out {num_val} of {len(examples)} examples leaves none to train on")
  order = np.random.default_rng(seed).permutation(len(examples))
  return [examples[i] for i in order[num_val:]], [examples[i] for i in order[:num_val]]


def _shuffled_epochs(examples: list[Example], n: int, rng: np.random.Generator) -> list[Example]:
  """The first `n` of a stream that visits every one of `examples` once per epoch, in a fresh
  random order each epoch."""
  stream: list[Example] = []
  while len(stream) < n:
    stream.extend(examples[i] for i in rng.permutation(len(examples)))
  return stream[:n]


def jsonl_task(
    train_path: str | os.PathLike,
    val_path: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    name: str = "jsonl",
    tokenizer: CharTokenizer | None = None,
) -> Task:
  """Task from JSONL files: train = `train_path`; val = `val_path`, or if it is None a held-out
  `val_fraction` of `train_path` chosen by `split_seed` (then train is the rest).

  Each split is sampled in shuffled epochs: `n` examples are the first `n` of a stream that
  visits every example of the split once per epoch, in a fresh seeded order.
  """
  examples = load_jsonl(train_path, tokenizer)
  if val_path is None:
    splits = dict(zip(("train", "val"), split_held_out(examples, val_fraction, split_seed)))
  else:
    splits = {"train": examples, "val": load_jsonl(val_path, tokenizer)}

  def sample(split: str, n: int, rng: np.random.Generator) -> list[Example]:
    return _shuffled_epochs(splits[split], n, rng)

  every = splits["train"] + splits["val"]
  return Task(
      name=name,
      sample=sample,
      prompt_width=max(len(ex.prompt) for ex in every) + 1,
      answer_width=max(len(ex.answer) for ex in every) + 1,
  )
