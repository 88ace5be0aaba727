"""The code tasks (proma_jax/tasks/mbpp.py): MBPP and HumanEval prompts, splits, code extraction,
rewards through the sandbox, errors that name the record, and an RL step through the CLI."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from proma_jax import tasks
from proma_jax.tasks import DataError, mbpp
from helpers import humaneval_installed, mbpp_path

REPO = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "tests" / "fixtures" / "hf" / "tiny_qwen3"


class Chars:
  """A tokenizer of one token per character; 0 is EOS."""
  eos_id, pad_id, bos_id = 0, 1, None

  def decode(self, ids):
    return "".join(chr(i) for i in ids)


@pytest.fixture(scope="module")
def task():
  humaneval_installed()
  return tasks.get_task("mbpp", path=mbpp_path())


def test_splits_are_mbpp_train_and_humaneval(task):
  examples = mbpp.load_mbpp(mbpp_path())
  assert len(examples) == 974
  train = mbpp.mbpp_split(examples, "train")
  assert list(train)[0] == "MBPP/601" and len(train) == 374
  assert len(mbpp.load_humaneval()) == 164
  drawn = task.train_examples(374, seed=0)
  assert sorted(ex.prompt for ex in drawn) == sorted(ex.prompt for ex in train.values())
  val = task.val_examples(164, seed=0)
  assert len({ex.prompt for ex in val}) == 164
  assert all(ex.prompt.startswith("Complete this Python function.") for ex in val)
  for choice, first in (("mbpp_test", 11), ("mbpp_validation", 511)):
    other = tasks.get_task("mbpp", path=mbpp_path(), val=choice, max_examples=3)
    assert other.val_examples(3, seed=0)[0].prompt in [
        ex.prompt for ex in mbpp.mbpp_split(examples, choice[5:]).values()][:3]
    assert list(mbpp.mbpp_split(examples, choice[5:]))[0] == f"MBPP/{first}"


def test_an_mbpp_prompt_states_the_problem_and_one_test_as_the_interface_hint():
  record = {"task_id": 700, "text": "Write a function to add two numbers.", "code": "",
            "test_setup_code": "", "test_list": ["assert add(1, 2) == 3",
                                                 "assert add(0, 0) == 0", "assert add(2, 2) == 4"]}
  task_id, example = mbpp._mbpp_example(record)  # pylint: disable=protected-access
  assert task_id == 700
  assert "Write a function to add two numbers." in example.prompt
  assert "assert add(1, 2) == 3" in example.prompt and "add(0, 0)" not in example.prompt
  assert json.loads(example.answer) == {
      "setup": "", "tests": "\nassert add(1, 2) == 3\nassert add(0, 0) == 0\n"
                            "assert add(2, 2) == 4\n"}


@pytest.mark.parametrize("response, code", [
    ("Sure:\n```python\ndef f():\n  return 1\n```\nThat is it.", "def f():\n  return 1\n"),
    ("```\nx = 1\n```", "x = 1\n"),
    ("```text\nnot code\n```\n```py\ny = 2\n```", "y = 2\n"),
    ("```bash\nls\n```", "ls\n"),                       # no python block: the first block
    ("```python\ndef f():\n  return", "def f():\n  return"),  # cut off: to the end
    ("    return x + 1\n", "    return x + 1"),         # no fence: the response, indented
])
def test_extract_code(response, code):
  assert mbpp.extract_code(response) == code


def test_format_is_code_that_parses():
  assert mbpp.code_format("```python\ndef f():\n  return 1\n```", False)
  assert not mbpp.code_format("```python\ndef f(:\n```", True)
  assert not mbpp.code_format("```python\n\n```", True)
  assert not mbpp.code_format("(" * 10000, True)  # the parser's nesting limit: no crash


def test_rewards_run_the_tests_and_score_a_decoded_batch(task):
  answer = mbpp.code_answer("", "assert add(1, 2) == 3\n")
  responses = ["```python\ndef add(a, b):\n  return a + b\n```",
               "```python\ndef add(a, b):\n  return a - b\n```",
               "I do not know.", "```python\nimport os\nos._exit(0)\n```"]
  assert mbpp.code_rewards(responses, [True] * 4, [answer] * 4) == [1.0, 0.0, 0.0, 0.0]
  assert mbpp.code_reward(responses[0], False, answer) == 1.0

  tokens = [[ord(c) for c in text] + [0] for text in responses]
  width = max(map(len, tokens))
  response_BxL = np.array([t + [1] * (width - len(t)) for t in tokens])
  mask_BxL = np.array([[1] * len(t) + [0] * (width - len(t)) for t in tokens])
  scores = tasks.score_responses(Chars(), response_BxL, mask_BxL, [answer] * 4, task.reward_fn,
                                 task.format_fn, task.batch_reward_fn)
  assert scores.rewards_B.tolist() == [1.0, 0.0, 0.0, 0.0]
  assert scores.formatted_B.tolist() == [True, True, False, True]
  assert scores.errors == 0


def test_a_batch_reward_that_raises_scores_the_batch_zero_and_counts_it():
  def broken(texts, terminated, answers):
    raise RuntimeError("executor down")

  with pytest.warns(UserWarning, match="executor down"):
    scores = tasks.score_responses(Chars(), np.array([[65, 0], [66, 0]]), np.ones((2, 2)),
                                   ["a", "b"], batch_reward_fn=broken)
  assert scores.rewards_B.tolist() == [0.0, 0.0] and scores.errors == 2


@pytest.mark.slow
def test_every_humaneval_canonical_solution_passes_as_a_body_or_a_whole_function():
  humaneval_installed()
  import gzip  # pylint: disable=import-outside-toplevel
  with gzip.open(mbpp.humaneval_path(), "rt") as file:
    records = [json.loads(line) for line in file]
  answers = [ex.answer for ex in mbpp.load_humaneval().values()]
  bodies = [r["canonical_solution"] for r in records]
  whole = [f"```python\n{r['prompt']}{r['canonical_solution']}```" for r in records]
  assert mbpp.code_rewards(bodies + whole, [True] * 328, answers * 2, workers=2) == [1.0] * 328


def _write(path, lines):
  path.write_text("".join(json.dumps(line) + "\n" if not isinstance(line, str) else line
                          for line in lines))
  return str(path)


GOOD = {"task_id": 601, "text": "t", "code": "", "test_setup_code": "",
        "test_list": ["assert f() == 1"]}


@pytest.mark.parametrize("bad, message", [
    ({**GOOD, "test_list": []}, "line 2: 'test_list' must be a non-empty list"),
    ({**GOOD, "text": 3}, "line 2: 'text' must be str, got int"),
    ({k: v for k, v in GOOD.items() if k != "test_setup_code"}, "line 2: missing key"),
    ("{not json\n", "line 2: not JSON"),
    ({**GOOD}, "line 2: task_id 601 appears twice"),
])
def test_a_bad_mbpp_record_names_the_file_and_line(tmp_path, bad, message):
  path = _write(tmp_path / "mbpp.jsonl", [GOOD, bad])
  with pytest.raises(DataError, match=f"{path}, {message}"):
    mbpp.load_mbpp(path)


def test_missing_data_and_bad_options_are_named(tmp_path):
  with pytest.raises(DataError, match="task mbpp needs config.task_kwargs.path"):
    tasks.get_task("mbpp")
  with pytest.raises(DataError, match=r"no such file \(config.task_kwargs.path\)"):
    tasks.get_task("mbpp", path=tmp_path / "nope.jsonl")
  path = _write(tmp_path / "mbpp.jsonl", [GOOD])
  with pytest.raises(DataError, match="config.task_kwargs.val: unknown 'humaneva'"):
    tasks.get_task("mbpp", path=path, val="humaneva")
  with pytest.raises(DataError, match="task_id in 11-510"):
    tasks.get_task("mbpp", path=path, val="mbpp_test")
  with pytest.raises(DataError, match="too_long: 'truncate' is not 'error' or 'skip'"):
    tasks.get_task("mbpp", path=path, too_long="truncate")
  with pytest.raises(DataError, match="humaneval has no train split"):
    tasks.get_task("humaneval", path=_write(tmp_path / "he.jsonl", [
        {"task_id": "HumanEval/0", "prompt": "def f():\n", "test": "", "entry_point": "f"}]
    )).train_examples(1, seed=0)


def test_an_over_long_prompt_is_named_or_skipped(tmp_path):
  humaneval_installed()
  task = tasks.get_task("mbpp", path=mbpp_path(), max_examples=5)
  lengths = lambda prompts: [len(p) for p in prompts]  # noqa: E731  (characters as tokens)
  longest_val = max(len(ex.prompt) for ex in task.val_examples(5, seed=0))
  with pytest.raises(DataError, match=r"HumanEval/\d+ \(val split\): the prompt is \d+ tokens"):
    task.fit_prompts(lengths, longest_val - 1)
  skipping = tasks.get_task("mbpp", path=mbpp_path(), max_examples=5, too_long="skip")
  sample = skipping.fit_prompts(lengths, longest_val - 1)
  assert all(len(ex.prompt) < longest_val
             for ex in sample("val", 20, np.random.default_rng(0)))


@pytest.mark.slow
def test_an_rl_step_on_mbpp_runs_through_the_command_line(tmp_path):
  """configs/qwen3_mbpp.py on the tiny Qwen3 fixture: prompts measured (HumanEval's longer ones
  skipped in the fixture's 424-token vocabulary), programs run in the sandbox, finite metrics."""
  humaneval_installed()
  workdir = tmp_path / "run"
  overrides = {
      "model.checkpoint": CHECKPOINT, "model.max_len": 1024, "model.dtype": "float32",
      "model.remat": False, "model.logits_chunk": 0, "rollout.max_new_tokens": 8,
      "rollout.prompts_per_step": 2, "rollout.group_size": 2, "rollout.sample_batch": 4,
      "train.num_minibatches": 1, "train.num_microbatches": 2, "eval.num_examples": 2,
      "eval.every": 1, "steps": 1, "task_kwargs.path": mbpp_path(),
      "task_kwargs.max_examples": 4, "task_kwargs.too_long": "skip"}
  command = [sys.executable, "-m", "proma_jax.train", "--config=configs/qwen3_mbpp.py:proma",
             f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]
  run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert run.returncode == 0, run.stdout + run.stderr
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [0, 1]
  assert all(math.isfinite(v) for r in records for v in r.values())
  assert records[1]["reward/errors"] == 0.0
  assert "HumanEval/" in run.stderr  # the skipped prompts are named in the warning
