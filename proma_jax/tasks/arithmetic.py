"""Integer arithmetic: prompt "12+35=", answer "47".

Operands of the train split have `train_digits` digits, those of the val split `val_digits`
(default 1-2 digits for train, 3 digits for val), so every val prompt has an operand longer than
any train operand: the val split is out of distribution and disjoint from train.

When the two digit ranges overlap (e.g. both 1-2 digits), the splits are kept disjoint by a
held-out set: a fixed fraction `val_fraction` of all problems, chosen by a hash of the problem
(`held_out`), is the only source of val problems and is never drawn for train (`split_problems`).
The hash sees a commutative problem's operands in sorted order, so "3 + 5" and "5 + 3" fall in
the same split. With disjoint digit ranges nothing is held out and the draws are those of
`sample_problems`.
"""

from __future__ import annotations

import operator

import numpy as np

from proma_jax.tasks.base import DataError, Example, Task

OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


# Operands are drawn as int64 and multiplied: 9 digits keep a product below 2^63.
MAX_DIGITS = 9

# The fraction of problems held out for val where the train and val digit ranges overlap.
DEFAULT_VAL_FRACTION = 0.2
# A fixed code per operation for the held-out hash (not its index in `ops`, so that a problem's
# split does not depend on which other operations are enabled); commutative ones sort operands.
_OP_CODES = {"+": 1, "-": 2, "*": 3}
_COMMUTATIVE = "+*"
# Rejection rounds (of at most _MAX_CHUNK draws) before a split is declared (nearly) empty.
_MAX_ROUNDS = 100
_MAX_CHUNK = 2 ** 16
# Operand ranges with at most this many problems are enumerated when the task is built, to check
# that neither split is empty.
_ENUMERATE = 2 ** 20


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


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a fixed, well-mixed hash."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def held_out(a_N, op_N, b_N, val_fraction: float) -> np.ndarray:
  """bool (N,): whether each problem (a_N[i], op_N[i], b_N[i]) is in the held-out (val) set, a
  fixed function of the problem alone (no seed, no other problems): a fraction `val_fraction` of
  all problems, uniformly. `op_N` holds operation characters; for + and * the operands are sorted
  first, so a problem and its commuted form are in the same set."""
  a_N = np.asarray(a_N, np.int64)
  b_N = np.asarray(b_N, np.int64)
  code_N = np.array([_OP_CODES[op] for op in op_N], np.uint64).reshape(a_N.shape)
  commutative_N = np.isin(np.asarray(list(op_N)), list(_COMMUTATIVE)).reshape(a_N.shape)
  first_N = np.where(commutative_N, np.minimum(a_N, b_N), a_N).astype(np.uint64)
  second_N = np.where(commutative_N, np.maximum(a_N, b_N), b_N).astype(np.uint64)
  with np.errstate(over="ignore"):
    h_N = _mix64(first_N + np.uint64(0x9E3779B97F4A7C15))
    h_N = _mix64(h_N ^ (second_N * np.uint64(0xC2B2AE3D27D4EB4F)))
    h_N = _mix64(h_N ^ (code_N * np.uint64(0x165667B19E3779F9)))
  # The top 53 bits as a uniform float in [0, 1).
  return (h_N >> np.uint64(11)).astype(np.float64) * 2.0 ** -53 < val_fraction


def check_val_fraction(val_fraction) -> float:
  """`val_fraction` as a float; ValueError naming `config.task_kwargs.val_fraction` unless it is a
  number strictly between 0 and 1."""
  if (isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float))
      or not 0 < val_fraction < 1):
    raise ValueError(f"config.task_kwargs.val_fraction: must be a number strictly between 0 and "
                     f"1 (the fraction of problems held out for val), got {val_fraction!r}")
  return float(val_fraction)


def ranges_overlap(ranges: dict[str, tuple[int, int]]) -> bool:
  """Whether some problem has both operands in the train and in the val operand range."""
  (train_low, train_high), (val_low, val_high) = ranges["train"], ranges["val"]
  return train_low <= val_high and val_low <= train_high


