"""Per-sequence gradients and dense factors from a small Flax NNX model, in one jitted pass."""

import chex
import jax
import jax.numpy as jnp
import optax
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

  # With factor_objective: grads stay those of the loss, factors are those of the log-prob objective.
  def loss_and_objective(m, tokens, mask, adv):
    logp = token_logprobs(m, tokens)
    return (-jnp.sum(adv[:, None] * logp * mask) / num_tokens, jnp.sum(logp * mask) / num_tokens)

  _, grads2, factors2 = jax.jit(lambda t, m, a: proma_jax.grads_and_dense_factors(
      loss_and_objective, model, t, m, a, factor_objective=True))(tokens, mask, adv)
  chex.assert_trees_all_close(grads2, grads, atol=1e-6)
  ref_f = nnx.to_pure_dict(nnx.grad(logprob_objective)(model, tokens, mask, adv))
  f = factors2["hidden"]["kernel"]
  chex.assert_trees_all_close(f.activations.T @ f.output_grads, ref_f["hidden"]["kernel"], atol=1e-6)
