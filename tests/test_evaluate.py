"""Scoring a policy outside training (`proma_jax.evaluate`).

  - greedy accuracy on a run's checkpoint equals the training loop's val/accuracy at that step
    (the tiny decoder, warm-started and trained two steps, so the accuracy is not trivially 0);
  - a pretrained run evaluated from its workdir and from its export gives the same responses;
  - the summary is the records' own numbers: accuracy, format rate, lengths, clipped fraction,
    pass@K and mean@K recomputed from responses.jsonl; extracted answers are the task's;
  - errors: --checkpoint with --workdir, a run of another model, no examples, a bad temperature;
    on the command line one line naming the problem.
"""

import json
import math
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

from proma_jax import evaluate, train
from proma_jax import export as export_cli
from proma_jax import runs
from helpers import FIXTURES, gsm8k_paths, make_run, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "smollm2_arith.py")


def arith_config(checkpoint: str):
  """configs/smollm2_arith.py on `checkpoint`, 6 val examples, 4 sequences per sampling call,
  prompts of at most 96 tokens."""
  sys.path.insert(0, str(REPO))
  from configs import smollm2_arith  # pylint: disable=import-outside-toplevel
  c = smollm2_arith.get_config("proma")
  c.model.checkpoint = checkpoint
  c.eval.num_examples = 6
  c.rollout.sample_batch = 4
  c.rollout.max_prompt_tokens = 96  # the tiny fixtures have 128 positions
  return c


def read_records(out) -> list[dict]:
  with open(pathlib.Path(out) / "responses.jsonl") as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_greedy_accuracy_equals_the_training_val_accuracy(warm_dir, tmp_path):
  c = tiny_config("grpo", warm_dir)
  c.task_kwargs.val_lengths = (2, 5)  # the train lengths: the tiny warm start solves a few
  records = train.run(c, str(tmp_path / "run"), progress=False)
  val = {r["step"]: r["val/accuracy"] for r in records if "val/accuracy" in r}
  assert val[2] > 0  # a test that 0 == 0 would show nothing
  summary = evaluate.run(c, str(tmp_path / "eval"), workdir=str(tmp_path / "run"),
                         progress=False)
  assert summary["accuracy"] == val[2]
  assert summary["model"].endswith("step 2") and summary["examples"] == c.eval.num_examples
  summary_1 = evaluate.run(c, str(tmp_path / "eval_1"), workdir=str(tmp_path / "run"), step=1,
                           progress=False)
  assert summary_1["model"].endswith("step 1")


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_is_the_chance_that_k_of_the_samples_hold_a_correct_one(n):
  """The estimator against every way of drawing k of the n samples (float64 enumeration)."""
  import itertools  # pylint: disable=import-outside-toplevel
  for correct in range(n + 1):
    flags = [True] * correct + [False] * (n - correct)
    for k in range(1, n + 1):
      draws = list(itertools.combinations(flags, k))
      expected = np.mean([any(draw) for draw in draws], dtype=np.float64)
      assert evaluate.pass_at_k(n, correct, k) == pytest.approx(expected, abs=1e-12), (correct, k)
  # Large n, where the binomials overflow a float: exact integers.
  expected = 1 - math.comb(197, 100) / math.comb(200, 100)
  assert evaluate.pass_at_k(200, 3, 100) == pytest.approx(expected, rel=1e-12)
  with pytest.raises(ValueError, match="1 <= k <= n"):
    evaluate.pass_at_k(n, 0, n + 1)


def test_summary_is_the_records_numbers(tmp_path):
  c = arith_config(str(FIXTURES / "tiny_qwen3"))
  summary = evaluate.run(c, str(tmp_path / "eval"), samples=3, temperature=1.0, progress=False)
  records = read_records(tmp_path / "eval")
  assert len(records) == summary["examples"] == 6
  assert summary == json.loads((tmp_path / "eval" / "summary.json").read_text())
  assert summary["accuracy"] == pytest.approx(np.mean([r["reward"] for r in records]))
  assert summary["format_rate"] == pytest.approx(np.mean([r["formatted"] for r in records]))
  assert summary["length_mean"] == pytest.approx(np.mean([r["length"] for r in records]))
  assert summary["length_max"] == max(r["length"] for r in records) <= c.rollout.max_new_tokens
  assert summary["clipped_frac"] == pytest.approx(np.mean([r["clipped"] for r in records]))
  rewards = np.asarray([[s["reward"] for s in r["samples"]] for r in records])
  assert rewards.shape == (6, 3)
  assert summary["mean@3"] == pytest.approx(rewards.mean())
  assert summary["pass@3"] == pytest.approx(np.mean(np.any(rewards >= 1, axis=1)))
  assert summary["pass@1"] == pytest.approx(np.mean(rewards >= 1))  # the fraction correct
  task_answer = evaluate.policy_lib.make_policy(c)[0].task.answer_fn
  for r in records:
    assert r["extracted"] == task_answer(r["response"])
    assert r["prompt"].startswith("What is") and r["gold"].lstrip("-").isdigit()
  assert summary["tokens_per_s"] > 0


@pytest.mark.slow  # three evaluations; tests/test_export.py checks the export bit for bit, fast
def test_a_run_and_its_export_evaluate_alike(tmp_path):
  spec = str(FIXTURES / "tiny_qwen3")
  make_run(tmp_path / "run", spec, steps=(1,))
  export_cli.export_run(str(tmp_path / "run"), str(tmp_path / "export"))
  c = arith_config(spec)
  from_run = evaluate.run(c, str(tmp_path / "a"), workdir=str(tmp_path / "run"), progress=False)
  from_export = evaluate.run(c, str(tmp_path / "b"), checkpoint=str(tmp_path / "export"),
                             progress=False)
  base = evaluate.run(c, str(tmp_path / "c"), progress=False)
  assert read_records(tmp_path / "a") == read_records(tmp_path / "b")
  assert read_records(tmp_path / "a") != read_records(tmp_path / "c")  # the params moved
  assert from_run["accuracy"] == from_export["accuracy"]
  assert base["model"] == spec


