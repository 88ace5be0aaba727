"""Glue between a config, the task and the policy model, shared by `sft` and `train`.

Parameters are plain nested dicts (`nnx.to_pure_dict`) so they pass straight through Optax, the
PROMA transforms and orbax; `bind` turns them back into a model inside jitted code.

Two kinds of policy:
  - the tiny decoder with the character tokenizer (`config.model.checkpoint` None): prompts are
    BOS + characters, left-padded to the task's fixed `prompt_width`;
  - a pretrained checkpoint (`config.model.checkpoint` set) with its own tokenizer: each prompt
    goes through the tokenizer's chat template (when it has one and `rollout.chat_template`), and
    a batch is left-padded to its longest prompt rounded up to a multiple of `rollout.bucket`,
    so prompts of any length compile a few shapes only. Responses are cut back the same way after
    sampling (`sampling.trim`), so a batch of short answers does not pay for `max_new_tokens`.
    Before the weights load, the chat template is rendered once and every prompt of a file-based
    task (GSM8K) is measured against `rollout.max_prompt_tokens` (`fit_task`), so that neither
    fails mid-run.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from proma_jax import mesh as mesh_lib, sampling, tasks
from proma_jax.models import loading, stacked
from proma_jax.models.decoder import (
    ModelConfig,
    attention_implementation,
    make_model,
    token_logprobs,
)

# ModelConfig options a run may set on a pretrained checkpoint (and max_len when not None); the
# architecture comes from the checkpoint.
PRETRAINED_OPTIONS = ("dtype", "param_dtype", "remat", "logits_chunk", "attention_impl",
                      "scan_layers")


class Policy(NamedTuple):
  """Everything static about a run's policy: task, tokenizer, model structure and widths."""

  task: tasks.Task
  tokenizer: Any              # a `proma_jax.models.tokenizer.Tokenizer`
  model_config: ModelConfig
  graphdef: Any
  prompt_width: int | None    # P of the character tokenizer (BOS included); None: bucketed
  max_new_tokens: int         # L: most response tokens sampled (EOS included)
  bucket: int = 1             # bucketed prompt and response widths are multiples of this
  max_prompt_tokens: int = 0  # bucketed prompts: the longest allowed, in tokens
  chat_template: bool = False  # wrap each prompt in the tokenizer's chat template
  sample_batch: int = 0       # sequences per sampling call (0: the whole batch at once)
  top_p: float = 1.0


def max_new_tokens(config: ml_collections.ConfigDict, task: tasks.Task) -> int:
  """`rollout.max_new_tokens`, or for a character task without it, the longest answer plus
  `rollout.extra_new_tokens`."""
  if config.rollout.max_new_tokens is not None:
    return config.rollout.max_new_tokens
  if task.answer_width is None:
    raise ValueError(f"config.rollout.max_new_tokens: task {task.name!r} has no fixed answer "
                     "width; set the number of response tokens to sample")
  return task.answer_width + config.rollout.extra_new_tokens


def _fsdp_shardings(config: ml_collections.ConfigDict):
  """With `mesh.fsdp` > 1, the (path, shape) -> sharding of each parameter on the run's FSDP mesh
  (`mesh.param_specs`' default rule), so a checkpoint is loaded straight onto its shards; else
  None."""
  if config.mesh.fsdp <= 1:
    return None
  mesh = mesh_lib.make_mesh(config)
  return lambda path, shape: jax.sharding.NamedSharding(mesh, mesh_lib.fsdp_spec(
      tuple(shape), config.mesh.fsdp, config.mesh.fsdp_min_size,
      layer_axis=stacked.is_stacked_path(path)))


# Prompt token counts remembered within the process, {(tokenizer key, chat template): {prompt:
# tokens}}, for the last few tokenizers: a config checked twice (a sweep's algorithms, evaluating
# after training) tokenizes its data set once.
_PROMPT_LENGTHS: collections.OrderedDict[tuple, dict[str, int]] = collections.OrderedDict()
_PROMPT_LENGTHS_TOKENIZERS = 4


