"""Tests of the policy losses, group advantages, sequence objectives and KL estimators."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proma_jax import losses

B, L = 6, 5


def _batch(seed: int = 0):
  """Random log-probs, advantages and a ragged response mask (every row has >= 1 token)."""
  rng = np.random.default_rng(seed)
  logp_BxL = np.log(rng.uniform(0.05, 0.95, size=(B, L))).astype(np.float32)
  advantages_B = rng.normal(size=B).astype(np.float32)
  lengths_B = rng.integers(1, L + 1, size=B)
  mask_BxL = (np.arange(L)[None, :] < lengths_B[:, None]).astype(np.float32)
  return jnp.asarray(logp_BxL), jnp.asarray(advantages_B), jnp.asarray(mask_BxL)


def _value_and_grad(loss_fn):
  """jit(value_and_grad) of a policy loss w.r.t. logp_BxL, with its metrics."""
  return jax.jit(jax.value_and_grad(loss_fn, argnums=0, has_aux=True))


def test_group_advantages_match_float64_numpy():
  """group_advantages equals (r - group mean) / (unbiased group std + eps) computed in float64,
  and a group with equal rewards gets zero advantages."""
  rng = np.random.default_rng(0)
  rewards_B = rng.integers(0, 2, size=16).astype(np.float64)
  rewards_B[:4] = 1.0  # one group where every completion is right
  rewards_B[4:8] = rng.normal(size=4)
  groups = rewards_B.reshape(4, 4)
  expected = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True)
                                                         + 1e-6)
  advantages_fn = jax.jit(functools.partial(losses.group_advantages, group_size=4))
  advantages_B = advantages_fn(jnp.asarray(rewards_B, jnp.float32))
  chex.assert_trees_all_close(advantages_B, expected.reshape(-1).astype(np.float32),
                              rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_equal(advantages_B[:4], jnp.zeros(4))


def test_group_advantages_rejects_bad_group_size():
  """A group size that does not divide the batch, or is < 2, raises ValueError."""
  with pytest.raises(ValueError, match="divide"):
    losses.group_advantages(jnp.zeros(10), group_size=4)
  with pytest.raises(ValueError, match=">= 2"):
    losses.group_advantages(jnp.zeros(10), group_size=1)


def test_grpo_on_policy_without_clipping_equals_reinforce():
  """With logp == old_logp (ratio 1, no clip active) GRPO-clip equals REINFORCE in value and
  gradient, and both equal -sum_i A_i f_i with f = sequence_ratio / grad of sequence_logprob."""
  logp_BxL, advantages_B, mask_BxL = _batch()
  num_tokens = jnp.sum(mask_BxL)
  reinforce = _value_and_grad(losses.reinforce_loss)
  grpo = _value_and_grad(losses.grpo_clip_loss)
  (loss_r, metrics_r), grad_r = reinforce(logp_BxL, logp_BxL, advantages_B, mask_BxL, num_tokens)
  (loss_g, metrics_g), grad_g = grpo(logp_BxL, logp_BxL, advantages_B, mask_BxL, num_tokens)
  chex.assert_trees_all_close((loss_g, grad_g), (loss_r, grad_r), rtol=1e-6, atol=1e-7)
  assert float(metrics_g["pg/clipfrac"]) == 0.0
  chex.assert_trees_all_close(metrics_r["pg/ratio_mean"], 1.0, rtol=1e-6)

  def sequence_objective(logp):
    return -jnp.sum(advantages_B * losses.sequence_logprob(logp, mask_BxL, num_tokens))

  grad_seq = jax.jit(jax.grad(sequence_objective))(logp_BxL)
  chex.assert_trees_all_close(grad_seq, grad_r, rtol=1e-6, atol=1e-7)
  ratio_B = losses.sequence_ratio(logp_BxL, logp_BxL, mask_BxL, num_tokens)
  chex.assert_trees_all_close(-jnp.sum(advantages_B * ratio_B), loss_r, rtol=1e-6)


def test_sequence_ratio_gradient_equals_sequence_logprob_gradient_on_policy():
  """On-policy, the Jacobian of the ratio-weighted sequence objective equals that of the
  log-probability objective, and both are mask / num_tokens on each sequence's own tokens."""
  logp_BxL, _, mask_BxL = _batch(1)
  num_tokens = jnp.sum(mask_BxL)
  jac_ratio = jax.jit(jax.jacobian(
      lambda logp: losses.sequence_ratio(logp, logp_BxL, mask_BxL, num_tokens)))(logp_BxL)
  jac_logp = jax.jit(jax.jacobian(
      lambda logp: losses.sequence_logprob(logp, mask_BxL, num_tokens)))(logp_BxL)
  expected = jnp.eye(B)[:, :, None] * mask_BxL[None] / num_tokens
  chex.assert_trees_all_close(jac_ratio, jac_logp, rtol=1e-6, atol=1e-8)
  chex.assert_trees_all_close(jac_logp, expected, rtol=1e-6, atol=1e-8)


