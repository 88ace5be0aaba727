"""Tests of the verifiable tasks: tokenizer, splits, rewards, JSONL loading, batch encoding."""

import json

import numpy as np
import pytest

from proma_jax import tasks
from proma_jax.tasks import BOS, EOS, PAD, CharTokenizer

GENERATED_TASKS = ("arith", "reverse", "sort")


def test_tokenizer_round_trip():
  """decode(encode(s)) == s for every alphabet character; ids are specials then the alphabet;
  encode adds no special token."""
  tok = CharTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD, BOS, EOS) == (0, 1, 2)
  text = tok.alphabet
  ids = tok.encode(text)
  assert sorted(ids) == list(range(3, tok.vocab_size))
  assert tok.decode(ids) == tok.decode([BOS] + ids) == text
  assert tok.decode(tok.encode("12+35=") + [EOS, PAD, PAD]) == "12+35="


def test_tokenizer_decode_stops_at_eos_and_skips_pad_bos():
  """decode stops at the first EOS and skips PAD and BOS."""
  tok = CharTokenizer()
  ids = [BOS, PAD] + tok.encode("ab") + [EOS] + tok.encode("cd")
  assert tok.decode(ids) == "ab"


def test_tokenizer_rejects_unknown_character():
  """Encoding a character outside the alphabet raises ValueError naming that character."""
  with pytest.raises(ValueError, match="'A'"):
    CharTokenizer().encode("abA")


@pytest.mark.parametrize("name", GENERATED_TASKS)
def test_examples_are_deterministic_from_seed(name):
  """The same (split, n, seed) gives the same examples; another seed gives other examples."""
  task = tasks.get_task(name)
  assert task.train_examples(50, seed=3) == tasks.get_task(name).train_examples(50, seed=3)
  assert task.val_examples(50, seed=3) == task.val_examples(50, seed=3)
  assert task.train_examples(50, seed=3) != task.train_examples(50, seed=4)


@pytest.mark.parametrize("name", GENERATED_TASKS)
def test_val_split_is_out_of_distribution_and_disjoint(name):
  """Val prompts are longer than every train prompt and no val prompt occurs in train."""
  task = tasks.get_task(name)
  train = task.train_examples(2000, seed=0)
  val = task.val_examples(500, seed=0)
  assert min(len(ex.prompt) for ex in val) > max(len(ex.prompt) for ex in train)
  assert not {ex.prompt for ex in train} & {ex.prompt for ex in val}


@pytest.mark.parametrize("name", GENERATED_TASKS)
def test_examples_fit_widths_and_alphabet(name):
  """Every example encodes within the task's prompt/answer widths and the short-length budget."""
  task = tasks.get_task(name)
  tok = CharTokenizer()
  examples = task.train_examples(500, seed=1) + task.val_examples(500, seed=1)
  assert task.prompt_width <= 17 and task.answer_width <= 9
  tasks.encode_prompts(tok, [ex.prompt for ex in examples], task.prompt_width)
  tasks.encode_completions(tok, [ex.answer for ex in examples], task.answer_width)
  assert max(len(ex.prompt) for ex in examples) + 1 == task.prompt_width


def test_answers_are_correct():
  """Arithmetic answers evaluate the prompt; reverse and sort answers transform the string."""
  for ex in tasks.get_task("arith", ops="+-*").train_examples(200, seed=0):
    assert int(ex.answer) == eval(ex.prompt[:-1])  # pylint: disable=eval-used
  for ex in tasks.get_task("reverse").val_examples(50, seed=0):
    assert ex.prompt == f"rev:{ex.answer[::-1]}="
  for ex in tasks.get_task("sort").val_examples(50, seed=0):
    assert ex.answer == "".join(sorted(ex.prompt[len("sort:"):-1]))


def test_reward_requires_exact_answer_and_eos():
  """reward is 1 only for the exact answer of a response that terminated with EOS."""
  assert tasks.reward("47", True, "47") == 1.0
  assert tasks.reward("47", False, "47") == 0.0
  assert tasks.reward("470", True, "47") == 0.0
  assert tasks.reward(" 47", True, "47") == 0.0
  assert tasks.reward("", True, "47") == 0.0


