"""Glue between a config, the task and the policy model, shared by `sft` and `train`.

Parameters are plain nested dicts (`nnx.to_pure_dict`) so they pass straight through Optax, the
PROMA transforms and orbax; `bind` turns them back into a model inside jitted code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from proma_jax import sampling, tasks
from proma_jax.models.decoder import ModelConfig, make_model, token_logprobs


class Policy(NamedTuple):
  """Everything static about a run's policy: task, tokenizer, model structure and widths."""

  task: tasks.Task
  tokenizer: tasks.CharTokenizer
  model_config: ModelConfig
  graphdef: Any
  prompt_width: int           # P: left-padded prompt tokens (BOS included)
  max_new_tokens: int         # L: response tokens (EOS included)


def make_policy(config: ml_collections.ConfigDict) -> tuple[Policy, dict]:
  """The policy of `config` and its freshly initialised parameters (a pure dict)."""
  task = tasks.get_task(config.task, **config.task_kwargs.to_dict())
  tokenizer = tasks.CharTokenizer()
  max_new_tokens = task.answer_width + config.rollout.extra_new_tokens
  model_kwargs = {k: v for k, v in config.model.to_dict().items() if k != "seed"}
  model_config = ModelConfig(vocab_size=tokenizer.vocab_size,
                             max_len=task.prompt_width + max_new_tokens, **model_kwargs)
  model = make_model(model_config, config.model.seed)
  graphdef, state = nnx.split(model)
  policy = Policy(task, tokenizer, model_config, graphdef, task.prompt_width, max_new_tokens)
  return policy, nnx.to_pure_dict(state)


# ModelConfig fields left out of the warm-start key: fixed for the demo's decoder, or options that
# change memory and speed but not the function the model computes.
_NOT_IN_FINGERPRINT = ("rope_theta", "norm_eps", "attention_impl", "remat", "logits_chunk")


def model_fingerprint(policy: Policy) -> str:
  """A short string identifying the model shape, for naming cached warm starts."""
  cfg = dataclasses.asdict(policy.model_config)
  return "-".join(f"{k}{v}" for k, v in sorted(cfg.items()) if k not in _NOT_IN_FINGERPRINT)


def bind(policy: Policy, params: dict) -> nnx.Module:
  return nnx.merge(policy.graphdef, params)


def response_logprobs(policy: Policy, model: nnx.Module, tokens_BxT: jax.Array,
                      valid_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(logp_BxL, entropy_BxL) of the response positions (T = P + L), unmasked.

  `model` is the policy module (`bind(policy, params)` for a parameter dict)."""
  logp, entropy = token_logprobs(model, tokens_BxT, valid_BxT)
  start = policy.prompt_width - 1
  return logp[:, start:], entropy[:, start:]


def encode(policy: Policy, examples: list[tasks.Example]) -> tuple[np.ndarray, np.ndarray]:
  return tasks.encode_prompts(policy.tokenizer, [ex.prompt for ex in examples], policy.prompt_width)


def generate(policy: Policy, params: dict, examples: list[tasks.Example], key: jax.Array, *,
             temperature: float = 1.0, greedy: bool = False) -> sampling.Rollout:
  prompts, valid = encode(policy, examples)
  return sampling.sample(policy.graphdef, params, jnp.asarray(prompts), jnp.asarray(valid), key,
                         max_new_tokens=policy.max_new_tokens, eos_id=tasks.EOS, pad_id=tasks.PAD,
                         temperature=temperature, greedy=greedy)


def rewards(policy: Policy, rollout: sampling.Rollout, examples: list[tasks.Example]) -> np.ndarray:
  response = np.asarray(rollout.tokens_BxT)[:, policy.prompt_width:]
  return tasks.batch_rewards(policy.tokenizer, response, np.asarray(rollout.response_mask_BxL),
                             [ex.answer for ex in examples], policy.task.reward_fn)


def greedy_accuracy(policy: Policy, params: dict, examples: list[tasks.Example]) -> float:
  """Fraction of `examples` answered exactly (with EOS) by greedy decoding."""
  rollout = generate(policy, params, examples, jax.random.PRNGKey(0), greedy=True)
  return float(np.mean(rewards(policy, rollout, examples)))
