"""One leaf's change of PROMA's accumulator for one microbatch: the math every PROMA transform and
the fused path (`proma_jax.fused`) share (docs/algorithm.md, "Accumulation PROMA",
"Intra-microbatch PROMA").

The variants' knobs (`AccumulationOptions`, `IntraOptions`), `microbatch_change` (R <- R + change
for one leaf), its per-layer form for stacked leaves (`layerwise_change`, `resolve_stacked`), and
the schedule both paths must agree on: which microbatches are projected (`projects_now`) and the
range finder's keys (`range_finder_keys`, `layer_keys`). `FusedLeaf` is what the fused path hands
the transform in place of the statistics.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from proma_jax import projection, seqgrads
from proma_jax.seqgrads import DenseFactors, DenseSequenceFactors


def _concrete(value) -> float | None:
  """`value` as a Python float when it is a concrete number, None when it is traced.

  Under `optax.inject_hyperparams` the factories are called inside jit with tracers for every
  numeric argument: those cannot be validated (the concrete values were checked at `init`).
  """
  if value is None or isinstance(value, jax.core.Tracer):
    return None
  return float(value)


def _check_range(name: str, value, ok, expected: str) -> None:
  v = _concrete(value)
  if v is not None and not (jnp.isfinite(v) and ok(v)):
    raise ValueError(f"{name} must be {expected}, got {value}")


def _check_static_int(name: str, value, minimum: int) -> None:
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{name} sets array shapes or loop counts and must be a Python int; under "
                    f"optax.inject_hyperparams pass static_args=({name!r}, ...)")
  if int(value) != value or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class AccumulationOptions:
  """Knobs of accumulation-PROMA (docs/algorithm.md, "Accumulation PROMA").

  Numbers may be traced (scheduled by `optax.inject_hyperparams`); only concrete ones are checked.
  """

  shrinkage: float = 1.0
  ridge: float = 1e-2
  relative_bound: float | None = None
  skip_fraction: float = 0.0
  solver: str = "exact"

  def __post_init__(self):
    _check_range("shrinkage", self.shrinkage, lambda v: v >= 0, ">= 0")
    _check_range("ridge", self.ridge, lambda v: v >= 0, ">= 0")
    if self.relative_bound is not None:
      _check_range("relative_bound", self.relative_bound, lambda v: v >= 0, ">= 0 or None")
    _check_range("skip_fraction", self.skip_fraction, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
    if self.solver not in projection.SOLVERS:
      raise ValueError(f"unknown solver {self.solver!r}; expected one of {projection.SOLVERS}")

  @property
  def projects(self) -> bool:
    """False only for a concrete shrinkage of 0 (plain accumulation: no seq_grads needed)."""
    return _concrete(self.shrinkage) != 0.0


@dataclasses.dataclass(frozen=True)
class IntraOptions:
  """Knobs of intra-microbatch PROMA (docs/algorithm.md, "Intra-microbatch PROMA").

  `rank` and `power_iters` fix shapes and loop counts: Python ints (static under
  `optax.inject_hyperparams`). `shrinkage` and `seed` may be traced.
  """

  rank: int = 10
  shrinkage: float = 1.0
  power_iters: int = 1
  seed: int = 0

  def __post_init__(self):
    _check_static_int("rank", self.rank, 1)
    _check_range("shrinkage", self.shrinkage, lambda v: v >= 0, ">= 0")
    _check_static_int("power_iters", self.power_iters, 0)


class FusedLeaf(NamedTuple):
  """What the fused path (`proma_jax.fused`) computed for one dense kernel inside its backward pass.

  The leaf of `grads` at a fused kernel is then not M_m but the accumulator's change that
  `microbatch_change` gives (R <- R + change); these are its metrics.
  removed_norm:     ||shrinkage * P_bounded(R)|| (0 when nothing was projected).
  intra_fraction:   the fraction of ||M_m|| that the intra projection removed (0 without it).
  """

  removed_norm: jax.Array
  intra_fraction: jax.Array


def microbatch_change(r: jax.Array, m: jax.Array, seq_grads, factors: DenseFactors | None,
                      key: jax.Array, project: jax.Array, accumulation: AccumulationOptions | None,
                      intra: IntraOptions | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One leaf's change of the accumulator for one microbatch: R <- R + change.

      M' = M_m - s_intra Qa Qa^T M_m Qg Qg^T          (with `factors`, docs: intra)
      change = M' - project * shrinkage * P_bounded(R)  (with `seq_grads`, docs: accumulation)

  The one place where a leaf's PROMA math is put together: `update` calls it for every leaf, and
  the fused path (`proma_jax.fused`) calls it inside each dense kernel's backward pass.

  Args:
    r: R (float32); m: M_m (float32). seq_grads: stacked S_i (n, *r.shape), a
    `DenseSequenceFactors`, or None (no accumulation projection). factors: `DenseFactors` or None
    (no intra projection). key: the range finder's key. project: boolean scalar (False for
    microbatches under skip_fraction).
  Returns:
    (change, ||shrinkage * P_bounded||, intra fraction removed).
  """
  fraction = jnp.zeros((), jnp.float32)
  if factors is not None:
    m, fraction = projection.intra_step(
        m, factors.activations, factors.output_grads, key, rank=intra.rank,
        shrinkage=intra.shrinkage, power_iters=intra.power_iters)
  if seq_grads is None:
    return m, jnp.zeros((), jnp.float32), fraction
  if isinstance(seq_grads, DenseSequenceFactors):  # matrix-free: S_i = A_i^T G_i is never formed
    gram, inner_prod = seqgrads.dense_statistics(r, seq_grads)
    combine = lambda c: seqgrads.dense_combination(c, seq_grads)
  else:
    gram, inner_prod = projection.stacked_statistics(r, seq_grads)
    combine = lambda c: projection.stacked_combination(c, seq_grads)
  change, removed_norm = projection.accumulation_change(
      r, m, gram, inner_prod, combine, shrinkage=accumulation.shrinkage, ridge=accumulation.ridge,
      relative_bound=accumulation.relative_bound, solver=accumulation.solver)
  return jnp.where(project, change, m), removed_norm, fraction