def prompt_lengths(tokenizer, chat_template: bool, prompts: Sequence[str],
                   cache_key: Any = None) -> list[int]:
  """The number of tokens of each prompt as `prompt_ids` encodes it for a pretrained policy:
  rendered in the chat template when `chat_template`, else BOS (when the tokenizer adds one) and
  the raw text.

  The texts are encoded in one `encode_batch` call (the tokenizers library spreads it over its
  threads). GSM8K's 7473 + 1319 prompts through SmolLM2-135M-Instruct's tokenizer and chat
  template (1.08M tokens, the longest prompt 285): 1.7 CPU seconds, 1.8-3.5 s of wall clock on 2
  cores shared with other jobs (load average 2-7), of which rendering the template takes 0.15 s
  (`.venv/bin/python experiments/bench_prompt_check.py --train_path .../train.jsonl --test_path
  .../test.jsonl`). With `cache_key`, something that identifies the tokenizer
  (`loading.checkpoint_state` of its checkpoint), each prompt's count is remembered, and only
  prompts not seen before are encoded: checking the same files again takes 0.02 s.
  """
  known: dict[str, int] = {}
  if cache_key is not None:
    key = (cache_key, bool(chat_template))
    known = _PROMPT_LENGTHS.pop(key, {})
    _PROMPT_LENGTHS[key] = known  # the most recently used, last
    while len(_PROMPT_LENGTHS) > _PROMPT_LENGTHS_TOKENIZERS:
      _PROMPT_LENGTHS.popitem(last=False)
  new = list(dict.fromkeys(p for p in prompts if p not in known))
  if new:
    if chat_template:
      texts, extra = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                    add_generation_prompt=True, tokenize=False)
                      for p in new], 0
    else:
      texts = new
      extra = int(getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None)
    encode_batch = getattr(tokenizer, "encode_batch", None)
    ids = encode_batch(texts) if encode_batch is not None else [tokenizer.encode(t) for t in texts]
    known.update((p, len(row) + extra) for p, row in zip(new, ids))
  return [known[p] for p in prompts]


def fit_task(task: tasks.Task, tokenizer, *, chat_template: bool, max_prompt_tokens: int,
             cache_key: Any = None) -> tasks.Task:
  """`task` checked against a pretrained policy's tokenizer, before the run writes anything.

  When the policy renders prompts in the chat template (`chat_template`), the template is rendered
  once on a sample user message: one that cannot render raises a CheckpointError naming its source
  file (`HFTokenizer.chat_template_source`) and the Jinja error, where it would otherwise fail at
  the first prompt, after run.json, metrics.jsonl and tensorboard/ exist. A task with
  `fit_prompts` (GSM8K) then has every prompt measured (`prompt_lengths`) against
  `max_prompt_tokens` (a prompt over it raises `tasks.DataError` naming its file and line); the
  task returned samples the fitted prompts.
  """
  check_template = getattr(tokenizer, "check_chat_template", None)
  if chat_template and check_template is not None:
    try:
      check_template()
    except ValueError as error:
      raise loading.CheckpointError(
          f"{error}. Fix the template, or set config.rollout.chat_template=False to encode "
          "prompts without it") from error
  if task.fit_prompts is None:
    return task
  try:
    sample = task.fit_prompts(
        lambda prompts: prompt_lengths(tokenizer, chat_template, prompts, cache_key),
        max_prompt_tokens)
  except ValueError as error:
    raise tasks.DataError(str(error)) from error
  return dataclasses.replace(task, sample=sample, fit_prompts=None)


