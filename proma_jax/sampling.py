"""Jit-compiled batched autoregressive sampling with the model's KV cache.

The left-padded prompt is prefilled once into a cache of P + max_new_tokens slots; then a
`lax.while_loop` emits one token per step, feeding it back through the cache (no recompute of the
prefix), and stops as soon as every sequence has emitted EOS. The model may compute in bfloat16;
its logits are float32 and every softmax here (temperature, top-p, log-probs) is taken in float32.
Each distinct (B, P, max_new_tokens) compiles once: callers bound the prompt widths P by padding
them up to a few bucket sizes (`proma_jax.policy.encode`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from proma_jax.models.decoder import init_cache, positions_from_valid, separate_layers


class Rollout(NamedTuple):
  """Prompts and their sampled completions (T = P + L, L = max_new_tokens).

  tokens_BxT:        int32 prompt followed by the response; response tokens after EOS are pad_id.
  valid_BxT:         float32, 1 for real prompt tokens and for response tokens up to and
                     including the first EOS, 0 for prompt padding and everything after EOS.
  response_mask_BxL: float32, valid_BxT[:, P:].
  logprobs_BxL:      float32 log pi(y_t | prefix) of each generated token under the model's
                     UNSCALED distribution (temperature 1 and no top-p truncation, whatever the
                     sampling settings), i.e. `token_logprobs(...)[0][:, P-1:]` on the same
                     tokens; 0 where masked. These are the policy's log-probs that the ratio
                     objectives divide by (what verl and the paper use at temperature 1).
  """

  tokens_BxT: jax.Array
  valid_BxT: jax.Array
  response_mask_BxL: jax.Array
  logprobs_BxL: jax.Array


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("max_new_tokens", "eos_id", "pad_id", "temperature", "greedy",
                                    "top_p"))
def sample(graphdef: nnx.GraphDef, params: nnx.State, prompt_BxP: jax.Array,
           prompt_valid_BxP: jax.Array, key: jax.Array, *, max_new_tokens: int, eos_id: int,
           pad_id: int, temperature: float = 1.0, greedy: bool = False,
           top_p: float = 1.0) -> Rollout:
  """Sample `max_new_tokens` tokens per prompt: y_t ~ top_p(softmax(logits_t / temperature)), or
  argmax.

  Args:
    graphdef, params: `nnx.split(model)` of a `model.Transformer` (params is the full state).
      `graphdef` is static: a new model structure recompiles.
    prompt_BxP: int32 left-padded prompts; prompt_valid_BxP: their mask of real tokens (every
      prompt needs at least one).
    key: PRNG key; step t samples with `fold_in(key, t)`.
    max_new_tokens, eos_id, pad_id, temperature, greedy, top_p: static (each new value
      recompiles). `greedy=True` is argmax decoding and ignores `temperature`, `top_p` and `key`.
      `top_p < 1` samples from the smallest set of most likely tokens whose probability (after
      temperature) reaches top_p (nucleus sampling, as transformers' TopPLogitsWarper).

  Returns:
    A `Rollout`. The loop ends early once every sequence has emitted EOS; the remaining response
    slots are pad_id and masked.

  Example:
    graphdef, params = nnx.split(model)
    rollout = sample(graphdef, params, prompt_BxP, valid_BxP, key, max_new_tokens=32,
                     eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=1.0)
  """
  model = separate_layers(nnx.merge(graphdef, params))  # decoding is faster unscanned
  p = prompt_BxP.shape[1]
  _check_sampling(model.cfg.max_len, p, max_new_tokens, temperature, greedy, top_p)
  prompt_valid_BxP = prompt_valid_BxP.astype(bool)
  choose = functools.partial(_choose_token, key=key, temperature=temperature, greedy=greedy,
                             top_p=top_p)

  def not_finished(state: _Decoding):
    return (state.step < max_new_tokens) & ~jnp.all(state.done_B)

  def decode_step(state: _Decoding) -> _Decoding:
    return _decode_step(model, state, choose, p, eos_id, pad_id)

  final = jax.lax.while_loop(not_finished, decode_step,
                             _prefill(model, prompt_BxP, prompt_valid_BxP, max_new_tokens, pad_id))
  return Rollout(
      tokens_BxT=jnp.concatenate([prompt_BxP.astype(jnp.int32), final.tokens_BxL], axis=1),
      valid_BxT=jnp.concatenate([prompt_valid_BxP.astype(jnp.float32), final.mask_BxL], axis=1),
      response_mask_BxL=final.mask_BxL,
      logprobs_BxL=final.logp_BxL)


class _Decoding(NamedTuple):
  """The state of `sample`'s decode loop after `step` tokens (L = max_new_tokens).

  cache:       the KV cache of the prompt and the tokens so far.
  logits_BxV:  float32 logits of the next token.
  position_B:  each row's position of the next token (its number of real tokens so far).
  done_B:      the rows that have emitted EOS.
  tokens_BxL, mask_BxL, logp_BxL: the response so far, as `Rollout`'s fields.
  """

  step: jax.Array
  cache: Any
  logits_BxV: jax.Array
  position_B: jax.Array
  done_B: jax.Array
  tokens_BxL: jax.Array
  mask_BxL: jax.Array
  logp_BxL: jax.Array


def _check_sampling(max_len: int, p: int, max_new_tokens: int, temperature: float, greedy: bool,
                    top_p: float) -> None:
  """`sample`'s static arguments against the model's positions and their valid ranges."""
  if p + max_new_tokens > max_len:
    raise ValueError(f"prompt length {p} + max_new_tokens {max_new_tokens} exceeds "
                     f"ModelConfig.max_len={max_len}")
  if not greedy and temperature <= 0:
    raise ValueError(f"temperature must be positive for sampling, got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _prefill(model, prompt_BxP: jax.Array, prompt_valid_BxP: jax.Array, max_new_tokens: int,
             pad_id: int) -> _Decoding:
  """The decode loop's first state: the prompts run once into a cache of P + max_new_tokens
  slots, and the logits of the first response token."""
  b, p = prompt_BxP.shape
  # Prefill: the head runs on the last prompt position only; a (B, P, V) float32 array of every
  # position's logits would be 20 GB at 64 x 512 tokens of Qwen3's 151936-token vocabulary.
  x_BxPxD, cache = model.hidden_states(prompt_BxP, positions_from_valid(prompt_valid_BxP),
                                       prompt_valid_BxP,
                                       cache=init_cache(model.cfg, b, p + max_new_tokens),
                                       cache_index=0)
  last_logits_BxV = model.logits(x_BxPxD[:, -1:])[:, 0]
  return _Decoding(jnp.int32(0), cache, last_logits_BxV,
                   jnp.sum(prompt_valid_BxP, axis=1, dtype=jnp.int32), jnp.zeros((b,), bool),
                   jnp.full((b, max_new_tokens), pad_id, jnp.int32),
                   jnp.zeros((b, max_new_tokens), jnp.float32),
                   jnp.zeros((b, max_new_tokens), jnp.float32))


def _choose_token(logits_BxV: jax.Array, step: jax.Array, *, key: jax.Array, temperature: float,
                  greedy: bool, top_p: float) -> jax.Array:
  """The next token of each row: argmax, or a draw from top_p(softmax(logits / temperature))
  with `fold_in(key, step)`."""
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1)
  scaled_BxV = logits_BxV / temperature
  if top_p < 1:
    scaled_BxV = top_p_logits(scaled_BxV, top_p)
  return jax.random.categorical(jax.random.fold_in(key, step), scaled_BxV)


def _decode_step(model, state: _Decoding, choose, p: int, eos_id: int, pad_id: int) -> _Decoding:
  """One token per row (pad_id once a row is done), recorded and fed back through the cache."""
  step = state.step
  token_B = choose(state.logits_BxV, step)
  alive_B = ~state.done_B
  token_B = jnp.where(alive_B, token_B, pad_id).astype(jnp.int32)
  logp_B = jnp.take_along_axis(jax.nn.log_softmax(state.logits_BxV, axis=-1), token_B[:, None],
                               axis=-1)[:, 0]
  tokens_BxL = state.tokens_BxL.at[:, step].set(token_B)
  mask_BxL = state.mask_BxL.at[:, step].set(alive_B.astype(jnp.float32))
  logp_BxL = state.logp_BxL.at[:, step].set(jnp.where(alive_B, logp_B, 0.0))
  done_B = state.done_B | (token_B == eos_id)
  next_logits_Bx1xV, cache = model(token_B[:, None], state.position_B[:, None], alive_B[:, None],
                                   cache=state.cache, cache_index=p + step)
  return _Decoding(step + 1, cache, next_logits_Bx1xV[:, 0].astype(jnp.float32),
                   state.position_B + 1, done_B, tokens_BxL, mask_BxL, logp_BxL)


def top_p_logits(logits_BxV: jax.Array, top_p: float) -> jax.Array:
  """`logits_BxV` with every token outside the top-p nucleus set to -inf.

  The nucleus of a row is the smallest set of its most likely tokens whose softmax probability
  sums to at least `top_p`; the most likely token is always kept, and tokens tied with the least
  likely kept one are kept too.
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  kept_B = jnp.maximum(jnp.sum(mass_before_BxV < top_p, axis=-1), 1)
  threshold_B = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=-1)
  # top_p >= 1 keeps every token: the mass test rounds probabilities under ~6e-8 away.
  keep_BxV = (logits_BxV >= threshold_B) | (top_p >= 1)
  return jnp.where(keep_BxV, logits_BxV, -jnp.inf)


def trim(rollout: Rollout, multiple: int) -> Rollout:
  """`rollout` with response columns beyond the longest response dropped, the response width
  rounded up to a multiple of `multiple` (so later steps compile for a few widths only).

  Nothing masked-in is dropped: the columns cut hold pad_id and mask 0 in every row.
  """
  length = rollout.response_mask_BxL.shape[1]
  longest = int(jnp.max(jnp.sum(rollout.response_mask_BxL, axis=1)))
  width = min(length, max(multiple, -(-longest // multiple) * multiple))
  if width == length:
    return rollout
  cut = rollout.tokens_BxT.shape[1] - length + width
  return Rollout(rollout.tokens_BxT[:, :cut], rollout.valid_BxT[:, :cut],
                 rollout.response_mask_BxL[:, :width], rollout.logprobs_BxL[:, :width])


def concatenate(rollouts: list[Rollout]) -> Rollout:
  """The rows of several rollouts of the same widths, in order."""
  if len(rollouts) == 1:
    return rollouts[0]
  return Rollout(*(jnp.concatenate(parts, axis=0) for parts in zip(*rollouts)))
