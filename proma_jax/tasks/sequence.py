"""String transformations: reverse ("rev:abc=" -> "cba") and sort ("sort:cab=" -> "abc").

Strings of the train split have `train_lengths` characters, those of the val split `val_lengths`
(default 2-5 for train, 6-7 for val), so the val split is out of distribution and disjoint from
train.
"""

from __future__ import annotations

import string
from typing import Callable

import numpy as np

from proma_jax.tasks.base import Example, Task


def sequence_task(
    name: str,
    prefix: str,
    transform: Callable[[str], str],
    symbols: str = string.ascii_lowercase,
    train_lengths: tuple[int, int] = (2, 5),
    val_lengths: tuple[int, int] = (6, 7),
) -> Task:
  """Task `name`: prompt `prefix + s + "="` -> `transform(s)`, s drawn uniformly from `symbols`.

  Args:
    name: registry name of the task.
    prefix: text before the string, e.g. "rev:".
    transform: the function of the string the policy must compute; it must preserve length
      (`answer_width` is the longest string length + EOS).
    symbols: characters the strings are drawn from (with replacement).
    train_lengths: (min, max) string length of the train split.
    val_lengths: (min, max) string length of the val split.
  """
  if not symbols:
    raise ValueError("symbols must be non-empty")
  lengths = {"train": tuple(train_lengths), "val": tuple(val_lengths)}
  for split, (low, high) in lengths.items():
    if not 1 <= low <= high:
      raise ValueError(f"{split} lengths must satisfy 1 <= min <= max, got {(low, high)}")

  def sample(split: str, n: int, rng: np.random.Generator) -> list[Example]:
    low, high = lengths[split]
    examples = []
    for length in rng.integers(low, high + 1, size=n):
      text = "".join(symbols[i] for i in rng.integers(0, len(symbols), size=length))
      examples.append(Example(f"{prefix}{text}=", transform(text)))
    return examples

  longest = max(high for _, high in lengths.values())
  return Task(
      name=name,
      sample=sample,
      prompt_width=1 + len(prefix) + longest + 1,
      answer_width=longest + 1,
  )


def reverse_task(**kwargs) -> Task:
  """Task "reverse": "rev:abc=" -> "cba". Keyword arguments as in `sequence_task`."""
  return sequence_task("reverse", "rev:", lambda text: text[::-1], **kwargs)


def sort_task(**kwargs) -> Task:
  """Task "sort": "sort:cab=" -> "abc". Keyword arguments as in `sequence_task`."""
  return sequence_task("sort", "sort:", lambda text: "".join(sorted(text)), **kwargs)