def test_batch_rewards_read_tokens_up_to_eos():
  """Batched rewards: exact text + EOS within the mask scores 1; no EOS, a wrong answer, text
  after EOS, or a special token before EOS score as the scalar rules say."""
  tok = CharTokenizer()
  answers = ["47", "47", "47", "47", "47"]
  rows = [
      tok.encode("47") + [EOS, PAD, PAD],                # correct
      tok.encode("47") + [PAD, PAD, PAD],                # ran out without EOS
      tok.encode("48") + [EOS, PAD, PAD],                # wrong
      tok.encode("47") + [EOS] + tok.encode("9") + [EOS],  # after EOS
      [BOS] + tok.encode("47") + [EOS, PAD],             # special token before EOS
  ]
  response_BxL = np.asarray(rows, dtype=np.int32)
  mask_BxL = np.zeros_like(response_BxL, dtype=np.float32)
  for row, length in enumerate([3, 2, 3, 5, 4]):
    mask_BxL[row, :length] = 1.0
  rewards_B = tasks.batch_rewards(tok, response_BxL, mask_BxL, answers)
  np.testing.assert_array_equal(rewards_B, np.asarray([1, 0, 0, 1, 0], np.float32))
  # EOS outside the mask does not count as termination.
  mask_BxL[0, 2] = 0.0
  assert tasks.batch_rewards(tok, response_BxL[:1], mask_BxL[:1], answers[:1])[0] == 0.0


def test_encode_prompts_left_pads():
  """encode_prompts right-aligns BOS + prompt, pads on the left, and marks exactly those tokens."""
  tok = CharTokenizer()
  tokens_BxP, valid_BxP = tasks.encode_prompts(tok, ["1+2=", "12+34="], width=8)
  assert tokens_BxP.dtype == np.int32 and valid_BxP.dtype == np.float32
  np.testing.assert_array_equal(tokens_BxP[0], [PAD, PAD, PAD, BOS] + tok.encode("1+2="))
  np.testing.assert_array_equal(tokens_BxP[1], [PAD, BOS] + tok.encode("12+34="))
  np.testing.assert_array_equal(valid_BxP, [[0, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1]])
  with pytest.raises(ValueError, match="width"):
    tasks.encode_prompts(tok, ["123456789="], width=8)


def test_encode_completions_right_pads_with_eos():
  """encode_completions writes answer + EOS from column 0, pads on the right, masks them."""
  tok = CharTokenizer()
  tokens_BxL, mask_BxL = tasks.encode_completions(tok, ["7", "47"], width=4)
  np.testing.assert_array_equal(tokens_BxL, [tok.encode("7") + [EOS, PAD, PAD],
                                             tok.encode("47") + [EOS, PAD]])
  np.testing.assert_array_equal(mask_BxL, [[1, 1, 0, 0], [1, 1, 1, 0]])
  with pytest.raises(ValueError, match="width"):
    tasks.encode_completions(tok, ["1234"], width=4)


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def test_jsonl_task_reads_file_and_holds_out_val(tmp_path):
  """A JSONL task serves the file's records; held-out val is deterministic and disjoint."""
  records = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(20)]
  path = _write_jsonl(tmp_path / "train.jsonl", records)
  assert tasks.load_jsonl(path)[3] == tasks.Example("3+1=", "4")
  task = tasks.get_task("jsonl", train_path=path, val_fraction=0.25)
  train = task.train_examples(15, seed=0)
  val = task.val_examples(5, seed=0)
  assert len({ex.prompt for ex in train}) == 15  # one epoch visits each train record once
  assert len({ex.prompt for ex in val}) == 5
  assert not {ex.prompt for ex in train} & {ex.prompt for ex in val}
  assert task.val_examples(12, seed=7) == tasks.get_task(
      "jsonl", train_path=path, val_fraction=0.25).val_examples(12, seed=7)
  assert task.prompt_width == len("19+1=") + 1 and task.answer_width == len("20") + 1


def test_jsonl_task_with_val_file(tmp_path):
  """With a val file, train is the whole train file and val is the val file."""
  train_path = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "rev:ab=", "answer": "ba"}])
  val_path = _write_jsonl(tmp_path / "b.jsonl", [{"prompt": "rev:abc=", "answer": "cba"}])
  task = tasks.get_task("jsonl", train_path=train_path, val_path=val_path)
  assert task.train_examples(3, seed=0) == [tasks.Example("rev:ab=", "ba")] * 3
  assert task.val_examples(1, seed=0) == [tasks.Example("rev:abc=", "cba")]


@pytest.mark.parametrize("bad_line, reason", [
    ("{not json", "line 2"),
    ('{"prompt": "1+1="}', "line 2: missing key 'answer'"),
    ('{"prompt": "1+1=", "answer": 2}', "line 2: 'answer' must be a string"),
    ('{"prompt": "1+1=", "answer": "TWO"}', "line 2: character 'T'"),
    ('["1+1=", "2"]', "line 2: expected a JSON object"),
])
def test_jsonl_loader_names_bad_line(tmp_path, bad_line, reason):
  """A malformed line, missing key, non-string field or unknown character raises ValueError
  naming the file's line number."""
  path = tmp_path / "bad.jsonl"
  path.write_text('{"prompt": "1+2=", "answer": "3"}\n' + bad_line + "\n")
  with pytest.raises(ValueError, match=reason):
    tasks.load_jsonl(path)


