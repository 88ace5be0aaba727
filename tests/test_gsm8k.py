"""Tests of free-text answer extraction, the GSM8K task and the word-arithmetic task."""

import json
import pathlib
import re
import sys
import types

import numpy as np
import pytest

from proma_jax import tasks
from proma_jax.tasks import answers, gsm8k
from proma_jax.tasks.answers import (
    answer_format,
    extract_final_answer,
    normalize_number,
    number_reward,
)

GSM8K_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared/data/gsm8k"
needs_gsm8k = pytest.mark.skipif(
    not GSM8K_DIR.is_dir(), reason=f"GSM8K data not found at {GSM8K_DIR} (outside the repository)")


@pytest.mark.parametrize("text, expected", [
    ("18", "18"), ("18.00", "18"), ("18.", "18"), ("$18.", "18"), (" $18.00\n", "18"),
    ("1,234", "1234"), ("1,234.50", "1234.5"), ("1,234,567", "1234567"), ("-0", "0"),
    ("0.0", "0"), ("\u22127", "-7"), ("+3", "3"), ("3.50", "3.5"), (".5", "0.5"), ("0.5", "0.5"),
    ("-$5", "-5"), ("$-5", "-5"), ("100", "100"), ("007", "7"),
    ("12345678901234567890123456789.10", "12345678901234567890123456789.1"),
])
def test_normalize_number_canonical_form(text, expected):
  """Equal numbers written differently get one canonical string, exactly (no rounding)."""
  assert normalize_number(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1,2", "12,34", "50%", "1e5", "3 4", "--3", "$", ".",
                                  "inf", "nan", "1.2.3", "#### 3"])
def test_normalize_number_rejects_non_numbers(text):
  """Anything but one plain number (a percent sign included) is None."""
  assert normalize_number(text) is None


