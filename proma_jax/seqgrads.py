"""Per-sequence statistics for PROMA: the vmap path and the matrix-free dense path.

The math: docs/algorithm.md#the-vmap-path and docs/algorithm.md#matrix-free-statistics-for-dense-layers.

The sequence gradient S_i is the gradient of the sequence objective f_i (the normalised
log-probability of sequence i's response tokens, or its ratio-weighted form with stale data),
without the advantage. The microbatch policy gradient the optimizer minimises is that of
loss = -sum_i A_i f_i, so grads = -sum_i A_i S_i. Both come from one jitted pass: per-sequence
gradients by `jax.vmap(jax.grad(f))`, and their advantage-weighted sum.

The vmap path materialises n_seq copies of every leaf; it serves every kind of leaf and is the
oracle for the matrix-free dense path below, which gets the same statistics of a dense kernel from
its layer inputs and output gradients without forming any S_i.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


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


class DenseFactors(NamedTuple):
  """Per-token factors of one dense kernel's gradient: grad W = activations^T @ output_grads.

  activations:  (n_tokens, d_in)   layer inputs, zero rows for padding tokens.
  output_grads: (n_tokens, d_out)  gradient of the objective w.r.t. the layer outputs.
  Both stay in the layer's compute dtype (bfloat16 under bf16 compute); the statistics that use
  them compute in float32.
  """

  activations: jax.Array
  output_grads: jax.Array


# ---------------------------------------------------------------------------------------------
# Matrix-free statistics of a dense kernel (docs/algorithm.md#matrix-free-statistics-for-dense-layers).
#
# For y = x W with W (d_in x d_out) and one microbatch, A (n_tok x d_in) holds the layer inputs and
# G (n_tok x d_out) the gradients of the advantage-free objective sum_i f_i w.r.t. the layer outputs.
# Sequences do not interact, so the rows of G for the tokens of sequence i are those of grad f_i and
#   S_i = A_i^T G_i.
# With E (n_tok x n_seq) the one-hot matrix of the tokens' sequence ids:
#   <S_i, S_j> = sum((A_i A_j^T) * (G_i G_j^T))   ->  gram = E^T ((A A^T) * (G G^T)) E
#   <R, S_i>   = sum_{t in i} a_t^T R g_t          ->  inner = E^T rowsum((A R) * G)
#   sum_i c_i S_i = A^T ((E c) * G)                 (one matmul, like a backward pass)
# No S_i is ever formed. Tokens whose id is outside [0, n_seq) have a zero row in E: padding.

DENSE_PATHS = ("auto", "matrix_free", "materialise")


class DenseSequenceFactors(NamedTuple):
  """The sequence gradients S_i = A_i^T G_i of one dense kernel, in factored (matrix-free) form.

  activations:   (n_tok, d_in)  layer inputs A.
  output_grads:  (n_tok, d_out) gradients G of the advantage-free objective sum_i f_i w.r.t. the
                 layer outputs.
  segment_ids:   (n_tok,) int, each token's sequence index; ids outside [0, num_sequences) mark
                 padding tokens, which contribute nothing (as do zero rows of A or G).
  num_sequences: n_seq, a static Python int (pytree auxiliary data, so it survives `jax.jit`).
  block_columns: 0: the Gram is computed matrix-free (n_tok^2 (d_in + d_out) / 2 multiply-adds).
                 B > 0: the tokens are n_seq contiguous runs of equal length (segment ids
                 0,..,0,1,..,1,...), and the Gram and <R, S_i> are contracted from the S_i formed
                 B output columns at a time (`blocked_dense_statistics`): the flops of
                 materialising S_i with only an (n_seq, d_in, B) block alive. Static, like
                 num_sequences.

  Pass it as the `seq_grads` leaf of a 2-D kernel instead of the stacked (n_seq, d_in, d_out) array.
  """

  activations: jax.Array
  output_grads: jax.Array
  segment_ids: jax.Array
  num_sequences: int
  block_columns: int = 0


jax.tree_util.register_pytree_with_keys(
    DenseSequenceFactors,
    lambda f: (((jax.tree_util.GetAttrKey("activations"), f.activations),
                 (jax.tree_util.GetAttrKey("output_grads"), f.output_grads),
                 (jax.tree_util.GetAttrKey("segment_ids"), f.segment_ids)),
                (int(f.num_sequences), int(f.block_columns))),
    lambda aux, children: DenseSequenceFactors(*children, *aux),
)


def _float32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _one_hot_nxs(factors: DenseSequenceFactors) -> jax.Array:
  """E (n_tok x n_seq): E[t, i] = 1 iff token t belongs to sequence i (zero row for padding ids)."""
  return jax.nn.one_hot(factors.segment_ids, factors.num_sequences, dtype=jnp.float32)


def dense_sequence_gram(factors: DenseSequenceFactors, chunk_size: int | None = None) -> jax.Array:
  """<S_i, S_j> = sum((A_i A_j^T) * (G_i G_j^T)) for all pairs: E^T ((A A^T) * (G G^T)) E.

  The token rows are cut into chunks of `chunk_size` (default: ceil(n_tok / n_seq), one sequence's
  worth) and only the chunk pairs (p <= q) of the symmetric token-product matrix are computed, each
  block adding E_p^T B_pq E_q and, for p < q, its transpose: n_tok^2 (d_in + d_out) / 2
  multiply-adds (half of the full product) and 2 chunk_size^2 transient floats.
  """
  a_nxi, g_nxo = _float32(factors.activations), _float32(factors.output_grads)
  e_nxs = _one_hot_nxs(factors)
  n_tok = a_nxi.shape[0]
  chunk = -(-n_tok // factors.num_sequences) if chunk_size is None else chunk_size
  chunk = max(1, min(chunk, n_tok))
  num_chunks = -(-n_tok // chunk)
  pad = num_chunks * chunk - n_tok
  pad_rows = lambda x: jnp.pad(x, ((0, pad), (0, 0))).reshape(num_chunks, chunk, x.shape[1])
  a_cxkxi, g_cxkxo, e_cxkxs = pad_rows(a_nxi), pad_rows(g_nxo), pad_rows(e_nxs)
  first_p, second_q = np.triu_indices(num_chunks)

  def add_block(gram_sxs, pair):
    p, q = pair
    block_kxk = (a_cxkxi[p] @ a_cxkxi[q].T) * (g_cxkxo[p] @ g_cxkxo[q].T)
    part_sxs = e_cxkxs[p].T @ block_kxk @ e_cxkxs[q]
    return gram_sxs + part_sxs + jnp.where(p == q, 0.0, 1.0) * part_sxs.T, None

  gram_sxs, _ = jax.lax.scan(add_block, jnp.zeros((e_nxs.shape[1],) * 2, jnp.float32),
                             (jnp.asarray(first_p, jnp.int32), jnp.asarray(second_q, jnp.int32)))
  return 0.5 * (gram_sxs + gram_sxs.T)


def dense_sequence_inner(r_ixo: jax.Array, factors: DenseSequenceFactors) -> jax.Array:
  """<R, S_i> = sum_{t in i} a_t^T R g_t: E^T rowsum((A R) * G). One matmul, n_tok d_in d_out."""
  a_nxi, g_nxo = _float32(factors.activations), _float32(factors.output_grads)
  per_token_n = jnp.sum((a_nxi @ _float32(r_ixo)) * g_nxo, axis=1)
  return per_token_n @ _one_hot_nxs(factors)


def blocked_dense_statistics(r_ixo: jax.Array,
                             factors: DenseSequenceFactors) -> tuple[jax.Array, jax.Array]:
  """(<S_i, S_j>, <R, S_i>) from S_i = A_i^T G_i formed B = `factors.block_columns` columns at a time.

  With the tokens in n contiguous runs of T (sequence i = rows i T .. (i + 1) T - 1) and the output
  columns cut into blocks b of B (B divides d_out):
      S_i[:, b] = A_i^T G_i[:, b],   K += sum_b <S_i[:, b], S_j[:, b]>,   inner_i += <R[:, b], S_i[:, b]>
  by a loop over the blocks that slices G and R in place (no rearranged copy of R exists, so
  nothing of it can be scheduled ahead of the backward pass): n T |W| + n^2 |W| + n |W|
  multiply-adds (materialising's) and one (n, d_in, B) float32 block alive instead of the
  (n, d_in, d_out) stack.
  """
  n, block = factors.num_sequences, factors.block_columns
  d_in, d_out = r_ixo.shape
  if d_out % block:
    raise ValueError(f"block_columns={block} must divide the kernel's {d_out} output columns")
  a_nxtxi = factors.activations.reshape(n, -1, d_in)
  g_nxtxo = factors.output_grads.reshape(n, a_nxtxi.shape[1], d_out)

  def add_block(b, carry):
    gram_nxn, inner_n = carry
    g_nxtxk = jax.lax.dynamic_slice_in_dim(g_nxtxo, b * block, block, axis=2)
    r_ixk = jax.lax.dynamic_slice_in_dim(r_ixo, b * block, block, axis=1).astype(jnp.float32)
    s_nxixk = jnp.einsum("nti,ntk->nik", a_nxtxi, g_nxtxk, preferred_element_type=jnp.float32)
    return (gram_nxn + jnp.tensordot(s_nxixk, s_nxixk, axes=((1, 2), (1, 2))),
            inner_n + jnp.tensordot(s_nxixk, r_ixk, axes=((1, 2), (0, 1))))

  zeros = (jnp.zeros((n, n), jnp.float32), jnp.zeros((n,), jnp.float32))
  return jax.lax.fori_loop(0, d_out // block, add_block, zeros)


def blocked_columns(num_sequences: int, d_in: int, d_out: int, max_bytes: int) -> int:
  """The largest divisor B of d_out whose float32 block (num_sequences, d_in, B) fits max_bytes (>= 1)."""
  fit = max(1, max_bytes // (4 * num_sequences * d_in))
  return max(b for b in range(1, min(fit, d_out) + 1) if d_out % b == 0)


def dense_statistics(r_ixo: jax.Array,
                     factors: DenseSequenceFactors) -> tuple[jax.Array, jax.Array]:
  """(<S_i, S_j>, <R, S_i>) of a dense kernel without forming the stacked S_i; as
  `projection.stacked_statistics`. Matrix-free, or blocked when `factors.block_columns` > 0."""
  if factors.block_columns:
    return blocked_dense_statistics(r_ixo, factors)
  return dense_sequence_gram(factors), dense_sequence_inner(r_ixo, factors)


def dense_combination(coeffs_s: jax.Array, factors: DenseSequenceFactors) -> jax.Array:
  """sum_i c_i S_i = A^T ((E c) * G): (d_in, d_out), one matmul; as `projection.stacked_combination`."""
  coeffs_n = _one_hot_nxs(factors) @ coeffs_s.astype(jnp.float32)
  return _float32(factors.activations).T @ (coeffs_n[:, None] * _float32(factors.output_grads))


def choose_dense_path(num_sequences: int, tokens_per_sequence: int, d_in: int, d_out: int,
                      mode: str = "auto") -> str:
  """"matrix_free" or "materialise" for a dense kernel, by `mode` or (mode="auto") by multiply-adds.

  Beyond the backward pass, per microbatch of n sequences of T tokens (n_tok = n T), |W| = d_in d_out:
    matrix-free   Gram n_tok^2 (d_in + d_out) / 2, <R, S_i> n_tok |W|, combination n_tok |W|;
    materialise   S_i = A_i^T G_i in place of the backward's own A^T G matmul (the kernel gradient
                  becomes -sum_i A_i S_i), then Gram n^2 |W| and inner products, combination and
                  gradient 3 n |W|; memory n |W| floats for the stacked S_i.
  "auto" picks the one with fewer multiply-adds, which is "materialise" unless T is tiny; request
  "matrix_free" where n |W| floats per kernel do not fit (it holds only the token factors and a
  2 T n_tok Gram transient, and is the path for long-microbatch, memory-bound runs).
  """
  if mode not in DENSE_PATHS:
    raise ValueError(f"unknown dense path mode {mode!r}; expected one of {DENSE_PATHS}")
  if mode != "auto":
    return mode
  n_tok, size = num_sequences * tokens_per_sequence, d_in * d_out
  matrix_free = n_tok**2 * (d_in + d_out) // 2 + 2 * n_tok * size
  materialise = (num_sequences**2 + 3 * num_sequences) * size
  return "matrix_free" if matrix_free < materialise else "materialise"
