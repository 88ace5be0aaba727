"""GSM8K grade-school math word problems, for pretrained instruct models.

Records are GSM8K's JSONL, {"question": str, "answer": str}, whose answer (a worked solution) ends
with a line `#### <number>`; any file in that format works. The train split samples the train
file; the val split samples the test file (validation is greedy accuracy on a fixed subset of the
test split). The prompt is the question then the instruction, a user message the training code
wraps in the model's chat template; the answer is the gold number, normalized
(`answers.normalize_number`). The reward is 1.0 iff the response's final answer (`####`, then
`\\boxed{}`, then "answer is"; `answers.extract_final_answer`) equals it.

The data are either two local files (`train_path`, `test_path`) or a Hugging Face dataset
(`hf_dataset="openai/gsm8k"`, config "main"), read with the optional `datasets` package. Neither
given: the Hugging Face dataset if `datasets` is installed and it loads (network access or its
cache), else a ValueError naming config.task_kwargs.train_path and test_path and where to get the
files. Every record is checked when the task is built; a bad one raises a ValueError naming the
file and line.

Prompt lengths are checked before step 0 too: as soon as the policy knows its tokenizer it
measures every prompt of both splits as it will encode it, chat template included
(`Task.fit_prompts`, called by `policy.make_policy`), against `config.rollout.max_prompt_tokens`.
As for the jsonl task, `too_long` says what an over-long prompt does: "error" raises a ValueError
naming the file, the line (1-based) and the prompt's tokens; "truncate" cuts the question to its
longest END that fits (a GSM8K question asks what to compute in its last sentence; the cut starts
at a word, and the instruction after the question is kept whole); "skip" drops the record.
Truncated and skipped records are counted in a warning. With `max_examples`, the records kept are
the ones checked.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Iterable, NamedTuple

import numpy as np

from proma_jax.tasks.answers import normalize_number, number_task
from proma_jax.tasks.base import SPLITS, Example, PromptLengthsFn, SampleFn, Task, sampler
from proma_jax.tasks.jsonl import check_record, check_too_long, read_json_lines

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = (
    "Solve the problem step by step. Then give the final answer on its own last line, in the "
    "form #### <number>, with no units.")
# What a config without data paths reads, and where to get the files instead.
HF_DATASET = "openai/gsm8k"
FILES_HINT = ("download GSM8K's train.jsonl and test.jsonl (grade_school_math/data/ of "
              "https://github.com/openai/grade-school-math) and set config.task_kwargs.train_path "
              "and config.task_kwargs.test_path to them")


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


class _Record(NamedTuple):
  """One checked GSM8K record and where it came from."""

  where: str     # "<path>, line <n>" or "<dataset>[<split>], record <n>", for error messages
  question: str
  answer: str    # the normalized gold number


def _prompt(question: str, instruction: str) -> str:
  return f"{question}\n\n{instruction}" if instruction else question


def _record(where: str, record) -> _Record:
  """The `_Record` of one decoded GSM8K record; ValueError if it is malformed."""
  check_record(record, ("question", "answer"))
  if not record["question"].strip():
    raise ValueError("empty question")
  return _Record(where, record["question"], gold_number(record["answer"]))


def _file_records(path: str | os.PathLike, field: str) -> Iterable[tuple[int, dict]]:
  """(line number, decoded JSON) of each non-blank line of a JSONL file.

  A missing file raises FileNotFoundError naming the path and the config field `field`; a line
  that is not UTF-8 or not JSON raises ValueError "<path>, line <n>: ...".
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path}: no such file; config.{field} must be a GSM8K JSONL file "
        '({"question": ..., "answer": "... #### <number>"} per line): '
        f"{FILES_HINT}, or set config.task_kwargs.hf_dataset='{HF_DATASET}' to download it")
  yield from read_json_lines(path, bad_utf8="not valid UTF-8 ({error}); save the file as UTF-8",
                             bad_json="not JSON: {error}")


def _records(source: str, records: Iterable[tuple[int, object]], max_examples: int | None,
             unit: str = "line") -> list[_Record]:
  """The checked records of the first `max_examples` (None: all) numbered records of `source`."""
  checked = []
  for number, record in records:
    if max_examples is not None and len(checked) == max_examples:
      break
    where = f"{source}, {unit} {number}"
    try:
      checked.append(_record(where, record))
    except ValueError as error:
      raise ValueError(f"{where}: {error}") from None
  if not checked:
    raise ValueError(f"{source}: no records")
  return checked


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