RATIOS = np.asarray([0.5, 0.7, 0.9, 1.0, 1.1, 1.3, 2.0, 4.0], np.float32)


def _ratio_batch():
  """Rows with A = +1, -1, +0.5, -2; every row holds every ratio in RATIOS, all tokens valid."""
  old_logp_BxL = jnp.full((4, RATIOS.size), -1.5, jnp.float32)
  logp_BxL = old_logp_BxL + jnp.log(jnp.asarray(RATIOS))[None, :]
  advantages_B = jnp.asarray([1.0, -1.0, 0.5, -2.0], jnp.float32)
  mask_BxL = jnp.ones_like(logp_BxL)
  return logp_BxL, old_logp_BxL, advantages_B, mask_BxL


def test_clipping_zeros_gradient_exactly_where_ratio_leaves_trust_region():
  """Without dual clip, the GRPO gradient is zero exactly on tokens with A > 0, r > 1 + eps or
  A < 0, r < 1 - eps, equals the REINFORCE gradient -A r / N elsewhere, and pg/clipfrac is the
  fraction of zeroed tokens."""
  logp_BxL, old_logp_BxL, advantages_B, mask_BxL = _ratio_batch()
  num_tokens = jnp.sum(mask_BxL)
  grpo = _value_and_grad(losses.get_policy_loss("grpo", dual_clip=None))
  (_, metrics), grad_BxL = grpo(logp_BxL, old_logp_BxL, advantages_B, mask_BxL, num_tokens)
  adv_Bx1 = np.asarray(advantages_B)[:, None]
  clipped_BxL = ((adv_Bx1 > 0) & (RATIOS > 1.2)) | ((adv_Bx1 < 0) & (RATIOS < 0.8))
  expected_BxL = np.where(clipped_BxL, 0.0, -adv_Bx1 * RATIOS / float(num_tokens))
  chex.assert_trees_all_close(grad_BxL, expected_BxL.astype(np.float32), rtol=1e-5, atol=1e-8)
  assert np.all(np.asarray(grad_BxL)[clipped_BxL] == 0.0)
  chex.assert_trees_all_close(metrics["pg/clipfrac"], clipped_BxL.mean(), rtol=1e-6)


def test_dual_clip_zeros_gradient_for_negative_advantages_above_c():
  """With dual clip c = 3, tokens with A < 0 and r > c get zero gradient and loss -c A; tokens
  with A > 0 or r <= c are as without the dual clip; pg/clipfrac_lower counts the capped tokens."""
  logp_BxL, old_logp_BxL, advantages_B, mask_BxL = _ratio_batch()
  num_tokens = jnp.sum(mask_BxL)
  with_dual = _value_and_grad(losses.get_policy_loss("grpo", dual_clip=3.0))
  without_dual = _value_and_grad(losses.get_policy_loss("grpo", dual_clip=None))
  (loss, metrics), grad_BxL = with_dual(logp_BxL, old_logp_BxL, advantages_B, mask_BxL, num_tokens)
  (loss_nd, _), grad_nd_BxL = without_dual(
      logp_BxL, old_logp_BxL, advantages_B, mask_BxL, num_tokens)
  adv_B = np.asarray(advantages_B)
  capped_BxL = (adv_B[:, None] < 0) & (RATIOS > 3.0)
  assert np.all(np.asarray(grad_BxL)[capped_BxL] == 0.0)
  assert np.all(np.asarray(grad_nd_BxL)[capped_BxL] != 0.0)
  chex.assert_trees_all_close(np.asarray(grad_BxL)[~capped_BxL],
                              np.asarray(grad_nd_BxL)[~capped_BxL])
  # The capped tokens' loss drops from -A r to -c A.
  excess = np.sum(np.where(capped_BxL, -adv_B[:, None] * (RATIOS - 3.0), 0.0)) / float(num_tokens)
  chex.assert_trees_all_close(loss, loss_nd - excess, rtol=1e-5)
  chex.assert_trees_all_close(metrics["pg/clipfrac_lower"], capped_BxL.mean(), rtol=1e-6)


