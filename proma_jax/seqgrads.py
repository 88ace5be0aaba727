"""Per-sequence statistics for PROMA: the vmap path (DESIGN sections 2 and 6).

The sequence gradient S_i is the gradient of the sequence objective f_i (the normalised
log-probability of sequence i's response tokens, or its ratio-weighted form with stale data),
without the advantage. The microbatch policy gradient the optimizer minimises is that of
loss = -sum_i A_i f_i, so grads = -sum_i A_i S_i. Both come from one jitted pass: per-sequence
gradients by `jax.vmap(jax.grad(f))`, and their advantage-weighted sum.

This path materialises n_seq copies of every leaf; it serves every kind of leaf and is the oracle
for the matrix-free dense path.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def sequence_gradients(seq_objective_fn: Callable[[Any, Any], jax.Array], params: Any,
                       sequences: Any) -> Any:
  """S_i = d f_i / d params for each sequence: a pytree like params with a leading (n_seq,) axis.

  Args:
    seq_objective_fn: `f(params, sequence) -> scalar`, for ONE sequence (no batch axis).
    sequences: a pytree of arrays with a leading (n_seq,) axis.
  """
  return jax.vmap(jax.grad(seq_objective_fn), in_axes=(None, 0))(params, sequences)


def policy_gradient_and_sequence_gradients(
    seq_objective_fn: Callable[[Any, Any], jax.Array], params: Any, sequences: Any,
    advantages_n: jax.Array) -> tuple[jax.Array, Any, Any]:
  """(loss, grads, seq_grads) of the microbatch policy-gradient loss -sum_i A_i f_i.

  grads = -sum_i A_i S_i, equal (by linearity) to the gradient of the loss; seq_grads = S.
  The normalisation (e.g. dividing by the minibatch's total response-token count) belongs in f_i.
  """

  def objective_and_grad(sequence):
    return jax.value_and_grad(seq_objective_fn)(params, sequence)

  f_n, seq_grads = jax.vmap(objective_and_grad)(sequences)
  advantages_n = advantages_n.astype(jnp.float32)
  loss = -jnp.sum(advantages_n * f_n)
  grads = jax.tree.map(
      lambda s, p: (-jnp.tensordot(advantages_n, s.astype(jnp.float32), axes=1)).astype(p.dtype),
      seq_grads, params)
  return loss, grads, seq_grads