def _load_default():
  """What a config without data paths reads: `HF_DATASET` through `datasets`, or a ValueError
  naming config.task_kwargs.train_path and test_path and where to get the files, when the package
  is not installed or the dataset does not load (no network and no cached copy)."""
  unset = ("config.task_kwargs.train_path and config.task_kwargs.test_path are not set and the "
           f"Hugging Face dataset {HF_DATASET} cannot be read instead")
  try:
    import datasets  # pylint: disable=import-outside-toplevel  (optional dependency)
  except ImportError:
    raise ValueError(f"{unset} (the `datasets` package is not installed; pip install datasets "
                     f"to use it): {FILES_HINT}") from None
  try:
    loaded = datasets.load_dataset(HF_DATASET, "main")
  except Exception as error:  # pylint: disable=broad-except  (offline: any of several errors)
    raise ValueError(f"{unset} (datasets.load_dataset({HF_DATASET!r}, 'main') failed: "
                     f"{type(error).__name__}: {error}): {FILES_HINT}") from error
  log.warning("config.task_kwargs.train_path and test_path are not set: reading the Hugging Face "
              "dataset %s", HF_DATASET)
  return loaded


def _longest_fitting(starts: list[int], fits) -> int | None:
  """The first of the ascending positions `starts` whose tail fits (the longest such tail), by
  binary search: a tail that fits stays fitting as it shortens. None if none fits."""
  low, high, best = 0, len(starts) - 1, None
  while low <= high:
    middle = (low + high) // 2
    if fits(starts[middle]):
      best, high = starts[middle], middle - 1
    else:
      low = middle + 1
  return best


def _truncated_prompt(record: _Record, instruction: str, prompt_lengths: PromptLengthsFn,
                      max_prompt_tokens: int) -> str:
  """The prompt of `record` with its question cut to the longest end that fits in
  `max_prompt_tokens` and starts at a word (a character if not even the last word fits), found
  by binary search: a few tokenizations of one prompt. Raises ValueError naming the record when
  even the question's last character with the instruction does not fit."""
  question = record.question

  def fits(start: int) -> bool:
    return prompt_lengths([_prompt(question[start:], instruction)])[0] <= max_prompt_tokens

  words = [match.start() for match in re.finditer(r"\S+", question)]
  start = _longest_fitting(words[1:], fits)
  if start is None:
    start = _longest_fitting(list(range(words[-1] + 1, len(question))), fits)
  if start is None:
    raise ValueError(
        f"{record.where}: config.task_kwargs.too_long='truncate' cannot fit the prompt in "
        f"config.rollout.max_prompt_tokens={max_prompt_tokens}: the instruction (and chat "
        "template) leave no room for the question; raise max_prompt_tokens or shorten "
        "config.task_kwargs.instruction")
  return _prompt(question[start:], instruction)


def _fit(records: dict[str, list[_Record]], sources: dict[str, str], instruction: str,
         too_long: str, prompt_lengths: PromptLengthsFn,
         max_prompt_tokens: int) -> dict[str, list[Example]]:
  """The examples of each split once every prompt has been measured (one `prompt_lengths` call
  for both splits) and fitted to `max_prompt_tokens` by the `too_long` policy; see the module
  docstring."""
  every = [record for split in SPLITS for record in records[split]]
  lengths = [int(n) for n in prompt_lengths([_prompt(r.question, instruction) for r in every])]
  if len(lengths) != len(every):
    raise ValueError(f"prompt_lengths gave {len(lengths)} lengths for {len(every)} prompts")
  over = [(record, n) for record, n in zip(every, lengths) if n > max_prompt_tokens]
  limit = f"config.rollout.max_prompt_tokens={max_prompt_tokens}"
  if over and too_long == "error":
    (record, n), others = over[0], len(over) - 1
    more = f" (and {others} more record{'s' if others > 1 else ''} over it)" if others else ""
    raise ValueError(
        f"{record.where}: the prompt is {n} tokens as the policy encodes it (question, "
        f"instruction and the chat template or BOS) > {limit}{more}. Shorten or remove the "
        "record, raise "
        "config.rollout.max_prompt_tokens, or set config.task_kwargs.too_long to 'truncate' (keep "
        "the end of the question) or 'skip' (drop the record).")
  fitted, offset = {}, 0
  for split in SPLITS:
    kept, cut = [], []
    for record in records[split]:
      n, offset = lengths[offset], offset + 1
      if n <= max_prompt_tokens:
        kept.append(Example(_prompt(record.question, instruction), record.answer))
        continue
      cut.append(f"{record.where}: {n} tokens")
      if too_long == "truncate":
        kept.append(Example(_truncated_prompt(record, instruction, prompt_lengths,
                                              max_prompt_tokens), record.answer))
    if cut:
      what = ("truncated (each question cut to its end that fits)" if too_long == "truncate"
              else "skipped")
      log.warning("%s: %d of %d records over %s were %s; first: %s", sources[split], len(cut),
                  len(records[split]), limit, what, cut[0])
    if not kept:
      raise ValueError(f"{sources[split]}: all {len(records[split])} records are over {limit} "
                       "and config.task_kwargs.too_long='skip' dropped them all")
    fitted[split] = kept
  return fitted