def check_splits(ranges: dict[str, tuple[int, int]], ops: str, val_fraction: float) -> None:
  """DataError naming val_fraction if, with overlapping ranges small enough to enumerate, the
  train range has no problem left for train or the val range none held out for val."""
  if not ranges_overlap(ranges):
    return
  for split, want in (("train", False), ("val", True)):
    low, high = ranges[split]
    if (high - low + 1) ** 2 * len(ops) > _ENUMERATE:
      continue
    a_N, b_N = (x.ravel() for x in np.meshgrid(np.arange(low, high + 1), np.arange(low, high + 1)))
    found = sum(int(np.sum(held_out(a_N, op * a_N.size, b_N, val_fraction) == want)) for op in ops)
    if not found:
      raise DataError(
          f"config.task_kwargs.val_fraction: with val_fraction={val_fraction}, {split}_digits "
          f"and ops {ops!r} leave no {split} problem (the held-out set is "
          f"{'empty' if want else 'everything'} there); widen {split}_digits or change "
          f"val_fraction")


def split_problems(rng: np.random.Generator, n: int, split: str,
                   ranges: dict[str, tuple[int, int]], ops: str,
                   val_fraction: float) -> list[tuple[int, str, int]]:
  """`n` problems of `split`, never a problem of the other split.

  With disjoint operand ranges, `sample_problems` over the split's range. Otherwise candidates
  are drawn from the split's range in rounds and kept when `held_out` says they belong to the
  split (val: held out; train: not), in draw order, so the examples stay a deterministic function
  of the rng. DataError naming val_fraction or the digit field if a split has (almost) no
  problems.
  """
  if not ranges_overlap(ranges):
    return sample_problems(rng, n, ranges[split], ops)
  want = split == "val"
  keep_rate = val_fraction if want else 1 - val_fraction
  chunk = min(_MAX_CHUNK, max(256, int(np.ceil(2 * n / keep_rate))))
  kept: list[tuple[int, str, int]] = []
  for _ in range(_MAX_ROUNDS):
    if len(kept) >= n:
      break
    candidates = sample_problems(rng, chunk, ranges[split], ops)
    a_N, op_N, b_N = zip(*candidates)
    mask_N = held_out(a_N, op_N, b_N, val_fraction) == want
    kept.extend(p for p, keep in zip(candidates, mask_N) if keep)
  if len(kept) < n:
    raise DataError(
        f"config.task_kwargs.val_fraction: the {split} split of {split}_digits with ops {ops!r} "
        f"has too few problems once val_fraction={val_fraction} of them are held out for val "
        f"(found {len(kept)} of {n} in {_MAX_ROUNDS * chunk} draws); widen {split}_digits or "
        f"change val_fraction")
  return kept[:n]


def arithmetic_task(
    ops: str = "+-",
    train_digits: tuple[int, int] = (1, 2),
    val_digits: tuple[int, int] = (3, 3),
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> Task:
  """Task "arith": `a<op>b=` -> str(a op b), a and b uniform over the split's operand range.

  Args:
    ops: the operations to draw from, a subset of "+-*".
    train_digits: (min, max) number of digits of train operands.
    val_digits: (min, max) number of digits of val operands.
    val_fraction: where the digit ranges overlap, the fraction of problems held out for val
      (`split_problems`); unused otherwise.
  """
  if not ops or any(op not in OPERATIONS for op in ops) or len(set(ops)) != len(ops):
    raise ValueError(f"ops must be distinct characters of {''.join(OPERATIONS)!r}, got {ops!r}")
  ranges = {"train": _operand_range(train_digits, "train_digits"),
            "val": _operand_range(val_digits, "val_digits")}
  val_fraction = check_val_fraction(val_fraction)
  check_splits(ranges, ops, val_fraction)

  def sample(split: str, n: int, rng: np.random.Generator) -> list[Example]:
    return [Example(f"{a}{op}{b}=", str(OPERATIONS[op](a, b)))
            for a, op, b in split_problems(rng, n, split, ranges, ops, val_fraction)]

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
