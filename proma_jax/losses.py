"""Policy-gradient losses, group-relative advantages and per-step KL estimators.

The math: docs/algorithm.md#the-problem, docs/algorithm.md#losses-and-advantages and
docs/algorithm.md#metrics.

Every function works on plain arrays of per-token log-probabilities of the response tokens:
  logp_BxL      log pi_theta(y_t | y_<t, x) under the policy being trained,
  old_logp_BxL  the same under the policy that sampled the data (treated as a constant),
  mask_BxL      1 on response tokens, 0 on padding,
  advantages_B  one advantage per sequence.

Token-mean normalisation is exact across microbatches: the policy losses sum their per-token terms
and divide by `num_tokens`, the response-token count of the WHOLE minibatch, so the sum of the
microbatch losses is the minibatch loss (and the same holds for their gradients and metrics).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

PolicyLossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]

_POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def _register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
  def register(fn: PolicyLossFn) -> PolicyLossFn:
    _POLICY_LOSSES[name] = fn
    return fn

  return register


def get_policy_loss(name: str, **options) -> PolicyLossFn:
  """The policy loss registered as `name` ("reinforce", "grpo"), with keyword `options` bound.

  The result is called as `loss_fn(logp_BxL, old_logp_BxL, advantages_B, mask_BxL, num_tokens)`
  and returns `(loss, metrics)`.
  """
  if name not in _POLICY_LOSSES:
    raise ValueError(f"unknown policy loss {name!r}; known policy losses: {sorted(_POLICY_LOSSES)}")
  return functools.partial(_POLICY_LOSSES[name], **options)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """sum(x * mask) / max(sum(mask), 1); entries of x where mask == 0 are ignored (even inf/nan)."""
  mask = mask.astype(jnp.float32)
  total = jnp.sum(jnp.where(mask > 0, x, 0.0) * mask)
  return total / jnp.maximum(jnp.sum(mask), 1.0)


def group_advantages(rewards_B: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
  """A_i = (r_i - mean_g) / (std_g + eps), over consecutive groups of `group_size` sequences.

  A group is the `group_size` completions sampled for one prompt. std_g is the unbiased sample
  standard deviation (ddof=1, torch's default as in the public GRPO implementations), so
  `group_size` must be at least 2. A group with equal rewards gets zero advantages.
  """
  (batch,) = rewards_B.shape
  if group_size < 2 or batch % group_size:
    raise ValueError(
        f"group_size must be >= 2 and divide the batch size, got {group_size} and {batch}")
  rewards_GxN = rewards_B.astype(jnp.float32).reshape(batch // group_size, group_size)
  mean_Gx1 = jnp.mean(rewards_GxN, axis=1, keepdims=True)
  std_Gx1 = jnp.std(rewards_GxN, axis=1, keepdims=True, ddof=1)
  return ((rewards_GxN - mean_Gx1) / (std_Gx1 + eps)).reshape(batch)


def _log_ratio(logp_BxL: jax.Array, old_logp_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """log pi/pi_old per token, with pi_old constant, and 0 on padding (so exp never overflows)."""
  old_logp_BxL = jax.lax.stop_gradient(old_logp_BxL)
  log_ratio = logp_BxL.astype(jnp.float32) - old_logp_BxL.astype(jnp.float32)
  return jnp.where(mask_BxL > 0, log_ratio, 0.0)


def sequence_logprob(
    logp_BxL: jax.Array, mask_BxL: jax.Array, num_tokens: jax.Array | float
) -> jax.Array:
  """f_i = sum_t mask_it * logp_it / num_tokens, per sequence (shape B).

  Its gradient is the on-policy sequence gradient S_i (docs/algorithm.md#the-problem), with the loss's
  normalisation, so that sum_i A_i grad f_i is the (negated) REINFORCE gradient.
  """
  logp_BxL = jnp.where(mask_BxL > 0, logp_BxL.astype(jnp.float32), 0.0)
  return jnp.sum(logp_BxL * mask_BxL, axis=1) / num_tokens


def sequence_ratio(
    logp_BxL: jax.Array,
    old_logp_BxL: jax.Array,
    mask_BxL: jax.Array,
    num_tokens: jax.Array | float,
) -> jax.Array:
  """f_i = sum_t mask_it * exp(logp_it - old_logp_it) / num_tokens, old_logp constant (shape B).

  The ratio-weighted sequence objective for stale data; on-policy (logp == old_logp) its gradient
  equals that of `sequence_logprob`.
  """
  ratio_BxL = jnp.exp(_log_ratio(logp_BxL, old_logp_BxL, mask_BxL))
  return jnp.sum(ratio_BxL * mask_BxL, axis=1) / num_tokens


@_register_policy_loss("reinforce")
def reinforce_loss(
    logp_BxL: jax.Array,
    old_logp_BxL: jax.Array,
    advantages_B: jax.Array,
    mask_BxL: jax.Array,
    num_tokens: jax.Array | float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """REINFORCE / unclipped GRPO: loss = -sum_{i,t} mask_it * A_i * ratio_it / num_tokens.

  ratio_it = exp(logp_it - old_logp_it) with old_logp constant: on-policy it is 1 and its gradient
  is grad logp_it. Equals -sum_i A_i * sequence_ratio_i.

  Metrics (normalised by num_tokens, so they sum over microbatches): `pg/ratio_mean`.
  """
  ratio_sum_B = sequence_ratio(logp_BxL, old_logp_BxL, mask_BxL, num_tokens)
  loss = -jnp.sum(advantages_B.astype(jnp.float32) * ratio_sum_B)
  return loss, {"pg/ratio_mean": jax.lax.stop_gradient(jnp.sum(ratio_sum_B))}


@_register_policy_loss("grpo")
def grpo_clip_loss(
    logp_BxL: jax.Array,
    old_logp_BxL: jax.Array,
    advantages_B: jax.Array,
    mask_BxL: jax.Array,
    num_tokens: jax.Array | float,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = 3.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GRPO with PPO clipping and dual clip: loss = sum_{i,t} mask_it * l_it / num_tokens, with

    l_it = max(-A_i r_it, -A_i clip(r_it, 1 - eps_low, 1 + eps_high))
    l_it = min(l_it, -c A_i)                    for A_i < 0 (dual clip, c = `dual_clip` > 1)

  r_it = exp(logp_it - old_logp_it), old_logp constant. A token's gradient is zero where the
  clipped term wins (A > 0 and r > 1 + eps_high, or A < 0 and r < 1 - eps_low) and where the dual
  clip wins (A < 0 and r > c). `dual_clip=None` disables the dual clip.

  Metrics (normalised by num_tokens, so they sum over microbatches): `pg/clipfrac` (fraction of
  tokens where the PPO clip is active), `pg/clipfrac_lower` (where the dual clip is active),
  `pg/ratio_mean`.
  """
  if dual_clip is not None and dual_clip <= 1.0:
    raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
  ratio_BxL = jnp.exp(_log_ratio(logp_BxL, old_logp_BxL, mask_BxL))
  adv_Bx1 = advantages_B[:, None].astype(jnp.float32)
  unclipped_BxL = -adv_Bx1 * ratio_BxL
  clipped_BxL = -adv_Bx1 * jnp.clip(ratio_BxL, 1.0 - eps_low, 1.0 + eps_high)
  per_token_BxL = jnp.maximum(unclipped_BxL, clipped_BxL)
  clip_active_BxL = clipped_BxL > unclipped_BxL
  if dual_clip is None:
    dual_active_BxL = jnp.zeros_like(clip_active_BxL)
  else:
    dual_active_BxL = (adv_Bx1 < 0) & (per_token_BxL > -dual_clip * adv_Bx1)
    per_token_BxL = jnp.where(dual_active_BxL, -dual_clip * adv_Bx1, per_token_BxL)
  loss = jnp.sum(per_token_BxL * mask_BxL) / num_tokens
  metrics = {
      "pg/clipfrac": jnp.sum(clip_active_BxL * mask_BxL) / num_tokens,
      "pg/clipfrac_lower": jnp.sum(dual_active_BxL * mask_BxL) / num_tokens,
      "pg/ratio_mean": jnp.sum(ratio_BxL * mask_BxL) / num_tokens,
  }
  return loss, jax.lax.stop_gradient(metrics)


def kl_step(
    logp_before_BxL: jax.Array, logp_after_BxL: jax.Array, mask_BxL: jax.Array
) -> jax.Array:
  """`kl/step` (k1): mean over response tokens of (logp_before - logp_after).

  An unbiased estimate of the per-token KL(pi_before || pi_after) when the tokens were sampled
  from pi_before (docs/algorithm.md#metrics; the "ppo_kl" of PPO implementations).
  """
  return masked_mean(logp_before_BxL - logp_after_BxL, mask_BxL)


def kl_step_k3(
    logp_before_BxL: jax.Array, logp_after_BxL: jax.Array, mask_BxL: jax.Array
) -> jax.Array:
  """`kl/step_k3`: mean over response tokens of exp(r) - 1 - r, r = logp_after - logp_before.

  Schulman's k3 estimator of KL(pi_before || pi_after) from samples of pi_before: unbiased,
  lower variance than k1, and non-negative token by token (e^r >= 1 + r).
  """
  r_BxL = jnp.where(mask_BxL > 0, logp_after_BxL - logp_before_BxL, 0.0)
  return masked_mean(jnp.expm1(r_BxL) - r_BxL, mask_BxL)
