"""Per-sequence gradients and dense factors from a small Flax NNX model, in one jitted pass."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import proma_jax


class TinyLM(nnx.Module):
  """Embedding -> Dense -> tanh -> Dense -> logits: enough for dense and non-dense leaves."""

  def __init__(self, vocab=11, width=8, rngs=None):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.hidden = proma_jax.Dense(width, 16, rngs=rngs)
    self.out = proma_jax.Dense(16, vocab, use_bias=False, rngs=rngs)

  def __call__(self, tokens_BxT):
    return self.out(jnp.tanh(self.hidden(self.embed(tokens_BxT))))


def token_logprobs(model, tokens_BxT):
  logits = model(tokens_BxT[:, :-1])
  return jnp.take_along_axis(jax.nn.log_softmax(logits), tokens_BxT[:, 1:, None], -1)[..., 0]


def setup(n_seq=5, length=7):
  model = TinyLM(rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (n_seq, length), 0, 11)
  mask = (jnp.arange(length - 1)[None] < jnp.array([6, 4, 5, 2, 6])[:, None]).astype(jnp.float32)
  adv = jax.random.normal(jax.random.PRNGKey(2), (n_seq,))
  return model, graphdef, state, params, tokens, mask, adv


def test_vmap_sequence_gradients_sum_to_policy_gradient():
  """sum_i -A_i S_i (vmap of per-sequence grads) equals the gradient of the batched PG loss."""
  model, graphdef, state, params, tokens, mask, adv = setup()
  num_tokens = mask.sum()

  def with_params(p):
    st = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(st, p)
    return nnx.merge(graphdef, st)

  def seq_objective(p, seq):
    tokens_T, mask_T = seq
    return jnp.sum(token_logprobs(with_params(p), tokens_T[None])[0] * mask_T) / num_tokens

  def batched_loss(p):
    logp = token_logprobs(with_params(p), tokens)
    return -jnp.sum(adv[:, None] * logp * mask) / num_tokens

  loss, grads, seq_grads = jax.jit(
      lambda p: proma_jax.policy_gradient_and_sequence_gradients(seq_objective, p, (tokens, mask),
                                                                 adv))(params)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(batched_loss))(params)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-6)
  chex.assert_trees_all_close(loss, ref_loss, atol=1e-6)
  chex.assert_shape(seq_grads["hidden"]["kernel"], (5, 8, 16))
  s3 = jax.grad(seq_objective)(params, (tokens[3], mask[3]))
  chex.assert_trees_all_close(jax.tree.map(lambda s: s[3], seq_grads), s3, atol=1e-6)
  # Plugs straight into the transform.
  tx = proma_jax.proma_accumulation(optax.sgd(0.1), 2)
  updates, _ = jax.jit(lambda g, s: tx.update(g, tx.init(params), params, seq_grads=s))(grads,
                                                                                       seq_grads)
  chex.assert_trees_all_equal_structs(updates, params)


def test_captured_factors_reproduce_dense_kernel_gradients():
  """For each Dense kernel, A^T G from the captured factors equals its gradient; others are None."""
  model, _, _, _, tokens, mask, adv = setup()
  num_tokens = mask.sum()

  def loss_fn(m, tokens, mask, adv):
    return -jnp.sum(adv[:, None] * token_logprobs(m, tokens) * mask) / num_tokens

  def logprob_objective(m, tokens, mask, adv):
    return jnp.sum(token_logprobs(m, tokens) * mask) / num_tokens

  seen = jnp.concatenate([jnp.ones((5, 1)), mask[:, :-1]], axis=1)  # inputs that matter
  loss, grads, factors = jax.jit(lambda t, m, a: proma_jax.grads_and_dense_factors(
      loss_fn, model, t, m, a, token_mask=seen))(tokens, mask, adv)
  ref = nnx.grad(loss_fn)(model, tokens, mask, adv)
  chex.assert_trees_all_close(grads, nnx.to_pure_dict(ref), atol=1e-6)
  for layer in ("hidden", "out"):
    f = factors[layer]["kernel"]
    chex.assert_shape(f.activations, (5 * 6, grads[layer]["kernel"].shape[0]))
    chex.assert_trees_all_close(f.activations.T @ f.output_grads, grads[layer]["kernel"], atol=1e-6)
  assert factors["embed"]["embedding"] is None and factors["hidden"]["bias"] is None



def test_one_backward_capture_gives_loss_gradient_and_advantage_free_factors():
  """policy_gradient_and_dense_factors: one backward of sum_i c_i f_i gives the gradient of
  -sum_i A_i f_i for every leaf and the output gradients of sum_i f_i, also for sequences whose
  advantage is zero (their rows would vanish from the loss's backward) and when all are zero."""
  model, _, _, _, tokens, mask, adv = setup()
  num_tokens = mask.sum()

  def objectives(m, b):
    tokens, mask = b
    return jnp.sum(token_logprobs(m, tokens) * mask, axis=1) / num_tokens

  def loss_fn(m, b, a):
    return -jnp.sum(a * objectives(m, b))

  run = jax.jit(lambda b, a: proma_jax.policy_gradient_and_dense_factors(objectives, model, b, a))
  _, _, ref_factors = jax.jit(lambda b: proma_jax.grads_and_dense_factors(
      lambda m, b: jnp.sum(objectives(m, b)), model, b))((tokens, mask))
  for a in (adv, adv.at[jnp.array([1, 3])].set(0.0), 1e-6 * adv, jnp.zeros_like(adv)):
    loss, grads, factors = run((tokens, mask), a)
    ref_loss, ref_grads = nnx.value_and_grad(lambda m: loss_fn(m, (tokens, mask), a))(model)
    scale = float(jnp.max(jnp.abs(a)))
    chex.assert_trees_all_close(loss, ref_loss, atol=1e-6 * scale)
    chex.assert_trees_all_close(grads, nnx.to_pure_dict(ref_grads), atol=1e-6 * scale)
    for layer in ("hidden", "out"):
      chex.assert_trees_all_close(factors[layer]["kernel"], ref_factors[layer]["kernel"], atol=1e-6,
                                  rtol=1e-5)
    if scale == 0:  # every advantage zero: the gradient is zero up to 2^-40 of the S_i
      assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-12
  with pytest.raises(ValueError, match="one objective per sequence"):
    proma_jax.policy_gradient_and_dense_factors(lambda m, b: jnp.sum(objectives(m, b)), model,
                                                (tokens, mask), adv)
