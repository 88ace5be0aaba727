"""Integer arithmetic: prompt "12+35=", answer "47".

Operands of the train split have `train_digits` digits, those of the val split `val_digits`
(default 1-2 digits for train, 3 digits for val), so every val prompt has an operand longer than
any train operand: the val split is out of distribution and disjoint from train.
"""

from __future__ import annotations

import operator

import numpy as np

from proma_jax.tasks.base import Example, Task

OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


# Operands are drawn as int64 and multiplied: 9 digits keep a product below 2^63.
MAX_DIGITS = 9


def _operand_range(digits, field: str = "digits") -> tuple[int, int]:
  """Smallest and largest integer with between digits[0] and digits[1] decimal digits; ValueError
  naming `config.task_kwargs.<field>` unless 1 <= digits[0] <= digits[1] <= MAX_DIGITS."""
  try:
    low_digits, high_digits = (int(d) if int(d) == d else None for d in digits)
  except (TypeError, ValueError):
    low_digits = high_digits = None
  if low_digits is None or high_digits is None or not 1 <= low_digits <= high_digits <= MAX_DIGITS:
    raise ValueError(f"config.task_kwargs.{field}: must be (low, high) numbers of digits with "
                     f"1 <= low <= high <= {MAX_DIGITS} (operands and products stay within "
                     f"int64), got {digits!r}")
  low = 0 if low_digits == 1 else 10 ** (low_digits - 1)
  return low, 10 ** high_digits - 1


def sample_problems(rng: np.random.Generator, n: int, operand_range: tuple[int, int],
                    ops: str) -> list[tuple[int, str, int]]:
  """`n` problems (a, op, b): a and b uniform over the inclusive `operand_range`, op uniform over
  the characters of `ops`. The draws (all a, then all b, then all ops) fix the examples that a
  seed gives, for the "arith" and "word_arith" tasks alike.
  """
  low, high = operand_range
  a_N = rng.integers(low, high + 1, size=n)
  b_N = rng.integers(low, high + 1, size=n)
  op_N = rng.integers(0, len(ops), size=n)
  return [(int(a), ops[k], int(b)) for a, b, k in zip(a_N, b_N, op_N)]


def arithmetic_task(
    ops: str = "+-",
    train_digits: tuple[int, int] = (1, 2),
    val_digits: tuple[int, int] = (3, 3),
) -> Task:
  """Task "arith": `a<op>b=` -> str(a op b), a and b uniform over the split's operand range.

  Args:
    ops: the operations to draw from, a subset of "+-*".
    train_digits: (min, max) number of digits of train operands.
    val_digits: (min, max) number of digits of val operands.
  """
  if not ops or any(op not in OPERATIONS for op in ops) or len(set(ops)) != len(ops):
    raise ValueError(f"ops must be distinct characters of {''.join(OPERATIONS)!r}, got {ops!r}")
  ranges = {"train": _operand_range(train_digits, "train_digits"),
            "val": _operand_range(val_digits, "val_digits")}

  def sample(split: str, n: int, rng: np.random.Generator) -> list[Example]:
    return [Example(f"{a}{op}{b}=", str(OPERATIONS[op](a, b)))
            for a, op, b in sample_problems(rng, n, ranges[split], ops)]

  # Prompt and answer lengths are largest at the corners of the operand box, for + - and *.
  corners = [(a, b) for low, high in ranges.values() for a in (low, high) for b in (low, high)]
  longest_prompt = max(len(f"{a}{op}{b}=") for a, b in corners for op in ops)
  longest_answer = max(len(str(OPERATIONS[op](a, b))) for a, b in corners for op in ops)
  return Task(
      name="arith",
      sample=sample,
      prompt_width=longest_prompt + 1,
      answer_width=longest_answer + 1,
  )