def make_policy(config: ml_collections.ConfigDict) -> tuple[Policy, dict]:
  """The policy of `config` and its initial parameters (a pure dict): freshly initialised for
  the tiny decoder, read from `config.model.checkpoint` for a pretrained one.

  A pretrained policy checks its task against the tokenizer before the weights are read
  (`fit_task`: the chat template renders, every prompt of a file-based task fits
  `rollout.max_prompt_tokens`), so those errors come before step 0 and before the run writes
  anything."""
  try:  # the tasks' own errors name the data file and line, or the task_kwargs field
    task = tasks.get_task(config.task, **config.task_kwargs.to_dict())
  except (ValueError, FileNotFoundError) as error:
    raise tasks.DataError(f"task {config.task!r}: {error}") from error
  length = max_new_tokens(config, task)
  if config.model.checkpoint:
    options = {k: config.model[k] for k in PRETRAINED_OPTIONS}
    if config.model.max_len is not None:
      options["max_len"] = config.model.max_len
    r = config.rollout

    def check(tokenizer):
      nonlocal task
      task = fit_task(task, tokenizer, chat_template=bool(r.chat_template and
                                                          tokenizer.chat_template),
                      max_prompt_tokens=r.max_prompt_tokens,
                      cache_key=loading.checkpoint_state(config.model.checkpoint))

    model, tokenizer = loading.load_pretrained(config.model.checkpoint,
                                               shardings=_fsdp_shardings(config),
                                               check_tokenizer=check, **options)
    graphdef, state = nnx.split(model)
    policy = Policy(task, tokenizer, model.cfg, graphdef, None, length, bucket=r.bucket,
                    max_prompt_tokens=r.max_prompt_tokens,
                    chat_template=bool(r.chat_template and tokenizer.chat_template),
                    sample_batch=r.sample_batch, top_p=r.top_p)
    return policy, nnx.to_pure_dict(state)
  if task.prompt_width is None:
    raise ValueError(f"config.model.checkpoint: task {task.name!r} is a text task for pretrained "
                     "tokenizers; set the checkpoint (a Hugging Face directory or .gguf file)")
  tokenizer = tasks.CharTokenizer()
  model_kwargs = {k: v for k, v in config.model.to_dict().items()
                  if k not in ("seed", "checkpoint", "max_len")}
  model_config = ModelConfig(vocab_size=tokenizer.vocab_size,
                             max_len=config.model.max_len or task.prompt_width + length,
                             **model_kwargs)
  model = make_model(model_config, config.model.seed)
  graphdef, state = nnx.split(model)
  policy = Policy(task, tokenizer, model_config, graphdef, task.prompt_width, length,
                  sample_batch=config.rollout.sample_batch, top_p=config.rollout.top_p)
  return policy, nnx.to_pure_dict(state)


# ModelConfig fields left out of the warm-start key: fixed for the demo's decoder, or options that
# change memory and speed but not the function the model computes.
_NOT_IN_FINGERPRINT = ("rope_theta", "norm_eps", "attention_impl", "remat", "logits_chunk",
                       "scan_layers")


def model_fingerprint(policy: Policy) -> str:
  """A short string identifying the model shape, for naming cached warm starts."""
  cfg = dataclasses.asdict(policy.model_config)
  return "-".join(f"{k}{v}" for k, v in sorted(cfg.items()) if k not in _NOT_IN_FINGERPRINT)


def bind(policy: Policy, params: dict) -> nnx.Module:
  return nnx.merge(policy.graphdef, params)


def vmappable(policy: Policy) -> Policy:
  """`policy` with XLA attention where it would use cuDNN's fused kernel, for code that vmaps the
  model over sequences (per-sequence gradients): under vmap, JAX's cuDNN attention batching rule
  fails to reshape the (B, 1, 1, T, S) mask (jax 0.11.2, "cannot reshape array of shape
  (8, 1, 1, T, S) into shape (8, N, T, S)"). The parameters are the same; only the graph differs.
  """
  if attention_implementation(policy.model_config) != "cudnn":
    return policy
  cfg = dataclasses.replace(policy.model_config, attention_impl="xla")
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_model(cfg, seed=0)))
  return policy._replace(model_config=cfg, graphdef=graphdef)


def response_logprobs(model: nnx.Module, tokens_BxT: jax.Array, valid_BxT: jax.Array,
                      response_len: int) -> tuple[jax.Array, jax.Array]:
  """(logp_BxL, entropy_BxL) of the last L = `response_len` positions (T = P + L), unmasked.

  `model` is the policy module (`bind(policy, params)` for a parameter dict); L is static (the
  response mask's width).
  """
  logp, entropy = token_logprobs(model, tokens_BxT, valid_BxT)
  start = tokens_BxT.shape[1] - response_len - 1
  return logp[:, start:], entropy[:, start:]


def prompt_ids(policy: Policy, prompt: str) -> list[int]:
  """The token ids of one prompt as the policy sees it (special tokens included)."""
  tok = policy.tokenizer
  if policy.prompt_width is not None:  # the character tokenizer: BOS + characters
    return [tok.bos_id] + tok.encode(prompt)
  if policy.chat_template:
    return tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True, tokenize=True)
  bos = [tok.bos_id] if getattr(tok, "add_bos", False) and tok.bos_id is not None else []
  return bos + tok.encode(prompt)


