"""GSM8K grade-school math word problems, for pretrained instruct models.

Records are GSM8K's JSONL, {"question": str, "answer": str}, whose answer (a worked solution) ends
with a line `#### <number>`; any file in that format works. The train split samples the train
file; the val split samples the test file (validation is greedy accuracy on a fixed subset of the
test split). The prompt is the question then the instruction, a user message the training code
wraps in the model's chat template; the answer is the gold number, normalized
(`answers.normalize_number`). The reward is 1.0 iff the response's final answer (`####`, then
`\\boxed{}`, then "answer is"; `answers.extract_final_answer`) equals it.

The data are either two local files (`train_path`, `test_path`) or, with network access and the
optional `datasets` package, a Hugging Face dataset (`hf_dataset="openai/gsm8k"`, config "main").
Every record is checked when the task is built; a bad one raises a ValueError naming the file and
line.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from proma_jax.tasks.answers import normalize_number, number_task
from proma_jax.tasks.base import Example, Task
from proma_jax.tasks.jsonl import check_record, read_json_lines

DEFAULT_INSTRUCTION = (
    "Solve the problem step by step. Then give the final answer on its own last line, in the "
    "form #### <number>, with no units.")


def gold_number(solution: str) -> str:
  """The normalized number of the `#### <number>` line that ends a GSM8K solution.

  Raises ValueError if there is no `####` or what follows the last one is not one number.
  """
  if "####" not in solution:
    raise ValueError("the answer has no '#### <number>' line")
  tail = solution.rsplit("####", 1)[1].strip()
  number = normalize_number(tail)
  if number is None:
    raise ValueError(f"the answer's '####' line is not a number: {tail[:40]!r}")
  return number


def _problem(record, instruction: str) -> Example:
  """The example of one GSM8K record; ValueError if the record is malformed."""
  check_record(record, ("question", "answer"))
  if not record["question"].strip():
    raise ValueError("empty question")
  prompt = f"{record['question']}\n\n{instruction}" if instruction else record["question"]
  return Example(prompt, gold_number(record["answer"]))


def _file_records(path: str | os.PathLike, field: str) -> Iterable[tuple[int, dict]]:
  """(line number, decoded JSON) of each non-blank line of a JSONL file.

  A missing file raises FileNotFoundError naming the path and the config field `field`; a line
  that is not UTF-8 or not JSON raises ValueError "<path>, line <n>: ...".
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path}: no such file; config.{field} must be a GSM8K JSONL file "
        '({"question": ..., "answer": "... #### <number>"} per line), or set '
        "config.task_kwargs.hf_dataset='openai/gsm8k' to download it")
  yield from read_json_lines(path, bad_utf8="not valid UTF-8 ({error}); save the file as UTF-8",
                             bad_json="not JSON: {error}")


def _examples(source: str, records: Iterable[tuple[int, object]], instruction: str,
              max_examples: int | None, unit: str = "line") -> list[Example]:
  """The examples of the first `max_examples` (None: all) numbered records of `source`."""
  examples = []
  for number, record in records:
    if max_examples is not None and len(examples) == max_examples:
      break
    try:
      examples.append(_problem(record, instruction))
    except ValueError as error:
      raise ValueError(f"{source}, {unit} {number}: {error}") from None
  if not examples:
    raise ValueError(f"{source}: no records")
  return examples


def _load_hf(hf_dataset: str):
  """`datasets.load_dataset(hf_dataset, "main")`; without `datasets`, an ImportError saying what
  to do."""
  try:
    import datasets  # pylint: disable=import-outside-toplevel  (optional dependency)
  except ImportError as error:
    raise ImportError(
        f"config.task_kwargs.hf_dataset={hf_dataset!r} needs the Hugging Face `datasets` package: "
        "pip install datasets, or download the JSONL files and set config.task_kwargs.train_path "
        "and config.task_kwargs.test_path instead") from error
  return datasets.load_dataset(hf_dataset, "main")


def gsm8k_task(
    train_path: str | os.PathLike | None = None,
    test_path: str | os.PathLike | None = None,
    hf_dataset: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    strict: bool = True,
    max_examples: int | None = None,
) -> Task:
  """Task "gsm8k": question + instruction -> the gold number; train samples the train file, val
  the test file.

  Args:
    train_path: GSM8K-format JSONL of the train split (with `test_path`).
    test_path: GSM8K-format JSONL of the test split, which the val split samples.
    hf_dataset: instead of the paths, a Hugging Face dataset name ("openai/gsm8k"), loaded with
      `datasets.load_dataset(hf_dataset, "main")` (splits "train" and "test").
    instruction: appended to each question after a blank line ("": the bare question).
    strict: the reward reads only marked answers (`####`, `\\boxed{}`, "answer is"); False also
      accepts the last number of an unmarked response.
    max_examples: keep only the first `max_examples` records of each split (quick tests).

  Each call of `sample` draws `n` distinct records (with replacement only if `n` exceeds the
  split's size), a deterministic function of the task's seeded rng.
  """
  if max_examples is not None and (isinstance(max_examples, bool) or
                                   not isinstance(max_examples, (int, np.integer)) or
                                   max_examples < 1):
    raise ValueError(f"config.task_kwargs.max_examples: must be None or an integer >= 1, got "
                     f"{max_examples!r}")
  has_paths = train_path is not None and test_path is not None
  if has_paths == (hf_dataset is not None) or (train_path is None) != (test_path is None):
    raise ValueError(
        "gsm8k needs either both config.task_kwargs.train_path and config.task_kwargs.test_path "
        "(GSM8K JSONL files) or config.task_kwargs.hf_dataset (e.g. 'openai/gsm8k'), not both; "
        f"got train_path={train_path!r}, test_path={test_path!r}, hf_dataset={hf_dataset!r}")
  if has_paths:
    splits = {split: _examples(os.fspath(path), _file_records(path, f"task_kwargs.{field}"),
                               instruction, max_examples)
              for split, path, field in (("train", train_path, "train_path"),
                                         ("val", test_path, "test_path"))}
  else:
    loaded = _load_hf(hf_dataset)
    splits = {split: _examples(f"{hf_dataset}[{name}]", enumerate(loaded[name], start=1),
                               instruction, max_examples, unit="record")
              for split, name in (("train", "train"), ("val", "test"))}

  def sample(split: str, n: int, rng: np.random.Generator) -> list[Example]:
    examples = splits[split]
    return [examples[i] for i in rng.choice(len(examples), size=n, replace=n > len(examples))]

  return number_task("gsm8k", sample, strict=strict)