@pytest.mark.parametrize("name", ["reinforce", "grpo"])
def test_microbatch_losses_sum_to_minibatch_loss(name):
  """Microbatch losses normalised by the minibatch's TOTAL token count sum to the minibatch loss,
  in value, gradient w.r.t. logp and metrics (off-policy ratios, ragged masks)."""
  logp_BxL, advantages_B, mask_BxL = _batch(2)
  old_logp_BxL = logp_BxL + 0.3 * jax.random.normal(jax.random.key(0), logp_BxL.shape)
  num_tokens = jnp.sum(mask_BxL)
  loss_fn = _value_and_grad(losses.get_policy_loss(name))
  (loss, metrics), grad_BxL = loss_fn(logp_BxL, old_logp_BxL, advantages_B, mask_BxL, num_tokens)
  parts = [loss_fn(logp_BxL[s], old_logp_BxL[s], advantages_B[s], mask_BxL[s], num_tokens)
           for s in (slice(0, 2), slice(2, B))]
  summed_loss = sum(part[0][0] for part in parts)
  summed_metrics = jax.tree.map(lambda *m: sum(m), *[part[0][1] for part in parts])
  grad_concat = jnp.concatenate([part[1] for part in parts])
  chex.assert_trees_all_close((summed_loss, summed_metrics, grad_concat),
                              (loss, metrics, grad_BxL), rtol=1e-5, atol=1e-7)


def test_kl_estimators_match_numpy_and_k3_is_nonnegative():
  """kl_step (k1) and kl_step_k3 equal their float64 numpy masked means; padding (even -inf)
  is ignored; k3 is >= 0 for any pair of log-prob arrays."""
  rng = np.random.default_rng(3)
  before = np.log(rng.uniform(0.05, 0.95, size=(B, L)))
  after = before + rng.normal(scale=0.5, size=(B, L))
  _, _, mask_BxL = _batch(3)
  mask = np.asarray(mask_BxL, np.float64)
  r = after - before
  k1_expected = np.sum((before - after) * mask) / mask.sum()
  k3_expected = np.sum((np.exp(r) - 1 - r) * mask) / mask.sum()
  padded_after = np.where(mask > 0, after, -np.inf)
  k1, k3 = jax.jit(lambda b, a, m: (losses.kl_step(b, a, m), losses.kl_step_k3(b, a, m)))(
      jnp.asarray(before, jnp.float32), jnp.asarray(padded_after, jnp.float32), mask_BxL)
  chex.assert_trees_all_close((k1, k3), (np.float32(k1_expected), np.float32(k3_expected)),
                              rtol=1e-5, atol=1e-6)
  for seed in range(5):
    key_b, key_a = jax.random.split(jax.random.key(seed))
    k3 = jax.jit(losses.kl_step_k3)(jax.random.normal(key_b, (B, L)),
                                    3.0 * jax.random.normal(key_a, (B, L)), mask_BxL)
    assert float(k3) >= 0.0


def test_masked_mean_ignores_padding():
  """masked_mean averages only masked entries and returns 0 for an empty mask."""
  x = jnp.asarray([[1.0, 2.0, jnp.nan], [4.0, jnp.inf, 6.0]])
  mask = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  chex.assert_trees_all_close(jax.jit(losses.masked_mean)(x, mask), 7.0 / 3.0)
  assert float(losses.masked_mean(x, jnp.zeros_like(mask))) == 0.0


def test_get_policy_loss_unknown_name_lists_known():
  """An unknown policy-loss name raises ValueError listing the registered names."""
  with pytest.raises(ValueError, match="grpo.*reinforce"):
    losses.get_policy_loss("ppo")