def round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def encode(policy: Policy, examples: list[tasks.Example]) -> tuple[np.ndarray, np.ndarray]:
  """(prompts_BxP int32, valid_BxP float32): the prompts left-padded to one width P.

  P is the task's fixed width for the character tokenizer, else the longest prompt rounded up to
  a multiple of `policy.bucket`. Raises ValueError naming the prompt when one is longer than
  `max_prompt_tokens`.
  """
  if policy.prompt_width is not None:
    return tasks.encode_prompts(policy.tokenizer, [ex.prompt for ex in examples],
                                policy.prompt_width)
  ids = [prompt_ids(policy, ex.prompt) for ex in examples]
  longest = max(len(row) for row in ids)
  if longest > policy.max_prompt_tokens:
    row = max(range(len(ids)), key=lambda i: len(ids[i]))
    raise ValueError(f"a prompt needs {longest} tokens > config.rollout.max_prompt_tokens="
                     f"{policy.max_prompt_tokens}: {examples[row].prompt[:200]!r}")
  width = min(round_up(longest, policy.bucket), policy.max_prompt_tokens)
  prompts = np.full((len(ids), width), policy.tokenizer.pad_id, np.int32)
  valid = np.zeros((len(ids), width), np.float32)
  for r, row in enumerate(ids):
    prompts[r, width - len(row):] = row
    valid[r, width - len(row):] = 1.0
  return prompts, valid


def generate(policy: Policy, params: dict, examples: list[tasks.Example], key: jax.Array, *,
             temperature: float = 1.0, greedy: bool = False,
             progress: Callable[[sampling.Rollout], None] | None = None,
             place_rows: Callable[[Any], Any] | None = None) -> sampling.Rollout:
  """Samples one response per example, `policy.sample_batch` sequences per compiled call, with
  the policy's top-p; pretrained policies' responses are trimmed to a bucketed width.
  `progress(part)` is called with each call's rollout as it completes; `place_rows` puts each
  call's (prompts, valid) on the devices (e.g. `mesh.shard_sequences`: data-parallel sampling)."""
  prompts, valid = encode(policy, examples)
  n = len(examples)
  size = policy.sample_batch or n
  parts = []
  for i, start in enumerate(range(0, n, size)):
    rows = slice(start, start + size)
    batch = (place_rows((prompts[rows], valid[rows])) if place_rows is not None
             else (jnp.asarray(prompts[rows]), jnp.asarray(valid[rows])))
    parts.append(sampling.sample(
        policy.graphdef, params, *batch,
        jax.random.fold_in(key, i) if i else key, max_new_tokens=policy.max_new_tokens,
        eos_id=policy.tokenizer.eos_id, pad_id=policy.tokenizer.pad_id, temperature=temperature,
        greedy=greedy, top_p=policy.top_p))
    if progress is not None:
      progress(parts[-1])
  rollout = sampling.concatenate(parts)
  if policy.prompt_width is None:
    rollout = sampling.trim(rollout, policy.bucket)
  return rollout


def response_tokens(rollout: sampling.Rollout) -> np.ndarray:
  """The (B, L) response columns of a rollout's tokens."""
  return np.asarray(rollout.tokens_BxT)[:, -rollout.response_mask_BxL.shape[1]:]


def score(policy: Policy, rollout: sampling.Rollout,
          examples: list[tasks.Example]) -> tasks.Scores:
  """Rewards, format flags and reward-function errors of a rollout (`tasks.score_responses`)."""
  return tasks.score_responses(policy.tokenizer, response_tokens(rollout),
                               np.asarray(rollout.response_mask_BxL),
                               [ex.answer for ex in examples], policy.task.reward_fn,
                               policy.task.format_fn, policy.task.batch_reward_fn)


def rewards(policy: Policy, rollout: sampling.Rollout, examples: list[tasks.Example]) -> np.ndarray:
  return score(policy, rollout, examples).rewards_B


def greedy_accuracy(policy: Policy, params: dict, examples: list[tasks.Example]) -> float:
  """Mean reward of greedy decoding on `examples` (for exact-match tasks, the fraction answered
  exactly, with EOS)."""
  rollout = generate(policy, params, examples, jax.random.PRNGKey(0), greedy=True)
  return float(np.mean(rewards(policy, rollout, examples)))
