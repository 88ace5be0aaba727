"""End-to-end RL training: every algorithm runs, resume equals uninterrupted, bad configs fail early."""

import json
import os
import re

import chex
import jax
import ml_collections
import numpy as np
import pytest

from proma_jax import train
from proma_jax import trainer as trainer_lib
from proma_jax.config import ALGORITHMS, validate_config
from helpers import read_metrics, tiny_config


# reinforce is grpo's loop with the unclipped loss (tests/test_losses.py); its whole RL runs are
# tests/test_run_records.py's command-line runs (configs/reverse.py:reinforce).
@pytest.mark.slow
@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a != "reinforce"])
def test_each_algorithm_runs_two_steps(algorithm, warm_dir, tmp_path):
  """Each algorithm completes two RL steps and logs the interface metrics, all finite."""
  records = train.run(tiny_config(algorithm, warm_dir), str(tmp_path), progress=False)
  by_step = {r["step"]: r for r in records}
  assert sorted(by_step) == [0, 1, 2]
  for key in ("reward/mean", "kl/step", "kl/step_k3", "kl/init", "entropy", "grad/norm",
              "time/step_s", "time/sample_s", "time/update_s"):
    assert np.isfinite(by_step[2][key]), key
  for step in (0, 2):
    assert 0 <= by_step[step]["val/accuracy"] <= 1 and 0 <= by_step[step]["val_id/accuracy"] <= 1
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


INF, NAN = float("inf"), float("nan")
# (field, invalid value): every numeric field of proma_jax.config.base_config, each out of range
# (and non-finite for the floats), plus the string fields with a closed set of values.
INVALID_FIELDS = [
    ("seed", -1), ("steps", -1),
    ("model.d_model", 0), ("model.n_layers", 0), ("model.n_heads", 0), ("model.n_kv_heads", 0),
    ("model.n_kv_heads", 3), ("model.head_dim", 0), ("model.head_dim", 15), ("model.mlp_dim", 0),
    ("model.dtype", "float16"), ("model.param_dtype", "fp32"), ("model.seed", -1),
    ("model.logits_chunk", -1), ("model.max_len", 0), ("model.attention_impl", "flash"),
    ("model.checkpoint", "/nonexistent/model.gguf"),
    ("rollout.prompts_per_step", 0), ("rollout.group_size", 1), ("rollout.temperature", INF),
    ("rollout.temperature", NAN), ("rollout.temperature", 0.0), ("rollout.extra_new_tokens", -1),
    ("rollout.max_new_tokens", 0), ("rollout.max_prompt_tokens", 0), ("rollout.bucket", 0),
    ("rollout.top_p", 0.0), ("rollout.top_p", 1.5),
    ("rollout.sample_batch", -1),
    ("train.num_minibatches", 0), ("train.num_microbatches", 0), ("train.num_epochs", 0),
    ("optim.lr", INF), ("optim.lr", NAN), ("optim.lr", -1e-3), ("optim.b1", 1.0),
    ("optim.b1", -0.1), ("optim.b2", 1.5), ("optim.b2", NAN), ("optim.weight_decay", -1e-4),
    ("optim.weight_decay", INF), ("optim.max_grad_norm", 0.0), ("optim.max_grad_norm", INF),
    ("grpo.eps_low", -0.1), ("grpo.eps_low", 1.5), ("grpo.eps_high", -0.1), ("grpo.eps_high", INF),
    ("grpo.dual_clip", 1.0), ("grpo.dual_clip", INF),
    ("proma.shrinkage", -1.0), ("proma.shrinkage", NAN), ("proma.ridge", -1.0),
    ("proma.ridge", INF), ("proma.relative_bound", -0.5), ("proma.relative_bound", INF),
    ("proma.skip_fraction", 1.5), ("proma.skip_fraction", NAN), ("proma.rank", 0),
    ("proma.intra_shrinkage", -1.0), ("proma.intra_shrinkage", INF), ("proma.power_iters", -1),
    ("proma.range_finder_seed", -1),
    ("mesh.data", 0), ("mesh.fsdp", 0), ("mesh.fsdp_min_size", -1),
    ("distributed.num_processes", 0), ("distributed.process_id", 1),
    ("distributed.coordinator", "localhost"),
    ("eval.every", 0), ("eval.num_examples", 0), ("eval.seed", -1),
    ("checkpoint.every", 0), ("checkpoint.max_to_keep", 0),
    ("sft.steps", -1), ("sft.batch_size", 0), ("sft.lr", 0.0), ("sft.lr", INF), ("sft.seed", -1),
    ("sft.checkpoint_dir", ""),
    ("logging.wandb_mode", "sometimes"),
    ("logging.wandb_project", ""),
    ("task_kwargs.noise", NAN),  # any float anywhere, task_kwargs included, must be finite
]


def _set_field(c, field, value):
  *parents, leaf = field.split(".")
  node = c
  for parent in parents:
    node = node[parent]
  node[leaf] = value


@pytest.mark.parametrize("field,value", INVALID_FIELDS, ids=[f"{f}={v!r}" for f, v in INVALID_FIELDS])
def test_each_numeric_field_is_range_checked(field, value, tmp_path):
  """Every config field out of its range (NaN and inf included) is refused naming config.<field>,
  before the workdir, the warm start or anything compiled exists."""
  c = tiny_config("proma", tmp_path / "never_created")
  _set_field(c, field, value)
  with pytest.raises(ValueError, match=rf"config\.{re.escape(field)}: "):
    train.run(c, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "never_created").exists() and not (tmp_path / "run").exists()


