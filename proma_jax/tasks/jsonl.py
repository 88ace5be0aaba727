"""A task from the user's own JSONL file of {"prompt": ..., "answer": ...} records.

Each non-blank line must be a JSON object with string fields "prompt" (non-empty) and "answer",
whose characters are all in the tokenizer's alphabet; anything else (bytes that are not UTF-8
included) raises a ValueError naming the file and line. The val split is a second file, or a
deterministic held-out fraction of the first.

Lengths are checked when the task is built, before any model is made or compiled: the model's
sequence length, hence the memory of every step, is the longest prompt plus the longest answer, so
one stray long record would size every batch. A prompt longer than `max_prompt_tokens` (BOS
included) or an answer longer than `max_answer_tokens` (EOS included) raises a ValueError naming
the file, line, length and maximum (`too_long="error"`), is cut to fit (`"truncate"`: a prompt
keeps its END, the text next to the answer; an answer keeps its BEGINNING, which the reward then
checks), or is dropped (`"skip"`); truncated and dropped records are counted in a warning.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
from typing import Callable, Iterator

import numpy as np

from proma_jax.tasks.base import Example, Task
from proma_jax.tasks.tokenizer import CharTokenizer

log = logging.getLogger(__name__)

TOO_LONG_POLICIES = ("error", "truncate", "skip")
DEFAULT_MAX_PROMPT_TOKENS = 256
DEFAULT_MAX_ANSWER_TOKENS = 128


def load_jsonl(path: str | os.PathLike, tokenizer: CharTokenizer | None = None) -> list[Example]:
  """The examples of a JSONL file, in file order; blank lines are skipped.

  Raises ValueError "<path>, line <n>: <reason>" for a line that is not valid UTF-8, is not a JSON
  object, lacks a string "prompt" or "answer", has an empty prompt, or uses a character outside the
  alphabet of `tokenizer` (default `CharTokenizer()`).
  """
  return [example for _, example in _numbered_examples(path, tokenizer)]


def read_json_lines(
    path: str | os.PathLike,
    bad_utf8: str = ("not valid UTF-8: byte {byte!r} at byte offset {offset} of the line; save the "
                     "file as UTF-8"),
    bad_json: str = "{error}",
) -> Iterator[tuple[int, object]]:
  """(line number, decoded JSON value) of each non-blank line of a JSONL file, in file order.

  Lines are decoded one at a time, so a bad byte is reported with its line; line 1 may start with
  a UTF-8 byte-order mark (written by some editors). A path ending in .gz is read through gzip. A line that is not UTF-8 or not JSON raises
  ValueError "<path>, line <n>: " + `bad_utf8` or `bad_json`, formatted with the error ({error})
  and, for bad UTF-8, the first bad byte ({byte}) and its offset in the line ({offset}).
  """
  opener = gzip.open if os.fspath(path).endswith(".gz") else open
  with opener(path, "rb") as file:
    for line_number, raw_line in enumerate(file, start=1):
      try:
        line = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8")
        if not line.strip():
          continue
        record = json.loads(line)
      except UnicodeDecodeError as error:
        reason = bad_utf8.format(error=error, byte=raw_line[error.start:error.start + 1],
                                 offset=error.start)
        raise ValueError(f"{path}, line {line_number}: {reason}") from None
      except ValueError as error:  # json.JSONDecodeError
        raise ValueError(f"{path}, line {line_number}: {bad_json.format(error=error)}") from None
      yield line_number, record


def check_record(record, keys: tuple[str, ...],
                 check_text: Callable[[str], object] | None = None) -> dict:
  """`record`, checked to be a JSON object whose `keys` are all strings.

  Raises ValueError "expected a JSON object, got <type>", "missing key <key>" or "<key> must be a
  string, got <type>", for the first problem in the order of `keys`; each value is also passed to
  `check_text` (if given, e.g. a tokenizer's alphabet check) right after its own checks.
  """
  if not isinstance(record, dict):
    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
  for key in keys:
    if key not in record:
      raise ValueError(f"missing key {key!r}")
    if not isinstance(record[key], str):
      raise ValueError(f"{key!r} must be a string, got {type(record[key]).__name__}")
    if check_text is not None:
      check_text(record[key])
  return record


def _numbered_examples(path: str | os.PathLike,
                       tokenizer: CharTokenizer | None = None) -> list[tuple[int, Example]]:
  """(line number, example) of each record of a JSONL file; see `load_jsonl`."""
  tokenizer = tokenizer or CharTokenizer()
  examples = []
  for line_number, record in read_json_lines(path):
    try:
      check_record(record, ("prompt", "answer"), tokenizer.check_text)
      if not record["prompt"]:
        raise ValueError("empty prompt")
    except ValueError as error:
      raise ValueError(f"{path}, line {line_number}: {error}") from error
    examples.append((line_number, Example(record["prompt"], record["answer"])))
  if not examples:
    raise ValueError(f"{path}: no examples")
  return examples


def _check_length_options(max_prompt_tokens, max_answer_tokens, too_long) -> None:
  """Raises ValueError naming the config field (config.task_kwargs.<name>) of a bad option."""
  for name, value, minimum in (("max_prompt_tokens", max_prompt_tokens, 2),
                               ("max_answer_tokens", max_answer_tokens, 1)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
      what = "BOS + at least one character" if name == "max_prompt_tokens" else "the EOS"
      raise ValueError(f"config.task_kwargs.{name}: must be an integer >= {minimum} (room for "
                       f"{what}), got {value!r}")
  check_too_long(too_long)


def check_too_long(too_long) -> None:
  """Raises ValueError naming config.task_kwargs.too_long unless it is one of TOO_LONG_POLICIES
  (shared by the tasks that check their records' lengths: jsonl, gsm8k)."""
  if too_long not in TOO_LONG_POLICIES:
    raise ValueError(f"config.task_kwargs.too_long: unknown {too_long!r}; expected one of "
                     f"{TOO_LONG_POLICIES}")


def fit_lengths(
    path: str | os.PathLike,
    numbered: list[tuple[int, Example]],
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    max_answer_tokens: int = DEFAULT_MAX_ANSWER_TOKENS,
    too_long: str = "error",
) -> list[Example]:
  """The examples of `numbered` ((line, example) pairs read from `path`) within the token limits.

  A prompt takes len(prompt) + 1 tokens (BOS), an answer len(answer) + 1 (EOS); see the module
  docstring for the `too_long` policies. With "error", the ValueError names the first record over
  a limit (file, line, its length and the maximum) and how many others are.
  """
  _check_length_options(max_prompt_tokens, max_answer_tokens, too_long)
  kept, over = [], []
  for line_number, example in numbered:
    prompt_tokens, answer_tokens = len(example.prompt) + 1, len(example.answer) + 1
    problems = []
    if prompt_tokens > max_prompt_tokens:
      problems.append(f"prompt is {prompt_tokens} tokens (BOS included) > max_prompt_tokens "
                      f"{max_prompt_tokens}")
    if answer_tokens > max_answer_tokens:
      problems.append(f"answer is {answer_tokens} tokens (EOS included) > max_answer_tokens "
                      f"{max_answer_tokens}")
    if not problems:
      kept.append(example)
      continue
    over.append(f"{path}, line {line_number}: {' and '.join(problems)}")
    if too_long == "truncate":
      prompt = example.prompt[len(example.prompt) - (max_prompt_tokens - 1):] \
          if prompt_tokens > max_prompt_tokens else example.prompt
      kept.append(Example(prompt, example.answer[:max_answer_tokens - 1]))
  if over and too_long == "error":
    others = f" (and {len(over) - 1} more records over the limits)" if len(over) > 1 else ""
    raise ValueError(
        f"{over[0]}{others}. Every prompt and answer sets the model's sequence length, so one long "
        "record sizes every batch: shorten or remove it, raise config.task_kwargs.max_prompt_tokens"
        " / max_answer_tokens, or set config.task_kwargs.too_long to 'truncate' or 'skip'.")
  if over:
    log.warning("%s: %d of %d records over the length limits were %s; first: %s", path,
                len(over), len(numbered), "truncated" if too_long == "truncate" else "skipped",
                over[0])
  if not kept:
    raise ValueError(f"{path}: no examples within the length limits")
  return kept


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
    train_path: str | os.PathLike | None = None,
    val_path: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    name: str = "jsonl",
    tokenizer: CharTokenizer | None = None,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    max_answer_tokens: int = DEFAULT_MAX_ANSWER_TOKENS,
    too_long: str = "error",
) -> Task:
  """Task from JSONL files: train = `train_path`; val = `val_path`, or if it is None a held-out
  `val_fraction` of `train_path` chosen by `split_seed` (then train is the rest).

  Every record of both files is checked against `max_prompt_tokens` / `max_answer_tokens` here,
  before anything is compiled (policy `too_long`: "error", "truncate" or "skip"; see the module
  docstring). Each split is sampled in shuffled epochs: `n` examples are the first `n` of a stream
  that visits every example of the split once per epoch, in a fresh seeded order.
  """
  if train_path is None or not os.fspath(train_path):
    raise ValueError("config.task_kwargs.train_path: required for the jsonl task, e.g. "
                     "--config=configs/jsonl.py --config.task_kwargs.train_path=my.jsonl")
  limits = dict(max_prompt_tokens=max_prompt_tokens, max_answer_tokens=max_answer_tokens,
                too_long=too_long)
  examples = fit_lengths(train_path, _numbered_examples(train_path, tokenizer), **limits)
  if val_path is None:
    splits = dict(zip(("train", "val"), split_held_out(examples, val_fraction, split_seed)))
  else:
    splits = {"train": examples,
              "val": fit_lengths(val_path, _numbered_examples(val_path, tokenizer), **limits)}

  def sample(split: str, n: int, rng: np.random.Generator) -> list[Example]:
    return _shuffled_epochs(splits[split], n, rng)

  every = splits["train"] + splits["val"]
  return Task(
      name=name,
      sample=sample,
      prompt_width=max(len(ex.prompt) for ex in every) + 1,
      answer_width=max(len(ex.answer) for ex in every) + 1,
  )
