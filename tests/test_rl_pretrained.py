"""RL on a pretrained checkpoint end to end: the tiny Qwen3 fixture on the real GSM8K files.

  - proma runs two steps through `train.run`: finite metrics, the pretrained-run metrics
    (reward/format, response/*, time/*), responses within max_new_tokens, run.json's warm start
    naming the checkpoint, TensorBoard scalars equal to metrics.jsonl, and params that move;
  - `python -m proma_jax.train --config=configs/qwen3_gsm8k.py:proma` with command-line overrides
    (None-valued str/int fields included), SIGKILLed after its step-1 checkpoint and rerun, writes
    the metrics.jsonl of an uninterrupted run, time/* aside;
  - a GSM8K config without a checkpoint, or with a missing one, is refused before the workdir
    exists;
  - before step 0 and before run.json, metrics.jsonl or tensorboard/ exist, an over-long prompt
    is refused naming its file, line and tokens (or truncated or skipped with too_long), and a
    chat template that cannot render is refused naming its file and the Jinja error; prompt
    lengths are the policy's and are counted once per process.

The data are the first GSM8K_RECORDS records of ../shared/data/gsm8k/{train,test}.jsonl beside the
repository (the tests skip without them). Compilation dominates the cost, so the in-process runs
and the command line share one set of settings (`TINY`): one prompt width, and sampling and
log-prob programs the command line loads from the run's JAX cache (tests/conftest.py).
"""

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib

import jax
import numpy as np
import pytest

from proma_jax import policy as policy_lib
from proma_jax import tasks, train, trainer as trainer_lib, writers
from proma_jax.checkpoint import Checkpointer
from proma_jax.config import base_config, validate_config
from proma_jax.models import loading
from proma_jax.tasks import gsm8k
from helpers import gsm8k_paths, read_scalars

REPO = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "tests" / "fixtures" / "hf" / "tiny_qwen3"
MAX_NEW_TOKENS = 8
# The first GSM8K_RECORDS records of either file: their chat-template prompts take at most 461
# tokens through the fixture's tokenizer (GSM8K's longest, 828, would make every log-prob pass
# several times slower). A bucket as wide as max_prompt_tokens gives every batch the same prompt
# width, so nothing compiles twice.
GSM8K_RECORDS = 8
PROMPT_TOKENS = 512
# The tiny run, set the same way in process and on the command line. The model fields undo
# configs/qwen3_gsm8k.py's bf16 compute, remat and chunked log-softmax, and relative_bound is
# that config's, so its proma programs are the in-process run's.
TINY = {
    "model.checkpoint": str(CHECKPOINT),
    "model.max_len": 1024,  # GSM8K prompts exceed the fixture's max_position_embeddings of 128
    "model.dtype": "float32", "model.remat": False, "model.logits_chunk": 0,
    "rollout.max_new_tokens": MAX_NEW_TOKENS,
    "rollout.max_prompt_tokens": PROMPT_TOKENS, "rollout.bucket": PROMPT_TOKENS,
    "rollout.prompts_per_step": 2, "rollout.group_size": 2,
    "train.num_minibatches": 1, "train.num_microbatches": 2,
    "eval.num_examples": 2, "eval.every": 1, "checkpoint.every": 1,
    "proma.relative_bound": 0.5,
}
NEW_METRICS = ("reward/format", "reward/errors", "response/length", "response/length_max",
               "response/clipped_frac", "time/sample_s", "time/logprob_s", "time/update_s")


