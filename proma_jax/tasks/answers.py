"""Final-answer extraction and numeric rewards for free-text responses (GSM8K, word arithmetic).

A response's final answer is the number after its last answer marker, in this priority:

  1. the last `####` (GSM8K's own format, and what `gsm8k.DEFAULT_INSTRUCTION` asks for),
  2. the content of the last `\\boxed{...}`, if that content is a number,
  3. the last "answer is" / "Answer:" (case-insensitive).

After `####` and "answer is" the first number on the rest of that line (or the next non-blank
line) counts: "#### $1,234.00 dollars" -> "1234". With `strict=False`, a response without any
marker answers with the last number anywhere in its text (a model told to reply with "just the
number"). Numbers compare in a canonical form (`normalize_number`): "$18.00", "18." and "18" are
the same answer, "3.50" and "3.5" too, ".5" and "0.5" too. A percent sign is not part of a number:
`normalize_number("50%")` is None, and the extractors read "50%" as "50".

A final answer is a whole number token: one glued to a letter, a digit, `_`, `/` or a further
`.digits` is not a number, so a malformed answer earns nothing. Scientific notation ("#### 1e3", "1e400"),
fractions ("#### 1/2") and glued words ("#### 12abc") give no answer after their marker (not "1"
or "12"), and the fallback of `strict=False` skips them.
"""

from __future__ import annotations

import decimal
import functools
import re

from proma_jax.tasks.base import SampleFn, Task

# An optional sign and/or dollar sign, then digits (with `,` thousands separators or none) and an
# optional fraction, which may be empty ("18.", the end of a sentence), or a bare fraction (".5").
_NUMBER = re.compile(
    r"(?<![\w./])(?:[-+\u2212]\$?|\$[-+\u2212]?)?"
    r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)")
_ANSWER_IS = re.compile(r"answer\s+is|answer\s*:", re.IGNORECASE)
_BOXED = "\\boxed{"


def normalize_number(text: str) -> str | None:
  """The canonical form of a number string, or None if `text` is not one number.

  Whitespace around the number, a `$`, `,` thousands separators ("1,234"; "1,2" is not a number),
  a trailing `.`, a leading `+` and trailing zeros of the fraction are dropped, and the unicode
  minus `\u2212` is read as `-`: "$1,234.50" -> "1234.5", "18.00" -> "18", "-0" -> "0",
  "\u22127" -> "-7", ".5" -> "0.5". A `%` is kept, so "50%" is None (not a plain number).
  """
  text = text.strip()
  if _NUMBER.fullmatch(text) is None:
    return None
  plain = text.replace("$", "").replace(",", "").replace("\u2212", "-")
  value = decimal.Decimal(plain)
  if value.is_zero():
    return "0"
  digits = format(value, "f")  # Exact: no context rounding, no exponent.
  return digits.rstrip("0").rstrip(".") if "." in digits else digits


# What may not follow a number for it to be a whole token (see the module docstring).
_GLUED = re.compile(r"[\w/]|\.\d")


def _whole(match: re.Match, text: str) -> bool:
  return _GLUED.match(text, match.end()) is None


def _number_after(text: str) -> str | None:
  """The normalized first number on the first non-blank line of `text`, or None (also when that
  first number is not a whole token: "12abc", "1e3", "1/2")."""
  line = text.lstrip().split("\n", 1)[0]
  match = _NUMBER.search(line)
  return normalize_number(match.group()) if match and _whole(match, line) else None


def _last_boxed(text: str) -> str | None:
  """The content of the last `\\boxed{...}` of `text` (nested braces matched), or None."""
  start = text.rfind(_BOXED)
  if start < 0:
    return None
  depth, begin = 1, start + len(_BOXED)
  for end in range(begin, len(text)):
    depth += {"{": 1, "}": -1}.get(text[end], 0)
    if depth == 0:
      return text[begin:end]
  return None


def extract_final_answer(text: str, strict: bool = True) -> str | None:
  """The normalized number a response gives as its final answer, or None.

  Markers in priority order: the last `####`, the last `\\boxed{...}` holding a number, the last
  "answer is" / "Answer:" (see the module docstring); a marker with no number after it is skipped.
  With `strict=False` and no marker giving a number, the last number anywhere in `text`.
  """
  if "####" in text:
    number = _number_after(text.rsplit("####", 1)[1])
    if number is not None:
      return number
  boxed = _last_boxed(text)
  if boxed is not None and normalize_number(boxed) is not None:
    return normalize_number(boxed)
  markers = list(_ANSWER_IS.finditer(text))
  if markers:
    number = _number_after(text[markers[-1].end():])
    if number is not None:
      return number
  if strict:
    return None
  numbers = [m.group() for m in _NUMBER.finditer(text) if _whole(m, text)]
  return normalize_number(numbers[-1]) if numbers else None


def number_reward(response_text: str, terminated: bool, answer: str, strict: bool = True) -> float:
  """1.0 iff the response's final answer (`extract_final_answer`) equals `normalize_number(answer)`,
  both not None, else 0.0.

  `terminated` is not required: a response cut at the length limit after it stated its answer
  (e.g. still chatting after "#### 18") scores, since the answer is what is verified; whether it
  ended cleanly is reported by the format flag and the policy's own EOS statistics.
  """
  del terminated  # See the docstring.
  gold = normalize_number(answer)
  given = extract_final_answer(response_text, strict)
  return 1.0 if gold is not None and given == gold else 0.0


def answer_format(response_text: str, terminated: bool, strict: bool = True) -> bool:
  """Whether the response states a final answer that parses (`extract_final_answer` not None)."""
  del terminated  # Like `number_reward`, a stated answer counts even without EOS.
  return extract_final_answer(response_text, strict) is not None


def number_task(name: str, sample: SampleFn, strict: bool = True) -> Task:
  """A text task whose answers are numbers: reward `number_reward` and format flag
  `answer_format`, both with `strict`; the widths are left to the policy (None)."""
  return Task(
      name=name,
      sample=sample,
      prompt_width=None,
      answer_width=None,
      reward_fn=functools.partial(number_reward, strict=strict),
      format_fn=functools.partial(answer_format, strict=strict),
      answer_fn=functools.partial(extract_final_answer, strict=strict),
  )