def test_every_numeric_config_field_has_an_invalid_case():
  """INVALID_FIELDS covers every numeric field of the base config (so a new one gets a range)."""
  from proma_jax.config import base_config

  def numeric_fields(node, prefix=""):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        yield from numeric_fields(value, f"{prefix}{key}.")
      elif isinstance(value, (int, float)) and not isinstance(value, bool) or (
          key == "relative_bound"):
        yield f"{prefix}{key}"

  c = base_config("reverse", "proma")
  del c.task_kwargs
  assert set(numeric_fields(c)) - {f for f, _ in INVALID_FIELDS} == set()


def test_valid_edge_values_are_accepted(tmp_path):
  """The range checks do not refuse the boundary values that are meaningful."""
  c = tiny_config("proma", tmp_path / "warm")
  for field, value in [("steps", 0), ("optim.b1", 0.0), ("optim.weight_decay", 0.0),
                       ("proma.relative_bound", None), ("proma.relative_bound", 0.0),
                       ("proma.power_iters", 0), ("proma.shrinkage", 0.0), ("grpo.dual_clip", None),
                       ("grpo.eps_low", 1.0), ("rollout.extra_new_tokens", 0), ("sft.steps", 0),
                       ("model.dtype", "bfloat16"), ("checkpoint.max_to_keep", 1)]:
    _set_field(c, field, value)
    validate_config(c)


def test_warm_start_key_is_the_recipe_not_the_path(tmp_path, monkeypatch):
  """A relative and an absolute spelling of one cache directory name one warm start; a change
  of recipe names another."""
  from proma_jax import policy as policy_lib
  from proma_jax import sft
  monkeypatch.chdir(tmp_path)
  relative = tiny_config("proma", "cache")
  absolute = tiny_config("proma", tmp_path / "cache")
  other = tiny_config("proma", "cache")
  other.sft.steps += 1
  policy, _ = policy_lib.make_policy(relative)
  assert sft.warm_start_dir(relative, policy) == sft.warm_start_dir(absolute, policy)
  assert sft.warm_start_dir(relative, policy).startswith(str(tmp_path / "cache"))
  assert sft.warm_start_dir(other, policy) != sft.warm_start_dir(relative, policy)


def test_warm_start_is_trained_anew_when_its_data_file_changes(tmp_path, capsys):
  """The jsonl task's warm start is keyed by the content of train_path, not its name: a rerun on
  the unchanged file loads the cached warm start, a rerun after an edit trains a new one in
  another directory (the old one is not reused for data it never saw)."""
  import jsonl as jsonl_config  # configs/jsonl.py
  from proma_jax import sft
  data = tmp_path / "my.jsonl"
  records = [{"prompt": f"rev:{w}=", "answer": w[::-1]} for w in
             ("ab", "abc", "cab", "bca", "abcd", "dcba", "ba", "cba")]
  data.write_text("".join(json.dumps(r) + "\n" for r in records))
  c = jsonl_config.get_config("proma")
  c.task_kwargs.train_path = str(data)
  c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64)
  c.sft.update(steps=1, batch_size=4, checkpoint_dir=str(tmp_path / "warm"))
  c.eval.update(num_examples=2)

  def load():
    policy, _, _ = sft.load_or_train(c)
    out = capsys.readouterr().out
    return sft.warm_start_dir(c, policy), "warm start: training" in out

  first, trained = load()
  assert trained
  assert load() == (first, False)  # unchanged file: the cache
  records[0]["answer"] = "xy"  # same lengths, so only the content differs
  data.write_text("".join(json.dumps(r) + "\n" for r in records))
  edited, trained = load()
  assert trained and edited != first
  assert sorted(p.name for p in (tmp_path / "warm").iterdir()) == sorted(
      os.path.basename(d) for d in (first, edited))


@pytest.mark.slow
def test_scanned_optimizer_step_equals_the_microbatch_loop(warm_dir):
  """train.scan_microbatches (one compiled lax.scan per optimizer step) gives the params and
  metrics of one compiled call per microbatch, for proma: the accumulator, the projection's
  statistics and the metrics pass through the scan's carry and outputs. (Every algorithm's
  update is the same function inside the scan; test_each_algorithm_runs_two_steps runs each.)"""
  results = []
  for scan in (False, True):
    c = tiny_config("proma", warm_dir)
    c.train.scan_microbatches = scan
    trainer, _ = trainer_lib.trainer_for(c)
    init = trainer.init_params
    params = trainer.fresh_params()
    params, _, metrics = trainer.step(params, trainer.init_opt_state(params, 1e-3), 0, 0)
    results.append((params, {k: v for k, v in metrics.items() if not k.startswith("time/")}))
  (loop_params, loop_metrics), (scan_params, scan_metrics) = results
  assert loop_metrics.keys() == scan_metrics.keys()
  chex.assert_trees_all_close(scan_params, loop_params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(scan_metrics, loop_metrics, rtol=1e-5, atol=1e-6)
  assert loop_metrics["grad/norm"] > 0
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(scan_params)))