@pytest.mark.parametrize("text, expected", [
    ("#### 1,234", "1234"),
    ("#### $18.00", "18"),
    ("####18", "18"),
    ("The answer is -5.", "-5"),
    ("So the answer is: 3.50 dollars", "3.5"),
    ("Answer: 42", "42"),
    ("ANSWER IS 7", "7"),
    ("\\boxed{72}", "72"),
    ("so $\\boxed{1,000}$.", "1000"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("#### 1\nwait\n#### 2", "2"),
    ("#### 18\n\nI hope this helps", "18"),
    ("#### 18 apples", "18"),
    ("####\n 9", "9"),
    ("It is 12.\n#### \u22127", "-7"),
    ("#### +3", "3"),
    ("#### .5", "0.5"),
    ("#### 0.5", "0.5"),
    ("#### 50%", "50"),
    # Priority: #### over \boxed over "answer is", whatever their order in the text.
    ("#### 3\nThe answer is 4. \\boxed{5}", "3"),
    ("\\boxed{5} The answer is 4.", "5"),
    # A marker without a number is skipped for the next.
    ("#### none\nThe answer is 4", "4"),
    ("\\boxed{\\frac{1}{2}} Answer: 6", "6"),
])
def test_extract_final_answer_markers(text, expected):
  """The number after the highest-priority marker (its last occurrence), normalized."""
  assert extract_final_answer(text) == expected
  assert extract_final_answer(text, strict=False) == expected


@pytest.mark.parametrize("text, loose", [
    ("no numbers here", None),
    ("", None),
    ("I think 3 apples plus 4 is 7", "7"),
    ("45", "45"),
    (" 45\n", "45"),
    ("It costs $1,234.50.", "1234.5"),
    ("37 - 8 = 29", "29"),
    ("The answer is unclear.\nMaybe 12", "12"),
    ("\\boxed{x} 8", "8"),
])
def test_extract_final_answer_strict_needs_a_marker(text, loose):
  """strict=True ignores an unmarked last number; strict=False takes it."""
  assert extract_final_answer(text, strict=True) is None
  assert extract_final_answer(text, strict=False) == loose


@pytest.mark.parametrize("text, strict, loose", [
    ("#### 1e3", None, None),            # scientific notation is not a number
    ("the mass is 1e400", None, None),
    ("#### 1/2", None, None),            # nor is a fraction, on either side of the slash
    ("so 3/4 of 12 is 9", None, "9"),    # the fallback skips it and finds the last whole number
    ("#### 12abc", None, None),          # glued to a word
    ("x 12abc 5", None, "5"),
    ("#### 1.2.3", None, None),          # two decimal points
    ("The answer is: 7/8", None, None),
    ("#### 12 apples", "12", "12"),      # whole tokens still count
    ("#### 18.", "18", "18"),
    ("The answer is 50%.", "50", "50"),
])
def test_a_final_answer_is_a_whole_number_token(text, strict, loose):
  """Malformed answers earn nothing: "1e3", "1/2" and "12abc" are not read as 1 or 12."""
  assert extract_final_answer(text) == strict
  assert extract_final_answer(text, strict=False) == loose
  assert number_reward(text, True, "1") == 0.0 and number_reward(text, True, "12") == float(
      strict == "12")


def test_number_reward_and_format():
  """Reward 1 iff the extracted answer equals the normalized gold; `terminated` is not needed."""
  assert number_reward("#### 18", True, "18") == 1.0
  assert number_reward("So... #### $18.00\nmore text cut at the len", False, "18") == 1.0
  assert number_reward("The answer is 1,234.", True, "1234") == 1.0
  assert number_reward("#### 17", True, "18") == 0.0
  assert number_reward("18", True, "18") == 0.0
  assert number_reward("18", True, "18", strict=False) == 1.0
  assert number_reward("nothing", True, "18", strict=False) == 0.0
  assert number_reward("#### 18", True, "not a number") == 0.0
  assert answer_format("#### 18", False)
  assert not answer_format("18", True)
  assert answer_format("18", True, strict=False)
  assert not answer_format("no number", True, strict=False)


class _WordTokenizer:
  """A tokenizer whose ids index a fixed vocabulary of words (id 0 pad, 1 bos, 2 eos)."""

  pad_id, bos_id, eos_id = 0, 1, 2
  vocab = ["<pad>", "<bos>", "<eos>", "####", " 18", " 17", " The", " answer", " is"]

  def decode(self, ids):
    return "".join(self.vocab[i] for i in ids)

  def ids(self, text_words):
    return [self.vocab.index(word) for word in text_words]


def test_score_responses_with_gsm8k_reward(tmp_path):
  """The gsm8k reward through `score_responses`: a cut response that stated its answer scores;
  a raising reward scores 0 and is counted."""
  task = gsm8k.gsm8k_task(*_tiny_files(tmp_path))
  tok = _WordTokenizer()
  rows = [tok.ids(["####", " 18", "<eos>"]), tok.ids(["####", " 18", " The"]),
          tok.ids(["####", " 17", "<eos>"]), tok.ids([" The", " answer", "<eos>"])]
  response_BxL, mask_BxL = np.asarray(rows), np.ones((4, 3), np.int32)
  scores = tasks.score_responses(tok, response_BxL, mask_BxL, ["18"] * 4, task.reward_fn,
                                 task.format_fn)
  np.testing.assert_array_equal(scores.rewards_B, [1.0, 1.0, 0.0, 0.0])
  np.testing.assert_array_equal(scores.formatted_B, [True, True, True, False])
  assert scores.errors == 0

  def broken(text, terminated, answer):
    if "17" in text:
      raise RuntimeError("bug")
    return task.reward_fn(text, terminated, answer)

  with pytest.warns(UserWarning, match="raised on 1 of 4"):
    scores = tasks.score_responses(tok, response_BxL, mask_BxL, ["18"] * 4, broken)
  np.testing.assert_array_equal(scores.rewards_B, [1.0, 1.0, 0.0, 0.0])
  assert scores.errors == 1


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
  return path


def _tiny_files(tmp_path):
  train = _write_jsonl(tmp_path / "train.jsonl", [
      {"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
      for i in range(5)])
  test = _write_jsonl(tmp_path / "test.jsonl", [
      {"question": "How many?", "answer": "Many.\n#### 1,000"}])
  return train, test


@needs_gsm8k
def test_gsm8k_every_gold_answer_parses():
  """Both real files load completely (7473 train, 1319 test records), each gold a number."""
  task = gsm8k.gsm8k_task(GSM8K_DIR / "train.jsonl", GSM8K_DIR / "test.jsonl")
  for split, size in (("train", 7473), ("val", 1319)):
    records = [json.loads(line) for line in (GSM8K_DIR / (
        "train.jsonl" if split == "train" else "test.jsonl")).read_text("utf-8").splitlines()]
    assert len(records) == size
    golds = [gsm8k.gold_number(record["answer"]) for record in records]
    assert all(normalize_number(gold) == gold for gold in golds)
    # Each gold solution, read as a response, earns its own reward.
    assert all(number_reward(record["answer"], True, gold) == 1.0
               for record, gold in zip(records, golds))
    examples = task.examples(split, size, seed=0)
    questions = {record["question"] for record in records}
    assert all(ex.prompt.endswith("\n\n" + gsm8k.DEFAULT_INSTRUCTION) for ex in examples)
    assert {ex.prompt[:-len(gsm8k.DEFAULT_INSTRUCTION) - 2] for ex in examples} <= questions


@needs_gsm8k
def test_gsm8k_sampling_is_deterministic_and_val_draws_from_test():
  """Same seed, same examples; another seed, others; val prompts are test questions; n below the
  split size draws distinct records."""
  task = tasks.get_task("gsm8k", train_path=str(GSM8K_DIR / "train.jsonl"),
                        test_path=str(GSM8K_DIR / "test.jsonl"), max_examples=200)
  again = gsm8k.gsm8k_task(GSM8K_DIR / "train.jsonl", GSM8K_DIR / "test.jsonl", max_examples=200)
  assert task.train_examples(64, seed=1) == again.train_examples(64, seed=1)
  assert task.val_examples(64, seed=1) == again.val_examples(64, seed=1)
  assert task.train_examples(64, seed=1) != task.train_examples(64, seed=2)
  assert len(set(task.train_examples(200, seed=0))) == 200
  test_questions = [json.loads(line)["question"] for line in
                    (GSM8K_DIR / "test.jsonl").read_text("utf-8").splitlines()[:200]]
  val = task.val_examples(300, seed=0)  # More than the 200 kept: drawn with replacement.
  assert {ex.prompt.split("\n\n" + gsm8k.DEFAULT_INSTRUCTION)[0] for ex in val} <= set(
      test_questions)
  assert task.name == "gsm8k" and task.prompt_width is None and task.answer_width is None


def test_gsm8k_prompt_answer_and_options(tmp_path):
  """Prompt = question + blank line + instruction (bare question for ""); answer = normalized
  gold; max_examples keeps the first records; strict=False rewards a bare last number."""
  train, test = _tiny_files(tmp_path)
  task = gsm8k.gsm8k_task(train, test, instruction="Go.", max_examples=2)
  assert sorted(task.train_examples(2, seed=0)) == [
      tasks.Example("What is 0 + 1?\n\nGo.", "1"), tasks.Example("What is 1 + 1?\n\nGo.", "2")]
  assert task.val_examples(3, seed=0) == [tasks.Example("How many?\n\nGo.", "1000")] * 3
  bare = gsm8k.gsm8k_task(train, test, instruction="")
  assert bare.val_examples(1, seed=0)[0].prompt == "How many?"
  assert task.reward_fn("1000", True, "1000") == 0.0
  loose = gsm8k.gsm8k_task(train, test, strict=False)
  assert loose.reward_fn("1000", True, "1000") == 1.0 and loose.format_fn("1000", True)


@pytest.mark.parametrize("content, line, message", [
    (b'{"question": "q", "answer": "#### 1"}\n\xff\xfe\n', 2, "not valid UTF-8"),
    (b'{"question": "q", "answer": "#### 1"}\n[1, 2]\n', 2, "expected a JSON object"),
    (b'\n{"question": "q", "answer": "#### 1"\n', 2, "not JSON"),
    (b'{"answer": "#### 1"}\n', 1, "missing key 'question'"),
    (b'{"question": "q"}\n', 1, "missing key 'answer'"),
    (b'{"question": 3, "answer": "#### 1"}\n', 1, "'question' must be a string"),
    (b'{"question": "q", "answer": 1}\n', 1, "'answer' must be a string"),
    (b'{"question": "q", "answer": "#### 1"}\n{"question": "q", "answer": "it is 4"}\n', 2,
     "no '#### <number>' line"),
    (b'{"question": "q", "answer": "#### four"}\n', 1, "is not a number"),
    (b'{"question": " ", "answer": "#### 4"}\n', 1, "empty question"),
])
def test_gsm8k_bad_file_names_file_and_line(tmp_path, content, line, message):
  """Each malformed record raises a ValueError naming the file, the line and the problem."""
  good = _tiny_files(tmp_path)[1]
  bad = tmp_path / "bad.jsonl"
  bad.write_bytes(content)
  for paths in ((bad, good), (good, bad)):
    with pytest.raises(ValueError, match=rf"bad\.jsonl, line {line}: .*{message}"):
      gsm8k.gsm8k_task(*paths)


def test_gsm8k_empty_or_missing_file(tmp_path):
  """An empty file names the file; a missing one names the path and the config field."""
  train, test = _tiny_files(tmp_path)
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n")
  with pytest.raises(ValueError, match=r"empty\.jsonl: no records"):
    gsm8k.gsm8k_task(empty, test)
  with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*config\.task_kwargs\.train_path"):
    gsm8k.gsm8k_task(tmp_path / "nope.jsonl", test)
  with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*config\.task_kwargs\.test_path"):
    gsm8k.gsm8k_task(train, tmp_path / "nope.jsonl")


@pytest.mark.parametrize("kwargs", [
    {"train_path": "a.jsonl"}, {"test_path": "b.jsonl"},
    {"train_path": "a.jsonl", "test_path": "b.jsonl", "hf_dataset": "openai/gsm8k"},
    {"train_path": "a.jsonl", "hf_dataset": "openai/gsm8k"},
])
def test_gsm8k_needs_paths_or_hf_dataset(kwargs):
  """At most one data source: both paths, or hf_dataset (neither: the default below); one path
  alone, or paths and hf_dataset, raise an error naming the config fields."""
  with pytest.raises(ValueError, match=r"task_kwargs\.train_path.*task_kwargs\.test_path.*"
                                       r"task_kwargs\.hf_dataset"):
    gsm8k.gsm8k_task(**kwargs)


@pytest.mark.parametrize("max_examples", [0, -1, 1.5, True, "3"])
def test_gsm8k_rejects_bad_max_examples(tmp_path, max_examples):
  with pytest.raises(ValueError, match=r"task_kwargs\.max_examples"):
    gsm8k.gsm8k_task(*_tiny_files(tmp_path), max_examples=max_examples)


def test_gsm8k_hf_dataset(monkeypatch):
  """hf_dataset loads splits "train" and "test" of config "main" through `datasets`; a bad record
  names the dataset split and record."""
  calls = []
  splits = {"train": [{"question": "Q1", "answer": "x\n#### 1"},
                      {"question": "Q2", "answer": "#### 2.0"}],
            "test": [{"question": "T1", "answer": "#### -3"}]}

  def load_dataset(name, config):
    calls.append((name, config))
    return splits

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  task = tasks.get_task("gsm8k", hf_dataset="openai/gsm8k", instruction="")
  assert calls == [("openai/gsm8k", "main")]
  assert sorted(task.train_examples(2, seed=0)) == [tasks.Example("Q1", "1"),
                                                    tasks.Example("Q2", "2")]
  assert task.val_examples(2, seed=0) == [tasks.Example("T1", "-3")] * 2
  splits["test"].append({"question": "T2"})
  with pytest.raises(ValueError, match=r"openai/gsm8k\[test\], record 2: missing key 'answer'"):
    gsm8k.gsm8k_task(hf_dataset="openai/gsm8k")


def test_gsm8k_hf_dataset_without_datasets(monkeypatch):
  """Without the optional `datasets` package, the error says how to install it or what else to
  set."""
  monkeypatch.setitem(sys.modules, "datasets", None)
  with pytest.raises(ImportError, match=r"pip install datasets.*task_kwargs\.train_path"):
    gsm8k.gsm8k_task(hf_dataset="openai/gsm8k")


GSM8K_SPLITS = {"train": [{"question": "Q1", "answer": "x\n#### 1"}],
                "test": [{"question": "T1", "answer": "#### -3"}]}


def test_gsm8k_without_paths_reads_openai_gsm8k(monkeypatch):
  """No paths and no hf_dataset: the task reads openai/gsm8k (config "main") through `datasets`
  when it is installed and the dataset loads; nothing assumes a folder beside the repository."""
  calls = []

  def load_dataset(name, config):
    calls.append((name, config))
    return GSM8K_SPLITS

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  task = tasks.get_task("gsm8k", instruction="")
  assert calls == [("openai/gsm8k", "main")]
  assert task.train_examples(1, seed=0) == [tasks.Example("Q1", "1")]
  assert task.val_examples(1, seed=0) == [tasks.Example("T1", "-3")]


def _offline(name, config):
  raise ConnectionError(f"cannot reach the hub for {name}/{config}")


@pytest.mark.parametrize("datasets_module, reason", [
    (None, r"the `datasets` package is not installed"),
    (types.SimpleNamespace(load_dataset=_offline),
     r"load_dataset\('openai/gsm8k', 'main'\) failed: ConnectionError: cannot reach the hub"),
])
def test_gsm8k_without_paths_or_dataset_names_the_fields_and_the_files(monkeypatch,
                                                                       datasets_module, reason):
  """No paths, and `datasets` missing or offline: a ValueError naming
  config.task_kwargs.train_path and test_path, why the dataset could not be read, and where to
  download the files."""
  monkeypatch.setitem(sys.modules, "datasets", datasets_module)
  with pytest.raises(ValueError) as error:
    gsm8k.gsm8k_task()
  message = str(error.value)
  assert message.startswith("config.task_kwargs.train_path and config.task_kwargs.test_path "
                            "are not set")
  assert re.search(reason, message), message
  assert "grade_school_math/data/ of https://github.com/openai/grade-school-math" in message


# ---------------------------------------------------------------------------------------------
# Prompt lengths (`Task.fit_prompts`), measured here in characters: the policy passes its
# tokenizer's counts (tests/test_rl_pretrained.py runs them through the tiny Qwen3 fixture).

LONG_QUESTION = " ".join(f"word{i}" for i in range(2000)) + " How many words?"


def _files_with_a_long_question(tmp_path):
  """train.jsonl with the long question on line 3 (after a blank line 2), test.jsonl without."""
  train = tmp_path / "train.jsonl"
  train.write_text("\n".join([
      json.dumps({"question": "What is 1 + 1?", "answer": "#### 2"}), "",
      json.dumps({"question": LONG_QUESTION, "answer": "#### 2000"}),
      json.dumps({"question": "What is 2 + 2?", "answer": "#### 4"})]) + "\n")
  test = _write_jsonl(tmp_path / "test.jsonl", [{"question": "How many?", "answer": "#### 7"}])
  return train, test


def _characters(calls):
  """A prompt_lengths that counts characters and records each call's prompts."""
  def lengths(prompts):
    calls.append(list(prompts))
    return [len(p) for p in prompts]
  return lengths


def test_gsm8k_over_long_prompt_names_file_line_and_tokens(tmp_path):
  """too_long="error" (the default): the error names the file, the 1-based line (blank lines
  counted) and the prompt's length, and the limit's config field; every prompt of both files is
  measured in one call."""
  train, test = _files_with_a_long_question(tmp_path)
  task = gsm8k.gsm8k_task(train, test, instruction="Go.")
  calls = []
  with pytest.raises(ValueError) as error:
    task.fit_prompts(_characters(calls), 100)
  length = len(LONG_QUESTION) + len("\n\nGo.")
  assert str(error.value).startswith(
      f"{train}, line 3: the prompt is {length} tokens as the policy encodes it")
  assert "> config.rollout.max_prompt_tokens=100" in str(error.value)
  assert "config.task_kwargs.too_long" in str(error.value)
  assert len(calls) == 1 and len(calls[0]) == 4
  assert task.fit_prompts(_characters([]), length) is not None  # the limit is inclusive


def test_gsm8k_truncate_keeps_the_end_of_the_question_and_the_instruction(tmp_path, caplog):
  """too_long="truncate": the long question keeps its longest end that fits, from the start of a
  word, then the whole instruction; the other prompts are untouched; a warning counts it."""
  train, test = _files_with_a_long_question(tmp_path)
  task = gsm8k.gsm8k_task(train, test, instruction="Go.", too_long="truncate")
  with caplog.at_level("WARNING"):
    sample = task.fit_prompts(_characters([]), 100)
  prompts = {ex.prompt: ex.answer for ex in sample("train", 30, np.random.default_rng(0))}
  assert len(prompts) == 3
  (cut,) = [p for p, answer in prompts.items() if answer == "2000"]
  question = cut[:-len("\n\nGo.")]
  assert cut.endswith("\n\nGo.") and len(cut) <= 100
  assert LONG_QUESTION.endswith(question) and question.endswith("How many words?")
  assert LONG_QUESTION[-len(question) - 1] == " " and not question[0].isspace()  # a whole word
  assert len(cut) > 100 - len("word1999 ")  # no more than a word short of the limit
  assert {"What is 1 + 1?\n\nGo.", "What is 2 + 2?\n\nGo."} < set(prompts)
  assert f"{train}: 1 of 3 records over config.rollout.max_prompt_tokens=100 were truncated" in (
      caplog.text)
  assert f"first: {train}, line 3: " in caplog.text


def test_gsm8k_skip_drops_the_record_and_counts_it(tmp_path, caplog):
  """too_long="skip": the record is never drawn and a warning counts it; a split left empty is
  an error naming its file."""
  train, test = _files_with_a_long_question(tmp_path)
  task = gsm8k.gsm8k_task(train, test, instruction="Go.", too_long="skip")
  with caplog.at_level("WARNING"):
    sample = task.fit_prompts(_characters([]), 100)
  assert {ex.answer for ex in sample("train", 30, np.random.default_rng(0))} == {"2", "4"}
  assert f"{train}: 1 of 3 records over config.rollout.max_prompt_tokens=100 were skipped" in (
      caplog.text)
  with pytest.raises(ValueError, match=rf"{re.escape(str(train))}: all 3 records are over "
                                       r"config\.rollout\.max_prompt_tokens=10 "):
    task.fit_prompts(_characters([]), 10)


def test_gsm8k_truncate_without_room_for_the_question_names_the_record(tmp_path):
  """An instruction that leaves no room for any of the question cannot be truncated into the
  limit: the error names the record and what to change."""
  train, test = _files_with_a_long_question(tmp_path)
  task = gsm8k.gsm8k_task(train, test, instruction="x" * 200, too_long="truncate")
  with pytest.raises(ValueError, match=rf"{re.escape(str(train))}, line 1: .*leave no room for "
                                       r"the question.*task_kwargs\.instruction"):
    task.fit_prompts(_characters([]), 150)


@pytest.mark.parametrize("too_long", ["cut", None, ""])
def test_gsm8k_rejects_an_unknown_too_long(tmp_path, too_long):
  with pytest.raises(ValueError, match=r"config\.task_kwargs\.too_long: unknown"):
    gsm8k.gsm8k_task(*_tiny_files(tmp_path), too_long=too_long)


def test_word_arith_prompts_match_answers():
  """Each answer is the value of the prompt's expression; val operands lie in the val range;
  sampling is deterministic."""
  task = tasks.get_task("word_arith", ops="+-*", val_digits=(3, 3))
  for split, low, high in (("train", 0, 99), ("val", 100, 999)):
    examples = task.examples(split, 300, seed=0)
    assert examples == task.examples(split, 300, seed=0)
    for ex in examples:
      question, instruction = ex.prompt.split("? ")
      assert instruction == "Answer with just the number."
      a, op, b = question.removeprefix("What is ").split(" ")
      assert low <= int(a) <= high and low <= int(b) <= high and op in "+-*"
      assert ex.answer == str(eval(f"{a} {op} {b}"))  # pylint: disable=eval-used
  assert {ex.prompt.split()[3] for ex in task.train_examples(300, seed=0)} == {"+", "-", "*"}
  assert task.prompt_width is None and task.answer_width is None


def test_word_arith_template_and_reward():
  """The template and instruction set the wording; the reward takes the response's last number."""
  task = tasks.get_task("word_arith", template="Compute {a}{op}{b}.", instruction="")
  ex = task.train_examples(1, seed=0)[0]
  assert ex.prompt.startswith("Compute ") and ex.prompt.endswith(".")
  for response in ("45", "The answer is 45.", " 45\n", "37 + 8 = 45", "#### 45"):
    assert task.reward_fn(response, True, "45") == 1.0, response
    assert task.format_fn(response, True)
  for response in ("44", "forty-five", ""):
    assert task.reward_fn(response, True, "45") == 0.0, response
  assert task.reward_fn("-29", True, "-29") == 1.0
  with pytest.raises(ValueError, match=r"task_kwargs\.template"):
    tasks.get_task("word_arith", template="What is {x}?")
  with pytest.raises(ValueError, match=r"task_kwargs\.ops"):
    tasks.get_task("word_arith", ops="/")


@pytest.mark.parametrize("task", ["word_arith", "arith"])
@pytest.mark.parametrize("field, digits", [
    ("train_digits", (1, 19)),  # 10**19 overflows int64 (and products overflow long before)
    ("train_digits", (3, 1)),
    ("val_digits", (0, 2)),
    ("val_digits", (1.5, 2)),
    ("val_digits", (1, 2, 3)),
])
def test_digit_ranges_are_checked_naming_the_field(task, field, digits):
  with pytest.raises(ValueError, match=rf"config\.task_kwargs\.{field}: must be \(low, high\)"):
    tasks.get_task(task, **{field: digits})


def test_nine_digit_products_are_exact():
  """The largest operands allowed: every answer is the exact integer (no int64 wrap-around)."""
  task = tasks.get_task("word_arith", ops="*", train_digits=(9, 9))
  for ex in task.train_examples(64, seed=0):
    a, b = re.fullmatch(r"What is (\d+) \* (\d+)\? .*", ex.prompt).groups()
    assert ex.answer == str(int(a) * int(b)), ex


def test_word_arith_template_and_instruction_from_the_command_line():
  """configs/smollm2_arith.py exposes template and instruction as task_kwargs."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(
      "smollm2_arith", pathlib.Path(__file__).parents[1] / "configs" / "smollm2_arith.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("grpo")
  c.task_kwargs.template, c.task_kwargs.instruction = "How much is {a} {op} {b}?", "Be brief."
  ex = tasks.get_task(c.task, **c.task_kwargs.to_dict()).train_examples(1, seed=0)[0]
  assert ex.prompt.startswith("How much is ") and ex.prompt.endswith("? Be brief.")


def test_registry_names():
  assert tasks.TASKS["gsm8k"] is gsm8k.gsm8k_task
  assert answers.number_reward is tasks.number_reward
  assert "word_arith" in tasks.TASKS