def _check_options(train_path, test_path, hf_dataset, max_examples, too_long: str) -> None:
  """`gsm8k_task`'s arguments: max_examples, too_long, and one source (both paths or a dataset)."""
  if max_examples is not None and (isinstance(max_examples, bool) or
                                   not isinstance(max_examples, (int, np.integer)) or
                                   max_examples < 1):
    raise ValueError(f"config.task_kwargs.max_examples: must be None or an integer >= 1, got "
                     f"{max_examples!r}")
  check_too_long(too_long)
  if ((train_path is None) != (test_path is None) or
      (train_path is not None and hf_dataset is not None)):
    raise ValueError(
        "gsm8k needs either both config.task_kwargs.train_path and config.task_kwargs.test_path "
        "(GSM8K JSONL files) or config.task_kwargs.hf_dataset (e.g. 'openai/gsm8k'), not both; "
        f"got train_path={train_path!r}, test_path={test_path!r}, hf_dataset={hf_dataset!r}")


def _split_records(train_path, test_path, hf_dataset: str | None, max_examples: int | None
                   ) -> tuple[dict[str, str], dict[str, list[_Record]]]:
  """({split: source name}, {split: records}) of the train and val splits: from the two JSONL
  files, or from the Hugging Face dataset's "train" and "test" splits (`HF_DATASET` when
  `hf_dataset` is None)."""
  if train_path is not None:
    sources = {"train": os.fspath(train_path), "val": os.fspath(test_path)}
    records = {split: _records(sources[split],
                               _file_records(path, f"task_kwargs.{field}"), max_examples)
               for split, path, field in (("train", train_path, "train_path"),
                                          ("val", test_path, "test_path"))}
  else:
    name = hf_dataset or HF_DATASET
    loaded = _load_hf(hf_dataset) if hf_dataset is not None else _load_default()
    sources = {"train": f"{name}[train]", "val": f"{name}[test]"}
    records = {split: _records(sources[split], enumerate(loaded[part], start=1), max_examples,
                               unit="record")
               for split, part in (("train", "train"), ("val", "test"))}
  return sources, records


def gsm8k_task(
    train_path: str | os.PathLike | None = None,
    test_path: str | os.PathLike | None = None,
    hf_dataset: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    strict: bool = True,
    max_examples: int | None = None,
    too_long: str = "error",
) -> Task:
  """Task "gsm8k": question + instruction -> the gold number; train samples the train file, val
  the test file.

  Args:
    train_path: GSM8K-format JSONL of the train split (with `test_path`).
    test_path: GSM8K-format JSONL of the test split, which the val split samples.
    hf_dataset: instead of the paths, a Hugging Face dataset name ("openai/gsm8k"), loaded with
      `datasets.load_dataset(hf_dataset, "main")` (splits "train" and "test"). With neither the
      paths nor this, `HF_DATASET` if `datasets` is installed and the dataset loads, else a
      ValueError naming the paths' config fields and where to get the files.
    instruction: appended to each question after a blank line ("": the bare question).
    strict: the reward reads only marked answers (`####`, `\\boxed{}`, "answer is"); False also
      accepts the last number of an unmarked response.
    max_examples: keep only the first `max_examples` records of each split (quick tests).
    too_long: what a prompt over the policy's `rollout.max_prompt_tokens` does, once the policy
      measures them (`Task.fit_prompts`): "error", "truncate" or "skip" (module docstring).

  Each call of `sample` draws `n` distinct records (with replacement only if `n` exceeds the
  split's size), a deterministic function of the task's seeded rng.
  """
  _check_options(train_path, test_path, hf_dataset, max_examples, too_long)
  sources, records = _split_records(train_path, test_path, hf_dataset, max_examples)

  def fit_prompts(prompt_lengths: PromptLengthsFn, max_prompt_tokens: int) -> SampleFn:
    return sampler(_fit(records, sources, instruction, too_long, prompt_lengths,
                         max_prompt_tokens))

  examples = {split: [Example(_prompt(r.question, instruction), r.answer) for r in split_records]
              for split, split_records in records.items()}
  return dataclasses.replace(number_task("gsm8k", sampler(examples), strict=strict),
                             fit_prompts=fit_prompts)
