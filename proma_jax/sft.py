"""Supervised warm start: teacher-forced maximum likelihood of (prompt, answer + EOS) pairs.

Brings the policy from chance to a non-trivial reward so RL has signal, and caches the result
under `config.sft.checkpoint_dir`, keyed by task, model shape and SFT settings, so every RL run of
that task and model starts from the same weights. A data file the task reads (a task_kwargs value
naming an existing file, e.g. the jsonl task's train_path) is keyed by its content, so editing the
file trains a new warm start instead of reusing one fitted to the old data.

  python -m proma_jax.sft --config=configs/arith.py
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

from proma_jax import cli, policy as policy_lib
from proma_jax import tasks
from proma_jax.models import stacked
from proma_jax.checkpoint import Checkpointer


def _file_sha256(path: str | os.PathLike) -> str:
  """The sha256 hex digest of the file at `path`, read in chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as file:
    for chunk in iter(lambda: file.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _data_keyed_task_kwargs(task_kwargs: dict) -> dict:
  """`task_kwargs` with each value that names an existing file replaced by "sha256:<digest>" of
  its content.

  The warm start is fitted to the data, not to a file name: an edited file (same path, new
  records) must not reuse the warm start of its old content. A value that is not an existing file
  (an option, a dataset name, a path not yet written) is kept as it is.
  """
  keyed = {}
  for name, value in task_kwargs.items():
    if isinstance(value, (str, os.PathLike)) and os.fspath(value) and os.path.isfile(value):
      value = f"sha256:{_file_sha256(value)}"  # the task has read it already (make_policy)
    keyed[name] = value
  return keyed


def warm_start_dir(config: ml_collections.ConfigDict, policy: policy_lib.Policy) -> str:
  """Where the warm start of this task, its data, model and SFT recipe is cached."""
  # The recipe only: where the cache lives (sft.checkpoint_dir, however spelled) is not part of it,
  # so a relative and an absolute spelling of one directory share one warm start. Data files enter
  # by content (`_data_keyed_task_kwargs`); tasks without files keep the keys they always had.
  sft_recipe = {k: v for k, v in config.sft.to_dict().items() if k != "checkpoint_dir"}
  task_kwargs = _data_keyed_task_kwargs(config.task_kwargs.to_dict())
  recipe = json.dumps({"task": config.task, "task_kwargs": task_kwargs,
                       "model": policy_lib.model_fingerprint(policy),
                       "model_seed": config.model.seed, "sft": sft_recipe},
                      sort_keys=True, default=str)
  digest = hashlib.sha1(recipe.encode()).hexdigest()[:10]
  return os.path.abspath(os.path.join(config.sft.checkpoint_dir, f"{config.task}-{digest}"))


def _sft_batch(policy: policy_lib.Policy, examples: list[tasks.Example]):
  prompts, prompt_valid = policy_lib.encode(policy, examples)
  completions, completion_mask = tasks.encode_completions(
      policy.tokenizer, [ex.answer for ex in examples], policy.max_new_tokens)
  tokens = np.concatenate([prompts, completions], axis=1)
  valid = np.concatenate([prompt_valid, completion_mask], axis=1)
  return jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(completion_mask)


def train_warm_start(config: ml_collections.ConfigDict, policy: policy_lib.Policy,
                     params: dict) -> tuple[dict, dict]:
  """Runs `config.sft.steps` Adam steps of answer-token NLL; returns (params, summary)."""
  tx = optax.adam(config.sft.lr)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, tokens, valid, mask):
    def nll(params):
      logp, _ = policy_lib.response_logprobs(policy_lib.bind(policy, params), tokens, valid,
                                             mask.shape[1])
      return -jnp.sum(logp * mask) / jnp.sum(mask)

    loss, grads = jax.value_and_grad(nll)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  bar = tqdm.trange(config.sft.steps, desc="warm start", file=sys.stdout, mininterval=2.0)
  for i in bar:
    examples = policy.task.train_examples(config.sft.batch_size, seed=config.sft.seed * 100_003 + i)
    params, opt_state, loss = step(params, opt_state, *_sft_batch(policy, examples))
    if i % 25 == 0 or i == config.sft.steps - 1:
      bar.set_postfix(nll=f"{float(loss):.3f}")
  summary = {
      "train_accuracy": policy_lib.greedy_accuracy(
          policy, params, policy.task.train_examples(config.eval.num_examples, seed=config.eval.seed)),
      "val_accuracy": policy_lib.greedy_accuracy(
          policy, params, policy.task.val_examples(config.eval.num_examples, seed=config.eval.seed)),
      "final_nll": float(loss) if config.sft.steps else None,
  }
  return params, summary


def load_or_train(config: ml_collections.ConfigDict) -> tuple[policy_lib.Policy, dict, dict]:
  """(policy, warm-start params, summary): from the cache if present, else trained and cached.

  A pretrained policy (`config.model.checkpoint`) starts from its checkpoint: no warm start.
  """
  policy, params = policy_lib.make_policy(config)
  if config.model.checkpoint:
    print(f"policy: pretrained {config.model.checkpoint} ({policy.model_config.n_layers} layers, "
          f"d_model {policy.model_config.d_model}, vocab {policy.model_config.vocab_size}); "
          "no warm start")
    return policy, params, {"checkpoint": config.model.checkpoint}
  directory = warm_start_dir(config, policy)
  checkpointer = Checkpointer(directory, max_to_keep=1)
  restored = stacked.restore_either_layout(checkpointer, {"params": params})
  if restored is not None:
    _, state, meta = restored
    checkpointer.close()
    print(f"warm start: loaded {directory} (greedy train accuracy {meta['train_accuracy']:.3f}, "
          f"val {meta['val_accuracy']:.3f})")
    return policy, state["params"], meta
  print(f"warm start: training {config.sft.steps} steps -> {directory}")
  params, summary = train_warm_start(config, policy, params)
  checkpointer.save(config.sft.steps, {"params": params}, summary)
  checkpointer.close()
  print(f"warm start: greedy train accuracy {summary['train_accuracy']:.3f}, "
        f"val {summary['val_accuracy']:.3f}")
  return policy, params, summary


def main():
  config = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
  flags.mark_flags_as_required(["config"])
  def _main(argv):
    cli.refuse_positional_arguments(argv)
    logging.set_verbosity(logging.WARNING)
    with cli.expected_errors_as_messages():
      load_or_train(config.value)

  app.run(_main)


if __name__ == "__main__":
  main()