def test_get_task_unknown_name_lists_known():
  """An unknown task name raises ValueError listing the registered names."""
  with pytest.raises(ValueError, match="arith.*reverse"):
    tasks.get_task("chess")


def test_jsonl_loader_names_file_and_line_of_non_utf8_bytes(tmp_path):
  """Bytes that are not UTF-8 raise ValueError naming the file and line, not UnicodeDecodeError;
  a UTF-8 byte-order mark at the start of the file is accepted."""
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(b'{"prompt": "1+2=", "answer": "3"}\n{"prompt": "caf\xe9=", "answer": "3"}\n')
  with pytest.raises(ValueError, match=r"latin1\.jsonl, line 2: not valid UTF-8") as error:
    tasks.load_jsonl(path)
  assert not isinstance(error.value, UnicodeDecodeError)
  with pytest.raises(ValueError, match=r"latin1\.jsonl, line 2: not valid UTF-8"):
    tasks.get_task("jsonl", train_path=path)
  bom = tmp_path / "bom.jsonl"
  bom.write_bytes(b'\xef\xbb\xbf{"prompt": "1+2=", "answer": "3"}\n')
  assert tasks.load_jsonl(bom) == [tasks.Example("1+2=", "3")]


def _records_with_one_long_prompt(tmp_path, length=3000):
  records = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(10)]
  records.insert(6, {"prompt": "1" * (length - 2) + "+1=", "answer": "42"})  # line 7
  return _write_jsonl(tmp_path / "data.jsonl", records)


def test_jsonl_task_rejects_a_too_long_prompt_naming_the_example(tmp_path):
  """One 3000-character prompt among short ones: by default the task build fails, naming the file,
  the line, the prompt's length and the maximum, so nothing is sized for it."""
  path = _records_with_one_long_prompt(tmp_path)
  with pytest.raises(ValueError, match=r"data\.jsonl, line 7: prompt is 3002 tokens \(BOS "
                                       r"included\) > max_prompt_tokens 256") as error:
    tasks.get_task("jsonl", train_path=path)
  assert "too_long" in str(error.value)
  with pytest.raises(ValueError, match=r"line 7: answer is 3 tokens \(EOS included\) > "
                                       r"max_answer_tokens 2"):
    tasks.get_task("jsonl", train_path=path, max_prompt_tokens=4000, max_answer_tokens=2)
  big = tasks.get_task("jsonl", train_path=path, max_prompt_tokens=3002)
  assert big.prompt_width == 3002


def test_jsonl_task_checks_the_val_file_too(tmp_path):
  """The val file is held to the same limits, and its records are named by its own lines."""
  train = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1=", "answer": "2"}])
  val = _write_jsonl(tmp_path / "val.jsonl", [{"prompt": "1+1=", "answer": "2"},
                                             {"prompt": "12345+1=", "answer": "12346"}])
  with pytest.raises(ValueError, match=r"val\.jsonl, line 2: prompt is 9 tokens"):
    tasks.get_task("jsonl", train_path=train, val_path=val, max_prompt_tokens=8)


def test_jsonl_task_truncates_or_skips_too_long_records(tmp_path, caplog):
  """too_long="truncate" keeps a prompt's end and an answer's beginning within the limits;
  "skip" drops the record. Both warn with the count and the first record over a limit."""
  path = _records_with_one_long_prompt(tmp_path)
  kwargs = dict(train_path=path, val_path=path, max_prompt_tokens=8, max_answer_tokens=2)
  with caplog.at_level("WARNING", logger="proma_jax.tasks.jsonl"):
    truncated = tasks.get_task("jsonl", too_long="truncate", **kwargs)
  assert any("2 of 11 records" in m and "truncated" in m and "line 7" in m
             for m in caplog.messages)
  examples = set(truncated.train_examples(11, seed=0))
  assert tasks.Example("1111+1=", "4") in examples and tasks.Example("9+1=", "1") in examples
  assert truncated.prompt_width == 8 and truncated.answer_width == 2
  skipped = tasks.get_task("jsonl", too_long="skip", **kwargs)
  assert {ex.prompt for ex in skipped.train_examples(9, seed=0)} == {f"{i}+1=" for i in range(9)}
  assert skipped.prompt_width == len("9+1=") + 1


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_prompt_tokens=1), "config.task_kwargs.max_prompt_tokens"),
    (dict(max_prompt_tokens=2.5), "config.task_kwargs.max_prompt_tokens"),
    (dict(max_answer_tokens=0), "config.task_kwargs.max_answer_tokens"),
    (dict(too_long="drop"), "config.task_kwargs.too_long"),
    (dict(train_path=None), "config.task_kwargs.train_path"),
])
def test_jsonl_task_validates_its_options_naming_the_field(tmp_path, kwargs, field):
  """Invalid length options, or no train_path, raise ValueError naming the config field."""
  kwargs = {"train_path": _records_with_one_long_prompt(tmp_path, length=10), **kwargs}
  with pytest.raises(ValueError, match=field):
    tasks.get_task("jsonl", **kwargs)


