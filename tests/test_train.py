"""End-to-end RL training: every algorithm runs, resume equals uninterrupted, bad configs fail early."""

import json
import os
import sys

import numpy as np
import pytest

from proma_jax import train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
import reverse  # noqa: E402


def tiny_config(algorithm, warm_dir, steps=2):
  """A config small enough to compile and run two RL steps in a few seconds."""
  c = reverse.get_config(algorithm)
  c.steps = steps
  c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64)
  c.rollout.update(prompts_per_step=8, group_size=2)
  c.train.update(num_minibatches=2, num_microbatches=2)
  c.sft.update(steps=200, batch_size=32, lr=3e-3, checkpoint_dir=str(warm_dir))
  c.eval.update(every=2, num_examples=8)
  c.checkpoint.every = 1
  return c


@pytest.fixture(scope="module")
def warm_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("warm_start")


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r for r in records}  # the last record of a step wins


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", train.ALGORITHMS)
def test_each_algorithm_runs_two_steps(algorithm, warm_dir, tmp_path):
  """Each algorithm completes two RL steps and logs the interface metrics, all finite."""
  records = train.run(tiny_config(algorithm, warm_dir), str(tmp_path), progress=False)
  by_step = {r["step"]: r for r in records}
  assert sorted(by_step) == [0, 1, 2]
  for key in ("reward/mean", "kl/step", "kl/step_k3", "kl/init", "entropy", "grad/norm",
              "time/step_s", "time/sample_s", "time/update_s"):
    assert np.isfinite(by_step[2][key]), key
  assert "val/accuracy" in by_step[0] and "val/accuracy" in by_step[2]
  assert by_step[1]["kl/step_k3"] >= 0
  if algorithm == "grpo":
    assert "pg/clipfrac" in by_step[1]
  if algorithm.startswith("proma"):
    assert by_step[2]["proma/dropped"] == 0
  if algorithm in ("proma", "proma_both"):
    assert by_step[2]["proma/reduction"] > 0
  if algorithm in ("proma_intra", "proma_both"):
    assert by_step[2]["proma/intra_reduction"] > 0
  meta = json.load(open(tmp_path / "run.json"))
  assert meta["algorithm"] == algorithm and meta["task"] == "reverse"
  assert read_metrics(tmp_path) == by_step


@pytest.mark.slow
def test_resume_equals_uninterrupted(warm_dir, tmp_path):
  """Stopping after step 2 and rerunning gives the same metrics for steps 3-4 as one 4-step run."""
  full = train.run(tiny_config("proma", warm_dir, steps=4), str(tmp_path / "full"), progress=False)
  train.run(tiny_config("proma", warm_dir, steps=2), str(tmp_path / "split"), progress=False)
  resumed = train.run(tiny_config("proma", warm_dir, steps=4), str(tmp_path / "split"),
                      progress=False)
  assert [r["step"] for r in resumed] == [3, 4]
  full_by_step = {r["step"]: r for r in full}
  for record in resumed:
    expected = full_by_step[record["step"]]
    for key, value in record.items():
      if key.startswith("time/"):
        continue
      np.testing.assert_allclose(value, expected[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("field,value,match", [
    ("algorithm", "ppo", "config.algorithm"),
    ("rollout.group_size", 1, "config.rollout.group_size"),
    ("train.num_minibatches", 3, "config.train.num_minibatches"),
    ("train.num_microbatches", 5, "config.train.num_microbatches"),
    ("optim.lr", 0.0, "config.optim.lr"),
    ("proma.solver", "quick", "config.proma.solver"),
    ("proma.rank", 0, "config.proma.rank"),
    ("proma.scope", "some", "config.proma.scope"),
])
def test_invalid_config_names_the_field(field, value, match, tmp_path):
  """An invalid config raises ValueError naming the field, before any warm start or compilation."""
  c = tiny_config("proma", tmp_path / "never_created")
  section, _, name = field.rpartition(".")
  (c[section] if section else c)[name] = value
  with pytest.raises(ValueError, match=match):
    train.run(c, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "never_created").exists()
