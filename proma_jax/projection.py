"""Pure linear algebra of PROMA, one parameter leaf at a time.

The math: docs/algorithm.md#accumulation-proma, docs/algorithm.md#intra-microbatch-proma and
docs/algorithm.md#matrix-free-statistics-for-dense-layers.

Everything here works on plain float32 arrays and knows nothing of models or optimizers.

Accumulation projection. The sequence gradients S_i of one microbatch enter only through
  gram_nxn[i, j] = <S_i, S_j>      and      inner_n[i] = <R, S_i>
and the projection is a linear combination sum_i c_i S_i. So the same code serves stacked
sequence gradients (`stacked_statistics`) and the matrix-free dense path (`seqgrads.py`), which
produce these numbers without ever forming S_i.

With S^_i = S_i / (||S_i|| + eps), K = [<S^_i, S^_j>] and b = [<R, S^_i>]:
  exact:        w = (K + ridge I)^-1 b                 P = sum_i w_i S^_i
  gram_schmidt: two sequential sweeps R <- R - <R, S^_i> S^_i over i. In coefficient space this is
                two Gauss-Seidel sweeps on K w = b (sweep i reads <R - sum_j w_j S^_j, S^_i> =
                b_i - (K w)_i), and P = sum_i w_i S^_i = R - R_after.
  ||P||^2 = w^T K w, so the relative bound needs no extra pass over the parameters.

Intra projection. For a dense kernel M (d_in x d_out) with layer inputs A (n x d_in) and output
gradients G (n x d_out): M <- M - s Qa Qa^T M Qg Qg^T, with Qa, Qg orthonormal bases of the
dominant row spaces of A and G found by a randomized range finder.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NORM_EPS = 1e-8
SOLVERS = ("exact", "gram_schmidt")
GRAM_SCHMIDT_SWEEPS = 2
RANK_TOL = 1e-4


class SequenceSystem(NamedTuple):
  """The small n x n problem of one leaf and microbatch, in terms of the normalised S^_i.

  gram_nxn:  K_ij = <S^_i, S^_j>.
  inner_n:   b_i = <R, S^_i>.
  scale_n:   1 / (||S_i|| + eps): S^_i = scale_i S_i, so sum_i w_i S^_i = sum_i (w_i scale_i) S_i.
  """

  gram_nxn: jax.Array
  inner_n: jax.Array
  scale_n: jax.Array


def normalised_system(raw_gram_nxn: jax.Array, raw_inner_n: jax.Array,
                      eps: float = NORM_EPS) -> SequenceSystem:
  """From <S_i, S_j> and <R, S_i> to K = [<S^_i, S^_j>], b = [<R, S^_i>], S^_i = S_i / (||S_i|| + eps)."""
  norms_n = jnp.sqrt(jnp.maximum(jnp.diagonal(raw_gram_nxn), 0.0))
  scale_n = 1.0 / (norms_n + eps)
  gram_nxn = raw_gram_nxn * scale_n[:, None] * scale_n[None, :]
  return SequenceSystem(gram_nxn, raw_inner_n * scale_n, scale_n)


def stacked_statistics(r: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """<S_i, S_j> and <R, S_i> (Frobenius) for stacked sequence gradients s of shape (n, *r.shape).

  Contracted over the leaf's own axes without flattening them, so that when the leaf is sharded
  (FSDP) each device contracts its own shard and only the n x n and n partial sums are summed
  across devices (a flatten would make the compiler gather the S_i first)."""
  s32, r32 = s.astype(jnp.float32), r.astype(jnp.float32)
  leaf_axes = tuple(range(1, s.ndim))
  return (jnp.tensordot(s32, s32, axes=(leaf_axes, leaf_axes)),
          jnp.tensordot(s32, r32, axes=(leaf_axes, tuple(range(r.ndim)))))


def stacked_combination(coeffs_n: jax.Array, s: jax.Array) -> jax.Array:
  """sum_i c_i S_i for stacked sequence gradients s of shape (n, *leaf_shape)."""
  return jnp.tensordot(coeffs_n, s.astype(jnp.float32), axes=1)


def ridge_solve(gram_nxn: jax.Array, rhs_n: jax.Array, ridge: float) -> jax.Array:
  """w = (K + ridge I)^-1 b for symmetric positive semi-definite K, by eigendecomposition.

  Directions with K-eigenvalue + ridge at or below float32 round-off of the largest are dropped
  (pseudo-inverse), so ridge=0 with rank-deficient or all-zero K stays finite.
  """
  eigvals_n, eigvecs_nxn = jnp.linalg.eigh(gram_nxn)
  shifted_n = jnp.maximum(eigvals_n, 0.0) + ridge
  tol = jnp.finfo(jnp.float32).eps * gram_nxn.shape[0] * jnp.maximum(jnp.max(shifted_n), 1e-30)
  inv_n = jnp.where(shifted_n > tol, 1.0 / jnp.where(shifted_n > tol, shifted_n, 1.0), 0.0)
  return eigvecs_nxn @ (inv_n * (eigvecs_nxn.T @ rhs_n))


def gram_schmidt_coefficients(gram_nxn: jax.Array, inner_n: jax.Array,
                              sweeps: int = GRAM_SCHMIDT_SWEEPS) -> jax.Array:
  """Coefficients w of P = sum_i w_i S^_i = R - (sequential sweeps of R <- R - <R, S^_i> S^_i)(R).

  Sequential, never simultaneous: subtracting all projections at once computes (I - S S^T)^2 R,
  which blows up for correlated S (docs/algorithm.md#solvers).
  """
  n = inner_n.shape[0]

  def visit(t, w_n):
    i = t % n
    residual_inner = inner_n[i] - gram_nxn[i] @ w_n  # <R - sum_j w_j S^_j, S^_i>
    return w_n.at[i].add(residual_inner)

  return jax.lax.fori_loop(0, sweeps * n, visit, jnp.zeros_like(inner_n))


def span_coefficients(system: SequenceSystem, *, ridge: float, solver: str) -> jax.Array:
  """Coefficients w of the projection P = sum_i w_i S^_i of R onto span{S^_i}."""
  if solver == "exact":
    return ridge_solve(system.gram_nxn, system.inner_n, ridge)
  if solver == "gram_schmidt":
    return gram_schmidt_coefficients(system.gram_nxn, system.inner_n)
  raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")


def bounded_scale(w_n: jax.Array, gram_nxn: jax.Array, reference_norm: jax.Array,
                  relative_bound: float | None) -> tuple[jax.Array, jax.Array]:
  """(||P||, factor) with P = sum_i w_i S^_i: factor caps ||factor * P|| at relative_bound * reference_norm."""
  p_norm = jnp.sqrt(jnp.maximum(w_n @ gram_nxn @ w_n, 0.0))
  if relative_bound is None:
    return p_norm, jnp.ones((), jnp.float32)
  cap = relative_bound * reference_norm
  return p_norm, jnp.where(p_norm > cap, cap / jnp.maximum(p_norm, 1e-30), 1.0)


def removed_component(r: jax.Array, m: jax.Array, raw_gram_nxn: jax.Array, raw_inner_n: jax.Array,
                      combine, *, shrinkage: float, ridge: float, relative_bound: float | None,
                      solver: str) -> tuple[jax.Array, jax.Array]:
  """shrinkage * P_bounded(R), the part of R that accumulation-PROMA removes, and its norm.

  docs/algorithm.md#relative-bound-shrinkage-and-skip-fraction.

  Args:
    r: the accumulator R (float32), m: this microbatch's gradient M_m (float32, for the bound).
    raw_gram_nxn, raw_inner_n: <S_i, S_j> and <R, S_i> of this microbatch's sequence gradients.
    combine: c_n -> sum_i c_i S_i, shaped like r.
  Returns:
    (shrinkage * P_bounded shaped like r, ||shrinkage * P_bounded||).
  """
  system = normalised_system(raw_gram_nxn, raw_inner_n)
  w_n = span_coefficients(system, ridge=ridge, solver=solver)
  p_norm, factor = bounded_scale(w_n, system.gram_nxn, jnp.linalg.norm(m), relative_bound)
  coeffs_n = (shrinkage * factor) * w_n * system.scale_n
  return combine(coeffs_n).reshape(r.shape), shrinkage * factor * p_norm


def accumulation_change(r: jax.Array, m: jax.Array, raw_gram_nxn: jax.Array,
                        raw_inner_n: jax.Array, combine, *, shrinkage: float, ridge: float,
                        relative_bound: float | None,
                        solver: str) -> tuple[jax.Array, jax.Array]:
  """One leaf's change of R in accumulation-PROMA: R <- R + (M - shrinkage * P_bounded(R)).

  docs/algorithm.md#accumulation-proma. Arguments as `removed_component`; returns
  (M - shrinkage * P_bounded, ||shrinkage * P_bounded||).

  In local data-parallel mode each device d calls it with its own M^(d) and statistics: P^(d)
  projects the (replicated) R onto the span of device d's own sequence gradients only, the bound
  is taken against ||M^(d)||, and R <- R + sum_d (M^(d) - shrinkage P^(d)(R)). That approximates
  the projection onto the span of all the microbatch's sequences: it equals it when the devices'
  spans are mutually orthogonal, and with correlated spans it removes the shared directions once
  per device.
  """
  removed, removed_norm = removed_component(
      r, m, raw_gram_nxn, raw_inner_n, combine, shrinkage=shrinkage, ridge=ridge,
      relative_bound=relative_bound, solver=solver)
  return m - removed, removed_norm


def _transposed_product(z_nxk: jax.Array, x_nxd: jax.Array) -> jax.Array:
  """Z^T X, (k, d), contracting the token axis.

  Computed with the k x d output and kept so by an optimization barrier: otherwise XLA folds the
  transpose that the QR below needs into the dot, and its CPU backend computes X^T Z with a d x k
  output 5-10x slower than Z^T X (measured; experiments/README.md, "Step-time benchmark").
  """
  return jax.lax.optimization_barrier(jax.lax.dot_general(z_nxk, x_nxd, (((0,), (0,)), ((), ()))))


def row_space_basis(x_nxd: jax.Array, k: int, key: jax.Array, power_iters: int = 1) -> jax.Array:
  """Orthonormal d x k basis of the dominant k-dim row space of X by a randomized range finder.

  Y = X^T Omega (Omega n x k Gaussian), then `power_iters` rounds of Y <- X^T X Y (re-orthonormalised
  by QR between rounds), then Q = qr(Y). Float32 at least. Columns of Q whose R-diagonal is below
  RANK_TOL of the largest (X of rank < k) are zeroed, so no direction outside X's row space is used.
  """
  x_nxd = x_nxd.astype(jnp.promote_types(x_nxd.dtype, jnp.float32))
  omega_nxk = jax.random.normal(key, (x_nxd.shape[0], k), x_nxd.dtype)
  y_kxd = _transposed_product(omega_nxk, x_nxd)
  for _ in range(power_iters):
    q_dxk, _ = jnp.linalg.qr(y_kxd.T)
    y_kxd = _transposed_product(x_nxd @ q_dxk, x_nxd)
  q_dxk, r_kxk = jnp.linalg.qr(y_kxd.T)
  # Columns that carry no energy of X (rank(X) < k, or X = 0) are noise: drop them.
  energy_k = jnp.abs(jnp.diagonal(r_kxk))
  keep_k = energy_k > RANK_TOL * jnp.max(energy_k)
  return q_dxk * keep_k[None, :]


def intra_step(m_ixo: jax.Array, activations_nxi: jax.Array, output_grads_nxo: jax.Array,
               key: jax.Array, *, rank: int, shrinkage: float,
               power_iters: int) -> tuple[jax.Array, jax.Array]:
  """Intra-PROMA for one dense kernel: M - shrinkage * Qa Qa^T M Qg Qg^T, and the fraction removed.

  docs/algorithm.md#kronecker-projection-and-the-fraction-removed.

  k = min(rank, n, d_in, d_out). Returns (projected M, ||removed|| / ||M||).
  """
  n, d_in = activations_nxi.shape
  d_out = output_grads_nxo.shape[1]
  k = min(rank, n, d_in, d_out)
  key_a, key_g = jax.random.split(key)
  qa_ixk = row_space_basis(activations_nxi, k, key_a, power_iters)
  qg_oxk = row_space_basis(output_grads_nxo, k, key_g, power_iters)
  core_kxk = (qa_ixk.T @ m_ixo) @ qg_oxk  # Qa Qa^T M Qg Qg^T = Qa C Qg^T: the Kronecker block
  removed = shrinkage * (qa_ixk @ core_kxk @ qg_oxk.T)
  # Qa, Qg have orthonormal (or zero) columns, so ||Qa C Qg^T|| = ||C||: no pass over `removed`.
  fraction = abs(shrinkage) * jnp.linalg.norm(core_kxk) / jnp.maximum(jnp.linalg.norm(m_ixo), 1e-30)
  return m_ixo - removed, fraction