def projects_now(microbatch: jax.Array, num_microbatches: int, skip_fraction) -> jax.Array:
  """Whether microbatch `microbatch` (0-based) of a step is projected: index >= max(skip * M, 1)."""
  return microbatch.astype(jnp.float32) >= jnp.maximum(skip_fraction * num_microbatches, 1.0)


def range_finder_keys(seed, count: jax.Array, num_leaves: int) -> list[jax.Array]:
  """The intra range finder's key of each leaf (flattened order) at microbatch number `count`."""
  base_key = jax.random.fold_in(jax.random.PRNGKey(seed), count)
  return [jax.random.fold_in(base_key, idx) for idx in range(num_leaves)]


def layer_keys(key: jax.Array, num_layers: int) -> jax.Array:
  """The range finder's keys (num_layers, ...) of the layers of a stacked leaf with key `key`."""
  return jax.vmap(lambda layer: jax.random.fold_in(key, layer))(jnp.arange(num_layers))


def layerwise_change(r: jax.Array, m: jax.Array, seq_grads, factors: DenseFactors | None,
                     keys: jax.Array, project: jax.Array, accumulation: AccumulationOptions | None,
                     intra: IntraOptions | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`microbatch_change` of a leaf whose leading axis stacks L layers (`models.stacked`): each
  layer is its own leaf, with its own Gram and range finder (`keys`, (L, ...) from `layer_keys`),
  so layer l's statistics never mix with layer k's.

  r, m: (L, ...). seq_grads: stacked S_i (n, L, ...), a `DenseSequenceFactors` with activations
  (L, n_tok, d_in), output_grads (L, n_tok, d_out) and segment_ids (n_tok,), or None.
  factors: `DenseFactors` of (L, n_tok, d) arrays, or None. Returns (change (L, ...),
  removed norms (L,), intra fractions (L,)).
  """
  if isinstance(seq_grads, DenseSequenceFactors):
    s_axes = DenseSequenceFactors(0, 0, None, seq_grads.num_sequences, seq_grads.block_columns)
  else:
    s_axes = None if seq_grads is None else 1
  one_layer = lambda r, m, s, f, key: microbatch_change(r, m, s, f, key, project, accumulation,
                                                        intra)
  return jax.vmap(one_layer, in_axes=(0, 0, s_axes, None if factors is None else 0, 0))(
      r, m, seq_grads, factors, keys)


def resolve_stacked(stacked, tree) -> list[bool]:
  """The `stacked=` option of the PROMA transforms as one bool per leaf of `tree`: None (no leaf
  stacked), a tree like `tree` of bools, or a function of `tree` giving one."""
  leaves, treedef = jax.tree.flatten(tree)
  if stacked is None:
    return [False] * len(leaves)
  if callable(stacked):
    stacked = stacked(tree)
  try:
    flags = treedef.flatten_up_to(stacked)
  except (ValueError, TypeError) as err:
    raise ValueError(f"stacked= must be a tree of bools with the structure of the params: {err}"
                     ) from None
  for flag, leaf in zip(flags, leaves):
    if flag and jnp.ndim(leaf) < 1:
      raise ValueError("stacked= marks a scalar leaf as stacked; a stacked leaf has the layer axis "
                       "leading")
  return [bool(flag) for flag in flags]