def read_records(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def hashed_reward(text: str, terminated: bool, answer: str) -> float:
  """A deterministic reward in [0, 1) of the response text alone (crc32 / 2^32)."""
  del terminated, answer
  return zlib.crc32(text.encode()) / 2**32


def hashed_gsm8k_task(**kwargs) -> tasks.Task:
  """GSM8K's prompts, format check and val split, rewarded by `hashed_reward`."""
  return dataclasses.replace(tasks.gsm8k_task(**kwargs), name="gsm8k_hashed",
                             reward_fn=hashed_reward)


@pytest.mark.slow
# One algorithm, in process and on the command line: what the pretrained path adds (loading,
# chat-template prompts, buckets, scores, sinks) is the same for every algorithm, each algorithm's
# update is tested on the tiny decoder in tests/test_train.py, and each compilation here costs
# 15-60 s of the suite's 10-minute budget. The command line then loads the in-process run's
# programs from the JAX cache.
@pytest.mark.parametrize("algorithm", ("proma",))
def test_two_steps_record_finite_metrics_and_move_the_params(algorithm, tmp_path, monkeypatch):
  """Two steps through `train.run`:

  - records for steps 0, 1, 2, every value finite, val/accuracy in [0, 1], the pretrained-run
    metrics present, responses within max_new_tokens, no reward-function errors;
  - run.json names the checkpoint as the warm start (a pretrained model has no SFT warm start);
  - TensorBoard's scalars are metrics.jsonl's values in float32;
  - some step has a non-zero gradient and the final checkpoint's params differ from the
    pretrained ones (restored with the run's own state structure).

  The reward is `hashed_reward`, through a task "gsm8k_hashed" registered for this test: the
  fixture's random weights never write a GSM8K answer, so the real reward is 0 everywhere, every
  advantage and gradient is zero and nothing would show that the params move. A hash of the text
  in [0, 1) differs between two sampled responses, so each group's advantages are non-zero. A new
  name rather than a replaced "gsm8k" keeps the real task intact, also in `trainer.trainer_for`'s
  per-process cache, which keys trainers by config (task name included); the command-line test
  runs the real reward. One test per algorithm, not one per property, so that xdist never
  compiles an algorithm twice.
  """
  train_path, test_path = gsm8k_paths()
  monkeypatch.setitem(tasks.TASKS, "gsm8k_hashed", hashed_gsm8k_task)
  c = base_config("gsm8k_hashed", algorithm)
  c.update_from_flattened_dict(TINY)
  c.task_kwargs.train_path, c.task_kwargs.test_path = train_path, test_path
  c.task_kwargs.max_examples = GSM8K_RECORDS
  c.steps = 2
  workdir = str(tmp_path / "run")
  records = train.run(c, workdir, progress=False)

  assert records == read_records(workdir)
  assert [r["step"] for r in records] == [0, 1, 2]
  for record in records:
    for key, value in record.items():
      assert isinstance(value, (int, float)) and math.isfinite(value), (record["step"], key, value)
    assert 0.0 <= record["val/accuracy"] <= 1.0
  for record in records[1:]:
    assert set(NEW_METRICS) <= set(record), sorted(set(NEW_METRICS) - set(record))
    assert 1 <= record["response/length"] <= record["response/length_max"] <= MAX_NEW_TOKENS
    assert 0.0 <= record["reward/format"] <= 1.0 and 0.0 <= record["response/clipped_frac"] <= 1.0
    assert record["reward/errors"] == 0

  meta = json.loads(pathlib.Path(workdir, "run.json").read_text())
  assert meta["warm_start"] == {"checkpoint": str(CHECKPOINT)}
  assert meta["algorithm"] == algorithm and meta["config"]["model"]["max_len"] == 1024

  logdir = os.path.join(workdir, writers.TENSORBOARD_DIR)
  assert any("tfevents" in name for name in os.listdir(logdir))
  scalars = read_scalars(logdir)
  for key in ("val/accuracy", "reward/mean", "grad/norm", "response/length", "time/sample_s"):
    expected = [(r["step"], np.float32(r[key])) for r in records if key in r]
    assert [(step, np.float32(value)) for step, value in scalars[key]] == expected, key

  assert max(r["grad/norm"] for r in records[1:]) > 0
  _, initial = policy_lib.make_policy(c)
  template = {"params": initial, "opt_state": trainer_lib.make_optimizer(c).init(initial)}
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
  step, state, _ = checkpointer.restore(template)
  checkpointer.close()
  assert step == c.steps
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                       initial, state["params"])
  assert any(jax.tree.leaves(moved))


# ---------------------------------------------------------------------------------------------
# The command line: configs/qwen3_gsm8k.py, SIGKILL after step 1, resume.


def cli(workdir, train_path, test_path) -> list[str]:
  return [sys.executable, "-m", "proma_jax.train", "--config=configs/qwen3_gsm8k.py:proma",
          f"--workdir={workdir}", f"--config.task_kwargs.train_path={train_path}",
          f"--config.task_kwargs.test_path={test_path}", "--config.steps=3",
          *(f"--config.{field}={value}" for field, value in TINY.items())]


