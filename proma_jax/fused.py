"""PROMA inside the backward pass: a dense kernel's statistics used where the backward makes them.

docs/algorithm.md#fused-statistics. Everything PROMA does to a dense kernel W needs only that
layer's inputs A, its output gradients G, its slice R_W of the accumulator and a few scalars. So
`fused_dense`, a `jax.custom_vjp` of y = x W, takes R_W (and those scalars) as a primal input and
returns through R_W's cotangent the accumulator's change

    change_W = M'_W - project * shrinkage * P_bounded(R_W)      (`leaf_change.microbatch_change`)

computed in the layer's own backward step. Differentiating with respect to R therefore gives the
changes of every fused kernel, layer by layer, and each layer's per-sequence gradients S_i live
only while its backward step runs: peak memory = plain + one layer's S_i, whatever the depth.

The rule is nonlinear in its incoming cotangent (it solves a system built from it): take one
`jax.grad` through it, never `jax.vmap`, `jax.jvp` or a second derivative. A kernel used twice in
one forward pass would sum two changes; `capture.policy_gradient_and_fused_changes` refuses it.

This module is pure JAX; `fused_slots.py` places it in the model's `Dense` layers.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from proma_jax import leaf_change, seqgrads
from proma_jax.seqgrads import DenseFactors, DenseSequenceFactors


# The largest block of per-sequence gradients (n_seq, d_in, B) float32 that the materialising
# route forms at once: the fused path's only transient that grows with the microbatch's sequences.
BLOCK_BYTES = 16 * 2**20


class FusedRule(NamedTuple):
  """What the backward step of a fused kernel computes (static, hashable).

  accumulation: `AccumulationOptions` (accumulation projection of R_W) or None.
  intra:        `IntraOptions` (intra projection of M_W first) or None.
  dense_path:   how the S_i enter the accumulation statistics, `seqgrads.choose_dense_path`
                ("auto", "materialise": one layer's stacked S_i, or "matrix_free": never formed).
  stack_sharding: on an FSDP mesh, the sharding of this kernel's stacked S_i (n_seq, d_in, d_out):
                the kernel's own, sequence axis replicated (`mesh.constrain_sequence_gradients`),
                so each block of S_i meets the block of R_W on the same device and no device
                gathers whole S_i. None: the compiler's choice.
  """

  accumulation: leaf_change.AccumulationOptions | None
  intra: leaf_change.IntraOptions | None
  dense_path: str = "auto"
  stack_sharding: jax.sharding.NamedSharding | None = None


class FusedSlot(NamedTuple):
  """The per-kernel inputs of `fused_dense` besides x and W.

  accumulator:        R_W (d_in, d_out) float32. Its cotangent is the change of R_W.
  metrics:            (2,) zeros. Its cotangent is (||shrinkage * P_bounded||, intra fraction).
  key:                the intra range finder's key for this leaf (`leaf_change.range_finder_keys`).
  cotangent_weights:  (n_seq,) c_i of `capture.sequence_cotangents`: the backward pass carries
                      sum_i c_i f_i, so G_i = dy_i / c_i are the rows of grad f_i.
  advantages:         (n_seq,) A_i: with materialised S_i, M_W = -sum_i A_i S_i in float32.
  scale:              () the loss gradient is scale * A^T dy (`capture.sequence_cotangents`).
  token_mask:         (n_seq, T) real tokens, padding rows of A zeroed; or None (every row real).
  project:            () bool, False for microbatches under skip_fraction.
  """

  accumulator: jax.Array
  metrics: jax.Array
  key: jax.Array
  cotangent_weights: jax.Array
  advantages: jax.Array
  scale: jax.Array
  token_mask: jax.Array
  project: jax.Array


def _dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """y = x W over the last axis of x, in x's dtype (as `nnx.Linear` with both promoted)."""
  return jax.lax.dot_general(x, kernel.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_dense(rule: FusedRule, x: jax.Array, kernel: jax.Array, slot: FusedSlot) -> jax.Array:
  """y = x W (x in the compute dtype, W in its storage dtype), whose backward also returns the
  change of R_W through `slot.accumulator`'s cotangent (module docstring)."""
  return _dense(x, kernel)


def _forward(rule, x, kernel, slot):
  return _dense(x, kernel), (x, kernel, slot)


def _backward(rule, residuals, dy):
  x, kernel, slot = residuals
  dx = jax.lax.dot_general(dy, kernel.astype(dy.dtype), (((dy.ndim - 1,), (1,)), ((), ())))
  lead = tuple(range(x.ndim - 1))
  dkernel = jax.lax.dot_general(x, dy, ((lead, lead), ((), ()))).astype(kernel.dtype)
  change, removed_norm, fraction = kernel_change(rule, slot, x, dy, dkernel)
  no_cotangent = dict.fromkeys(
      ("key", "cotangent_weights", "advantages", "scale", "token_mask", "project"))
  dslot = slot._replace(accumulator=change, metrics=jnp.stack([removed_norm, fraction]),
                        **no_cotangent)
  return dx.astype(x.dtype), dkernel, dslot


# optimize_remat: under jax.checkpoint (remat, and the scanned layers' body, which is always
# checkpointed) the forward is re-run in the backward step instead of saving its residuals. Without
# it the scan stored each layer's residuals (x, the kernel and the slot with R) stacked: +35 MiB per
# Qwen3-0.6B-shaped layer for proma_intra (experiments/README.md, "Scanned layers").
fused_dense.defvjp(_forward, _backward, optimize_remat=True)


def kernel_change(rule: FusedRule, slot: FusedSlot, x: jax.Array, dy: jax.Array,
                  dkernel: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The change of R_W from one layer's inputs x (n_seq, ..., d_in) and output cotangents dy.

  A = x, G_i = dy_i / c_i with padding rows zeroed, S_i = A_i^T G_i. Where materialising S_i takes
  fewer flops (`seqgrads.choose_dense_path`), the statistics are contracted from S_i formed
  BLOCK_BYTES at a time (on an FSDP mesh: the whole stack, sharded like W) and the loss gradient
  is M_W = -sum_i A_i S_i in float32; matrix-free, M_W = scale * dkernel (the backward's own
  product). M_W is rounded to W's storage dtype as the unfused path's gradient is; then
  `leaf_change.microbatch_change`, the same per-leaf function the transform runs on unfused leaves.
  """
  n_seq, d_in, d_out = x.shape[0], x.shape[-1], dy.shape[-1]
  c_n = slot.cotangent_weights
  if c_n.shape != (n_seq,):
    raise ValueError(f"a fused Dense layer saw inputs of shape {x.shape} but the microbatch has "
                     f"{c_n.shape[0]} sequences; the dense layers must see inputs laid out "
                     "(n_seq, ..., d_in), sequence axis leading")
  n_tok = x.size // d_in
  t = n_tok // n_seq
  a_nxi = x.reshape(n_tok, d_in)
  g_nxo = (dy.reshape(n_seq, t, d_out) / c_n[:, None, None]).astype(dy.dtype).reshape(n_tok, d_out)
  # Padding tokens are zeroed in G (made by the backward pass), not in A: a masked copy of A
  # depends on the forward pass only, and XLA:CPU was measured to make those copies early and keep
  # every layer's alive (+12 MiB per Qwen3-0.6B-shaped layer). Intra's range finder still needs A's
  # padding rows zeroed, so it gets its own masked A.
  masked_a_nxi = a_nxi
  if slot.token_mask is not None:
    if slot.token_mask.size != n_tok:
      raise ValueError(f"a fused Dense layer saw {n_tok} tokens but token_mask has shape "
                       f"{slot.token_mask.shape}")
    mask_nx1 = slot.token_mask.reshape(n_tok, 1)
    g_nxo = g_nxo * mask_nx1.astype(g_nxo.dtype)
    masked_a_nxi = a_nxi * mask_nx1.astype(x.dtype)
  m_ixo = (slot.scale * dkernel).astype(dkernel.dtype).astype(jnp.float32)
  seq_grads = None
  if rule.accumulation is not None and rule.accumulation.projects:
    segment_ids = jnp.repeat(jnp.arange(n_seq, dtype=jnp.int32), t)
    if seqgrads.choose_dense_path(n_seq, t, d_in, d_out, rule.dense_path) == "matrix_free":
      seq_grads = DenseSequenceFactors(a_nxi, g_nxo, segment_ids, n_seq)
    elif rule.stack_sharding is not None:  # FSDP: the whole stack, each block on R_W's device
      seq_grads = jax.lax.with_sharding_constraint(
          jnp.einsum("bti,bto->bio", a_nxi.reshape(n_seq, t, d_in),
                     g_nxo.reshape(n_seq, t, d_out), preferred_element_type=jnp.float32),
          rule.stack_sharding)
      m_ixo = -jnp.tensordot(slot.advantages.astype(jnp.float32), seq_grads, axes=1)
    else:  # the S_i formed a block of columns at a time (`seqgrads.blocked_dense_statistics`)
      block = seqgrads.blocked_columns(n_seq, d_in, d_out, BLOCK_BYTES)
      seq_grads = DenseSequenceFactors(a_nxi, g_nxo, segment_ids, n_seq, block)
      m_ixo = -seqgrads.dense_combination(slot.advantages, seq_grads)
    m_ixo = m_ixo.astype(dkernel.dtype).astype(jnp.float32)
  factors = None if rule.intra is None else DenseFactors(masked_a_nxi, g_nxo)
  return leaf_change.microbatch_change(slot.accumulator, m_ixo, seq_grads, factors, slot.key,
                                       slot.project, rule.accumulation, rule.intra)