def _problem(prompt: str) -> tuple[int, str, int]:
  """(a, op, b) of an arith prompt "12+35=" or a word_arith prompt "What is 12 + 35? ..."."""
  import re  # pylint: disable=import-outside-toplevel
  a, op, b = re.search(r"(\d+) ?([-+*]) ?(\d+)", prompt).groups()
  return int(a), op, int(b)


@pytest.mark.parametrize("name", ["word_arith", "arith"])
@pytest.mark.parametrize("kwargs", [
    dict(train_digits=(1, 1), val_digits=(1, 1), ops="+-*"),   # the same range: 300 problems
    dict(train_digits=(1, 2), val_digits=(2, 2), ops="+-"),    # word_arith's default ranges
    dict(train_digits=(2, 2), val_digits=(2, 2), ops="+-*", val_fraction=0.5),
])
def test_overlapping_digit_ranges_give_disjoint_splits(name, kwargs):
  """Where train and val operand ranges overlap, val draws only held-out problems and train never
  does: no val problem, nor its commuted form for + and *, is ever drawn for train, whatever the
  seeds. On the 1-digit space every problem is enumerated: the two splits partition it, and val
  holds about val_fraction of it."""
  task = tasks.get_task(name, **kwargs)
  train = {_problem(ex.prompt) for seed in range(4) for ex in task.train_examples(3000, seed)}
  val = {_problem(ex.prompt) for seed in range(4) for ex in task.val_examples(1000, seed)}
  commuted = {(b, op, a) for a, op, b in val if op in "+*"}
  assert train and val and not train & (val | commuted)
  a, op, b = zip(*(train | val))
  fraction = kwargs.get("val_fraction", 0.2)
  np.testing.assert_array_equal(tasks.arithmetic.held_out(a, op, b, fraction),
                                [p in val for p in train | val])
  if kwargs["val_digits"] == (1, 1):
    assert train | val == {(a, op, b) for a in range(10) for op in "+-*" for b in range(10)}
    assert 0.1 < len(val) / 300 < 0.3


def test_held_out_set_is_fixed_by_the_problem_alone():
  """A problem's split depends on neither the seed, the other enabled operations nor the operand
  order of a commutative operation; disjoint digit ranges draw exactly as before (no holdout)."""
  a_N = np.arange(0, 100).repeat(100)
  b_N = np.tile(np.arange(0, 100), 100)
  for op in "+-*":
    mask_N = tasks.arithmetic.held_out(a_N, op * a_N.size, b_N, 0.2)
    assert 0.18 < mask_N.mean() < 0.22
    if op in "+*":
      np.testing.assert_array_equal(mask_N, tasks.arithmetic.held_out(b_N, op * a_N.size, a_N, 0.2))
  only_plus = tasks.get_task("word_arith", ops="+", train_digits=(1, 2), val_digits=(1, 2))
  plus_minus = tasks.get_task("word_arith", ops="+-", train_digits=(1, 2), val_digits=(1, 2))
  val_plus = {ex.prompt for ex in only_plus.val_examples(500, seed=0)}
  train_plus_minus = {ex.prompt for ex in plus_minus.train_examples(3000, seed=1)}
  assert not val_plus & train_plus_minus
  rng = np.random.default_rng([0, 1])  # Task.examples' rng for ("val", seed 0)
  assert [_problem(ex.prompt) for ex in tasks.get_task("arith").val_examples(50, seed=0)] == \
      tasks.arithmetic.sample_problems(rng, 50, (100, 999), "+-")


@pytest.mark.parametrize("kwargs, match", [
    (dict(val_fraction=0.0), r"val_fraction: must be a number strictly between 0 and 1"),
    (dict(val_fraction=True), r"val_fraction: must be a number strictly between 0 and 1"),
    (dict(train_digits=(1, 1), val_digits=(1, 1), ops="+", val_fraction=1e-6),
     r"val_fraction: .* leave no val problem"),
])
def test_val_fraction_is_checked_naming_the_field(kwargs, match):
  for name in ("word_arith", "arith"):
    with pytest.raises(ValueError, match=rf"config\.task_kwargs\.{match}"):
      tasks.get_task(name, **kwargs)