def first_records(paths: tuple[str, str], directory: pathlib.Path) -> tuple[str, str]:
  """Copies of the first GSM8K_RECORDS lines of the train and test files under `directory`: the
  command line cannot set task_kwargs.max_examples (not a field of configs/qwen3_gsm8k.py)."""
  copies = []
  for path in paths:
    with open(path) as f:
      lines = [next(f) for _ in range(GSM8K_RECORDS)]
    copy = directory / os.path.basename(path)
    copy.write_text("".join(lines))
    copies.append(str(copy))
  return copies[0], copies[1]


def without_times(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


@pytest.mark.slow
def test_cli_qwen3_gsm8k_killed_and_resumed_equals_uninterrupted(tmp_path):
  """configs/qwen3_gsm8k.py loads with its command-line overrides (model.checkpoint and
  model.max_len are None-valued str/int fields there); a run SIGKILLed once its step-1
  checkpoint exists, rerun with the same command, resumes from a checkpoint and leaves the
  uninterrupted run's metrics.jsonl, every value equal except time/*. The real GSM8K reward is 0
  on random weights, so this also runs PROMA on all-zero advantages: every value stays finite."""
  train_path, test_path = first_records(gsm8k_paths(), tmp_path)
  reference, killed = tmp_path / "reference", tmp_path / "killed"
  # The processes share compiled programs through the run's JAX cache (tests/conftest.py).
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  ref = subprocess.run(cli(reference, train_path, test_path), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1800)
  assert ref.returncode == 0, ref.stdout + ref.stderr
  expected = read_records(reference)
  assert [r["step"] for r in expected] == [0, 1, 2, 3]
  for record in expected:
    assert all(math.isfinite(v) for v in record.values()), record
  assert all(r["response/length_max"] <= MAX_NEW_TOKENS for r in expected[1:])
  meta = json.loads((reference / "run.json").read_text())
  assert meta["warm_start"] == {"checkpoint": str(CHECKPOINT)}
  # The resume below compares the checkpoint's files against this (loading.checkpoint_fingerprint).
  assert meta["checkpoint_fingerprint"] == loading.checkpoint_fingerprint(CHECKPOINT)
  stored = meta["config"]
  assert stored["model"]["max_len"] == 1024
  assert stored["rollout"]["max_new_tokens"] == MAX_NEW_TOKENS
  assert stored["optim"]["lr"] == 2e-6 and stored["rollout"]["sample_batch"] == 128  # the config's

  proc = subprocess.Popen(cli(killed, train_path, test_path), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 1800  # no tight limit: a busy machine must not fail the test
  try:
    while not (killed / "checkpoints" / "1").is_dir():
      assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
      time.sleep(0.02)
  finally:
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
  assert proc.returncode == -signal.SIGKILL, out
  assert 1 in [r["step"] for r in read_records(killed)]

  resumed = subprocess.run(cli(killed, train_path, test_path), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=1800)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  match = re.search(rf"resuming {re.escape(str(killed))} from step (\d+)", resumed.stdout)
  assert match and 1 <= int(match.group(1)) < 3, resumed.stdout
  got = read_records(killed)
  assert without_times(got) == without_times(expected)
  assert all(any(k.startswith("time/") for k in r) for r in got[1:])


# ---------------------------------------------------------------------------------------------
# Config validation (nothing compiled, no data needed).


def test_gsm8k_without_a_checkpoint_is_refused_before_the_workdir(tmp_path):
  """GSM8K is a text task: no checkpoint, or one that does not exist, raises ValueError naming
  config.model.checkpoint (and the path) before the workdir is created."""
  workdir = tmp_path / "run"
  c = base_config("gsm8k", "proma")
  with pytest.raises(ValueError, match=r"config\.model\.checkpoint: task 'gsm8k' is a text task"):
    validate_config(c)
  with pytest.raises(ValueError, match=r"config\.model\.checkpoint"):
    train.run(c, str(workdir), progress=False)
  assert not workdir.exists()

  missing = tmp_path / "no_such_model"
  c.model.checkpoint = str(missing)
  with pytest.raises(ValueError, match=rf"config\.model\.checkpoint: .*{re.escape(str(missing))}"):
    train.run(c, str(workdir), progress=False)
  assert not workdir.exists()

  # Prompts + responses longer than the model's positions: refused up front, not at the first
  # batch of long prompts (the fixture has 128 positions; model.max_len raises the limit).
  c.model.checkpoint = str(CHECKPOINT)
  c.rollout.max_prompt_tokens, c.rollout.max_new_tokens = 512, 8
  with pytest.raises(ValueError, match=r"config\.rollout\.max_prompt_tokens: 512 \+ .* 128 "):
    train.run(c, str(workdir), progress=False)
  assert not workdir.exists()
  c.model.max_len = 520
  validate_config(c)


# ---------------------------------------------------------------------------------------------
# What the tokenizer makes of the task, checked before step 0 (the fixture's tokenizer, small
# GSM8K-format files written here: no GSM8K data needed, nothing compiled).

# About 100 kB: a question no model's prompt window holds.
LONG_QUESTION = "A farmer counts apples in the orchard. " * 2600 + "How many apples are there?"
RUN_FILES = ("run.json", "metrics.jsonl", writers.TENSORBOARD_DIR)


def small_gsm8k_files(directory: pathlib.Path, long_question: str | None = None):
  """train.jsonl of two short questions; test.jsonl of one, then `long_question` on line 2."""
  def write(name, questions):
    path = directory / name
    path.write_text("".join(json.dumps({"question": q, "answer": f"#### {i}"}) + "\n"
                            for i, q in enumerate(questions)))
    return str(path)

  tests = ["What is 3 + 4?"] + ([long_question] if long_question else [])
  return write("train.jsonl", ["What is 1 + 1?", "What is 2 + 5?"]), write("test.jsonl", tests)


def fixture_config(train_path, test_path, checkpoint=CHECKPOINT, **task_kwargs):
  """A one-step GSM8K config on the fixture (`TINY`: prompts of at most 512 tokens)."""
  c = base_config("gsm8k", "proma")
  c.update_from_flattened_dict(TINY)
  c.model.checkpoint = str(checkpoint)
  c.task_kwargs.train_path, c.task_kwargs.test_path = train_path, test_path
  c.task_kwargs.update(task_kwargs)
  c.steps = 1
  return c


def chat_ids(tokenizer, prompt: str) -> list[int]:
  return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True)


def test_an_over_long_gsm8k_prompt_is_refused_before_the_run_writes_anything(tmp_path):
  """A 100 kB question on line 2 of the test file: train.run raises a ValueError naming the file,
  the line and the prompt's tokens (chat template included, as the policy encodes it) before
  step 0, and the workdir holds no run.json, metrics.jsonl or tensorboard/ (it used to fail when
  the prompt was first drawn, naming neither file nor line, on every resume too)."""
  train_path, test_path = small_gsm8k_files(tmp_path, LONG_QUESTION)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as error:
    train.run(fixture_config(train_path, test_path), str(workdir), progress=False)
  match = re.match(rf"{re.escape(test_path)}, line 2: the prompt is (\d+) tokens as the policy "
                   r"encodes it .*> config\.rollout\.max_prompt_tokens=512", str(error.value))
  assert match, str(error.value)
  with loading.open_checkpoint(CHECKPOINT) as ckpt:
    tokenizer = ckpt.load_tokenizer()
  prompt = f"{LONG_QUESTION}\n\n{gsm8k.DEFAULT_INSTRUCTION}"
  assert int(match.group(1)) == len(chat_ids(tokenizer, prompt))
  assert not any((workdir / name).exists() for name in RUN_FILES)


@pytest.mark.parametrize("too_long", ["truncate", "skip"])
def test_too_long_truncate_or_skip_fits_every_prompt_in_the_policys_tokens(tmp_path, too_long,
                                                                            caplog):
  """truncate: the long question keeps its end (and the instruction) within max_prompt_tokens
  as the policy encodes it; skip: it is never drawn. Either way a warning counts it, and every
  prompt the policy's task draws encodes within the limit."""
  train_path, test_path = small_gsm8k_files(tmp_path, LONG_QUESTION)
  with caplog.at_level("WARNING"):
    policy, _ = policy_lib.make_policy(fixture_config(train_path, test_path, too_long=too_long))
  verb = {"truncate": "truncated", "skip": "skipped"}[too_long]
  assert (f"{test_path}: 1 of 2 records over config.rollout.max_prompt_tokens=512 were {verb}"
          in caplog.text)
  val = policy.task.val_examples(20, seed=0)
  assert all(len(policy_lib.prompt_ids(policy, ex.prompt)) <= PROMPT_TOKENS for ex in val)
  prompts, _ = policy_lib.encode(policy, val)
  assert prompts.shape[1] <= PROMPT_TOKENS
  cut = {ex.prompt for ex in val if ex.answer == "1"}
  if too_long == "skip":
    assert not cut
    return
  (prompt,) = cut
  instruction = "\n\n" + gsm8k.DEFAULT_INSTRUCTION
  assert prompt.endswith(instruction)
  question = prompt[:-len(instruction)]
  assert LONG_QUESTION.endswith(question) and question.endswith("How many apples are there?")
  assert LONG_QUESTION[-len(question) - 1] == " " and not question[0].isspace()  # a whole word
  assert len(policy_lib.prompt_ids(policy, prompt)) > PROMPT_TOKENS - 20  # nearly the limit


def test_prompt_lengths_are_the_policys_and_a_second_check_encodes_nothing(tmp_path,
                                                                           monkeypatch):
  """prompt_lengths counts what prompt_ids encodes (chat template, or BOS and raw text); a config
  checked twice in one process (make_policy twice) encodes its prompts once."""
  with loading.open_checkpoint(CHECKPOINT) as ckpt:
    tokenizer = ckpt.load_tokenizer()
  prompts = ["What is 1 + 1?", "Two\n\nlines", " spaced  out ", "ünïcode 世界"]
  for chat in (True, False):
    policy = policy_lib.Policy(None, tokenizer, None, None, None, 8, chat_template=chat)
    assert policy_lib.prompt_lengths(tokenizer, chat, prompts) == [
        len(policy_lib.prompt_ids(policy, p)) for p in prompts]

  encoded = []
  original = type(tokenizer).encode_batch
  monkeypatch.setattr(type(tokenizer), "encode_batch",
                      lambda self, texts: encoded.extend(texts) or original(self, texts))
  monkeypatch.setattr(policy_lib, "_PROMPT_LENGTHS", type(policy_lib._PROMPT_LENGTHS)())
  c = fixture_config(*small_gsm8k_files(tmp_path))
  policy_lib.make_policy(c)
  assert len(encoded) == 3  # the 2 + 1 prompts, in one batch
  policy_lib.make_policy(c)
  assert len(encoded) == 3


@pytest.mark.parametrize("file, content, source, error", [
    ("tokenizer_config.json", "{{ raise_exception('this template is broken') }}",
     "tokenizer_config.json (chat_template)", "TemplateError: this template is broken"),
    ("chat_template.jinja", "{% for m in messages %}\n{{ m | no_such_filter }}{% endfor %}",
     "chat_template.jinja", "TemplateAssertionError: No filter named 'no_such_filter'."),
])
def test_a_chat_template_that_cannot_render_is_refused_before_the_run_writes_anything(
    tmp_path, file, content, source, error):
  """A copy of the fixture whose chat template fails (raise_exception in tokenizer_config.json,
  an unknown filter in chat_template.jinja): train.run raises a ValueError naming the template's
  file and the Jinja error, and the workdir holds no run.json, metrics.jsonl or tensorboard/ (it
  used to fail at the first prompt, after all three existed)."""
  checkpoint = tmp_path / "broken_template"
  shutil.copytree(CHECKPOINT, checkpoint)
  if file == "tokenizer_config.json":
    config = json.loads((checkpoint / file).read_text())
    (checkpoint / file).write_text(json.dumps({**config, "chat_template": content}))
  else:
    (checkpoint / file).write_text(content)
  workdir = tmp_path / "run"
  c = fixture_config(*small_gsm8k_files(tmp_path), checkpoint=checkpoint)
  with pytest.raises(ValueError) as raised:
    train.run(c, str(workdir), progress=False)
  message = str(raised.value)
  assert message.startswith(f"{checkpoint / source}: the chat template fails on a sample user "
                            f"message: {error}"), message
  assert "config.rollout.chat_template=False" in message
  assert not any((workdir / name).exists() for name in RUN_FILES)