def test_bad_requests_are_refused(tmp_path):
  spec = str(FIXTURES / "tiny_qwen3")
  make_run(tmp_path / "run", spec, steps=(1,))
  c = arith_config(spec)
  with pytest.raises(evaluate.EvaluateError, match="not both"):
    evaluate.run(c, str(tmp_path / "e"), checkpoint=spec, workdir=str(tmp_path / "run"))
  with pytest.raises(evaluate.EvaluateError, match="num_examples must be >= 1"):
    evaluate.run(c, str(tmp_path / "e"), num_examples=0)
  with pytest.raises(evaluate.EvaluateError, match="temperature"):
    evaluate.run(c, str(tmp_path / "e"), samples=2, temperature=0.0)
  with pytest.raises(runs.RunError, match="the run trained model.checkpoint"):
    evaluate.run(arith_config(str(FIXTURES / "tiny_llama")), str(tmp_path / "e"),
                 workdir=str(tmp_path / "run"))
  with pytest.raises(runs.RunError, match="the steps there are \\[1\\]"):
    evaluate.run(c, str(tmp_path / "e"), workdir=str(tmp_path / "run"), step=4)


@pytest.mark.slow  # a subprocess; tests/test_cli_errors.py keeps the command-line form fast
def test_the_command_line_evaluates_and_names_problems(tmp_path):
  spec = str(FIXTURES / "tiny_qwen3")
  base = [sys.executable, "-m", "proma_jax.evaluate", f"--config={CONFIG}:proma",
          f"--checkpoint={spec}", "--config.eval.num_examples=2",
          "--config.rollout.max_prompt_tokens=96"]
  result = subprocess.run(base + [f"--out={tmp_path / 'eval'}"], capture_output=True, text=True,
                          timeout=1800, cwd=REPO)
  assert result.returncode == 0, result.stderr
  assert "accuracy" in result.stdout and (tmp_path / "eval" / "summary.json").is_file()
  result = subprocess.run(base + [f"--out={tmp_path / 'eval'}", f"--workdir={tmp_path}"],
                          capture_output=True, text=True, timeout=1800, cwd=REPO)
  assert result.returncode == 1 and "error: give --checkpoint or --workdir, not both" in (
      result.stderr)
  assert "Traceback" not in result.stderr


@pytest.mark.slow  # a 2-device subprocess beside the 1-device run
def test_two_devices_give_the_one_device_responses(tmp_path):
  """--config.mesh.data=2 on two host devices: each sampling call split over both (6 examples in
  calls of 4 rows, the last filled up), the same greedy and sampled responses as one device."""
  spec = str(FIXTURES / "tiny_qwen3")
  c = arith_config(spec)
  evaluate.run(c, str(tmp_path / "one"), samples=2, progress=False)
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                                    + " --xla_force_host_platform_device_count=2"))
  result = subprocess.run(
      [sys.executable, "-m", "proma_jax.evaluate", f"--config={CONFIG}:proma",
       f"--checkpoint={spec}", "--config.eval.num_examples=6", "--config.rollout.sample_batch=4",
       "--config.rollout.max_prompt_tokens=96", "--config.mesh.data=2", "--samples=2",
       f"--out={tmp_path / 'two'}"], capture_output=True, text=True, timeout=1800, cwd=REPO,
      env=env)
  assert result.returncode == 0, result.stderr
  summary = json.loads((tmp_path / "two" / "summary.json").read_text())
  assert summary["devices"] == 2
  assert read_records(tmp_path / "two") == read_records(tmp_path / "one")
  with pytest.raises(evaluate.EvaluateError, match="do not split over"):
    evaluate._sample(evaluate.policy_lib.make_policy(c)[0]._replace(sample_batch=3), None,
                     [None] * 3, None, "", greedy=True, temperature=1.0, progress=False,
                     mesh=types.SimpleNamespace(devices=np.empty(2)))  # only its size is read


@pytest.mark.slow
def test_gsm8k_test_split_whole_and_through_the_sampler(tmp_path):
  """--num_examples=1319 on GSM8K's val split draws every test problem once (the full run through
  the sampler, 1319 prompts in calls of 128, is recorded in experiments/README.md: 53 s here);
  64 of them go through configs/qwen3_gsm8k.py's prompts, buckets and sampling calls of 32 with
  the tiny Qwen3 fixture (8 new tokens)."""
  _, test_path = gsm8k_paths()
  with open(test_path) as f:
    questions = {json.loads(line)["question"] for line in f if line.strip()}
  sys.path.insert(0, str(REPO))
  from configs import qwen3_gsm8k  # pylint: disable=import-outside-toplevel
  c = qwen3_gsm8k.get_config("proma")
  c.model.update(checkpoint=str(FIXTURES / "tiny_qwen3"), max_len=1024, dtype="float32",
                 remat=False)
  c.rollout.update(max_new_tokens=8, max_prompt_tokens=1000, sample_batch=32)
  policy, _, _ = evaluate.load_policy(c)
  every = policy.task.examples("val", len(questions), seed=c.eval.seed)
  assert len(every) == 1319
  assert {ex.prompt.rpartition("\n\n")[0] for ex in every} == questions
  summary = evaluate.run(c, str(tmp_path / "eval"), num_examples=64, progress=False)
  records = read_records(tmp_path / "eval")
  assert summary["examples"] == len(records) == 64
  assert len({r["prompt"] for r in records} & {ex.prompt for ex in every}) == 64
  assert summary["length_max"] <= 8
