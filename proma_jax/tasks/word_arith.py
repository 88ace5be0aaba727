"""Arithmetic questions in words, for a small pretrained instruct model on the CPU.

Prompt "What is 37 + 8? Answer with just the number.", answer "45". Operands are drawn as in the
"arith" task (`arithmetic.split_problems`: train and val operands from their own digit ranges;
where the ranges overlap, val draws only from a held-out fraction `val_fraction` of the problems
and train never does, so no val problem, nor its commuted form, is ever a train problem);
subtraction may give a negative answer. The reward accepts the last number of the response, so
"45", " 45\\n" and "The answer is 45." all score (`answers.number_reward` with strict=False).
"""

from __future__ import annotations

import numpy as np

from proma_jax.tasks.answers import number_task
from proma_jax.tasks.arithmetic import (
    DEFAULT_VAL_FRACTION,
    OPERATIONS,
    _operand_range,
    check_splits,
    check_val_fraction,
    split_problems,
)
from proma_jax.tasks.base import Example, Task

DEFAULT_TEMPLATE = "What is {a} {op} {b}?"
DEFAULT_INSTRUCTION = "Answer with just the number."


def word_arith_task(
    train_digits: tuple[int, int] = (1, 2),
    val_digits: tuple[int, int] = (2, 2),
    ops: str = "+-",
    template: str = DEFAULT_TEMPLATE,
    instruction: str = DEFAULT_INSTRUCTION,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> Task:
  """Task "word_arith": template.format(a=a, op=op, b=b) + " " + instruction -> str(a op b).

  Args:
    train_digits: (min, max) number of digits of train operands.
    val_digits: (min, max) number of digits of val operands.
    ops: the operations to draw from, a subset of "+-*" (written as these symbols).
    template: the question, with fields {a}, {op} and {b}.
    instruction: appended after a space ("": the bare question).
    val_fraction: where the digit ranges overlap, the fraction of problems held out for val
      (`arithmetic.held_out`); unused otherwise.
  """
  if not ops or any(op not in OPERATIONS for op in ops) or len(set(ops)) != len(ops):
    raise ValueError(f"config.task_kwargs.ops: must be distinct characters of "
                     f"{''.join(OPERATIONS)!r}, got {ops!r}")
  try:
    template.format(a=1, op="+", b=2)
  except (KeyError, IndexError, ValueError) as error:
    raise ValueError(f"config.task_kwargs.template: {template!r} must use only the fields {{a}}, "
                     f"{{op}} and {{b}} ({type(error).__name__}: {error})") from None
  ranges = {"train": _operand_range(train_digits, "train_digits"),
            "val": _operand_range(val_digits, "val_digits")}
  val_fraction = check_val_fraction(val_fraction)
  check_splits(ranges, ops, val_fraction)

  def question(a: int, op: str, b: int) -> str:
    text = template.format(a=a, op=op, b=b)
    return f"{text} {instruction}" if instruction else text

  def sample(split: str, n: int, rng: np.random.Generator) -> list[Example]:
    return [Example(question(a, op, b), str(OPERATIONS[op](a, b)))
            for a, op, b in split_problems(rng, n, split, ranges, ops, val_fraction)]

  return number_task("word_arith", sample, strict=False)
