"""PROMA as Optax gradient transformations (docs/algorithm.md: "Accumulation PROMA", "Intra-microbatch PROMA").

Each microbatch's policy gradient M_m is fed to `update` as `grads`, one call per microbatch. The
transform keeps the accumulator R (float32), projects it as the chosen variant prescribes, and on
the last microbatch of a minibatch hands R to the inner optimizer (which thus runs once per step)
and resets. From the caller's side this behaves like `optax.MultiSteps`: calls 1..M-1 return
all-zero updates and leave the inner state alone.

Usage::

  tx = proma_jax.proma_accumulation(
      optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5)), num_microbatches=4)
  state = tx.init(params)
  for microbatch in minibatch:                      # 4 calls = one optimizer step
    grads, seq_grads = proma_jax.policy_gradient_and_sequence_gradients(...)
    updates, state = tx.update(grads, state, params, seq_grads=seq_grads)
    params = optax.apply_updates(params, updates)   # zero updates until the 4th call

Data parallelism (`proma_jax.mesh`). Exact: jit the microbatch function with the sequences sharded
over a mesh axis and params replicated; the math is unchanged and the compiler inserts the
collectives, so the result is the one device would compute. Local: pass `axis_name` and call
`update` inside `jax.shard_map` over that axis, each device with its own shard's grads and
statistics. Each device then projects with its own sequences only (accumulation: R against its own
span, `projection.accumulation_change`; intra: its own M^(d) with its own factors, the paper's
data-parallel variant) and the changes of R are summed by one psum of a parameter-sized tree per
microbatch. The state stays replicated.

This module holds the factories and the metrics. One leaf's math, shared with the fused path, is
in `proma_jax.leaf_change`; the checks of `update`'s arguments in `proma_jax.transform_checks`;
`ProMAState` and the steps that advance it in `proma_jax.transform_state`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# Re-exported: `proma_jax.transforms` is where the package, the tests and users import these from.
from proma_jax.leaf_change import (
    AccumulationOptions,
    FusedLeaf,
    IntraOptions,
    layer_keys,
    layerwise_change,
    microbatch_change,
    projects_now,
    range_finder_keys,
    resolve_stacked,
)
from proma_jax.transform_checks import check_update_args, split_extra_args
from proma_jax.transform_state import (
    ProMAState,
    accept_if_finite,
    init_state,
    inner_step,
    next_state,
    projected_changes,
    sum_over_devices,
    update_dtypes,
)

__all__ = [
    "AccumulationOptions",
    "FusedLeaf",
    "IntraOptions",
    "ProMAState",
    "find_proma_state",
    "layer_keys",
    "layerwise_change",
    "microbatch_accumulation",
    "microbatch_change",
    "proma_accumulation",
    "proma_both",
    "proma_intra",
    "proma_metrics",
    "projects_now",
    "range_finder_keys",
    "resolve_stacked",
]


def _proma(inner: optax.GradientTransformation, num_microbatches: int,
           accumulation: AccumulationOptions | None, intra: IntraOptions | None,
           axis_name: str | None = None,
           inner_args: tuple[str, ...] = (),
           stacked=None) -> optax.GradientTransformationExtraArgs:
  """The PROMA transform shared by every variant (projection off where its options are None).

  Per microbatch: grads M_m -> each leaf's change of R (intra projection of M_m, then projection
  of R against the microbatch's span) -> psum over devices (local mode) -> R + change if finite
  -> on the step's last microbatch the inner optimizer on R, metrics, reset.
  """
  if not isinstance(num_microbatches, jax.core.Tracer) and (
      int(num_microbatches) != num_microbatches or num_microbatches < 1):
    raise ValueError(f"num_microbatches must be an integer >= 1, got {num_microbatches}")
  inner = optax.with_extra_args_support(inner)
  inner_args = (inner_args,) if isinstance(inner_args, str) else tuple(inner_args)
  # The statistics this variant projects with: each must be given (a misspelt or missing keyword
  # would otherwise silently run plain accumulation).
  required = tuple(name for name, needed in (
      ("seq_grads", accumulation is not None and accumulation.projects),
      ("factors", intra is not None)) if needed)
  skip_fraction = 0.0 if accumulation is None else accumulation.skip_fraction

  def init_fn(params):
    return init_state(params, inner, intra, stacked)

  def update_fn(grads, state: ProMAState, params=None, **extra_args):
    given, inner_extra_args = split_extra_args(extra_args, required, inner_args, accumulation,
                                               intra)
    leaves = check_update_args(grads, params, given, required, stacked)
    r_leaves = leaves.treedef.flatten_up_to(state.accumulator)

    # With axis_name (inside shard_map), m and the statistics are this device's own: the changes
    # are summed over the devices (the local data-parallel mode).
    project = projects_now(state.microbatch, num_microbatches, skip_fraction)
    keys = range_finder_keys(0 if intra is None else intra.seed, state.count, len(leaves.grads))
    changes = projected_changes(r_leaves, leaves, keys, project, accumulation, intra)
    if axis_name is not None:
      changes = sum_over_devices(changes, axis_name)
    step = accept_if_finite(state, r_leaves, changes, leaves.treedef, project)

    # The inner optimizer steps once per M microbatches, and not at all when every microbatch of
    # the step was dropped.
    last = state.microbatch == num_microbatches - 1
    updates, inner_state = inner_step(
        inner, last & (step.accepted > 0), step.accumulator, update_dtypes(leaves, params),
        state.inner_state, params, inner_extra_args)
    return updates, next_state(state, step, inner_state, last, num_microbatches, leaves.treedef,
                               intra)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def microbatch_accumulation(inner: optax.GradientTransformation, num_microbatches: int, *,
                            axis_name: str | None = None,
                            inner_args: tuple[str, ...] = (),
                            stacked=None) -> optax.GradientTransformationExtraArgs:
  """Plain gradient accumulation with the PROMA transforms' state, metrics and dtype handling.

      R <- sum_m M_m;   inner.update(R) after M calls

  The baseline the PROMA variants are compared against (same code path with projection off).
  `update(grads, state, params=None)` takes no statistics.
  """
  return _proma(inner, num_microbatches, None, None, axis_name, inner_args, stacked)


def proma_accumulation(inner: optax.GradientTransformation, num_microbatches: int, *,
                       shrinkage: float = 1.0, ridge: float = 1e-2,
                       relative_bound: float | None = None, skip_fraction: float = 0.0,
                       solver: str = "exact",
                       axis_name: str | None = None,
                       inner_args: tuple[str, ...] = (),
                       stacked=None) -> optax.GradientTransformationExtraArgs:
  """Accumulation-based PROMA (docs/algorithm.md, "Accumulation PROMA"), layer-wise on every leaf with sequence gradients.

      R <- M_1;  for m = 2..M:  R <- R - shrinkage * P_m(R) + M_m;  inner.update(R)

  P_m(R) = sum_i w_i S^_i projects R onto the span of microbatch m's normalised sequence
  gradients S^_i = S_i / (||S_i|| + 1e-8), with w = (K + ridge I)^-1 b, K_ij = <S^_i, S^_j>,
  b_i = <R, S^_i> (solver="exact") or two sequential Gram-Schmidt sweeps (solver="gram_schmidt").
  With `relative_bound`, ||P|| is capped at relative_bound * ||M_m||. Microbatches with 0-based index
  < skip_fraction * M are accumulated without projection. shrinkage=0 is plain accumulation.

  Args:
    inner: the optimizer that receives R once per M microbatches, cast to the dtypes of `grads`
      (R itself and the solve are float32; bf16 or mixed-precision trees work as with
      `optax.MultiSteps`).
    num_microbatches: M, microbatches per optimizer step.
    inner_args: names of extra `update` keywords to forward to the inner optimizer. Any other
      keyword raises TypeError, and a missing `seq_grads` raises ValueError (unless shrinkage is
      a concrete 0), so a misspelt argument never silently runs plain accumulation.
    axis_name: None (one device, or exact mode under sharded jit), or the mesh axis of
      `jax.shard_map` that `update` is called in: local mode, R <- R + sum_d (M^(d) -
      shrinkage * P^(d)(R)) with P^(d) the projection onto device d's own sequences (an
      approximation; one psum per microbatch). `proma/reduction` is then the root-sum-square of the
      devices' removed norms over ||R||.
    stacked: leaves whose leading axis stacks the layers of a scanned model (`models.stacked`):
      None, a tree like params of bools, or a function of params giving one (e.g.
      `models.stacked.stacked_paths`). Each layer of a stacked leaf is projected as a leaf of its
      own (`layerwise_change`): its statistics then carry the layer axis too (seq_grads
      (n_seq, L, ...); factors' and `DenseSequenceFactors`' activations and output_grads
      (L, n_tok, d)), and its intra metric is one number per layer. The same option exists on
      every PROMA transform.
  Update:
    `update(grads, state, params=None, *, seq_grads)`: grads is M_m (any pytree); seq_grads has the
    structure of grads, each leaf of shape (n_seq, *leaf.shape) (the S_i), or, for a 2-D dense
    kernel, a `DenseSequenceFactors` (the S_i in factored form; statistics computed matrix-free),
    or None (leaf accumulated unprojected). Non-finite microbatches are dropped and counted in
    `state.dropped`; if every microbatch of a step is dropped, the inner optimizer does not step.
    The fused path (`policy_gradient_and_fused_changes`, docs/algorithm.md#fused-statistics)
    passes `fused=` instead for the dense kernels: a tree like grads with a `FusedLeaf` where the
    grads leaf is already the change of R computed in the backward pass (`microbatch_change`);
    this holds for `proma_intra` and `proma_both` too.

  Scheduling: `optax.inject_hyperparams(proma_accumulation)(inner, M, shrinkage=0.5)` makes
  shrinkage, ridge, relative_bound and skip_fraction state that can be changed or scheduled under
  jit (`relative_bound` only if given as a number).
  """
  return _proma(inner, num_microbatches,
                AccumulationOptions(shrinkage, ridge, relative_bound, skip_fraction, solver), None,
                axis_name, inner_args, stacked)


def proma_intra(inner: optax.GradientTransformation, num_microbatches: int, *, rank: int = 10,
                shrinkage: float = 1.0, power_iters: int = 1, seed: int = 0,
                axis_name: str | None = None,
                inner_args: tuple[str, ...] = (),
                stacked=None) -> optax.GradientTransformationExtraArgs:
  """Intra-microbatch PROMA (docs/algorithm.md, "Intra-microbatch PROMA") on every dense kernel.

      M_m <- M_m - shrinkage * Qa Qa^T M_m Qg Qg^T;   R <- R + M_m;   inner.update(R) after M calls

  Qa (d_in x k), Qg (d_out x k): dominant row spaces of the microbatch's layer inputs A and output
  gradients G (randomized range finder, `power_iters` subspace iterations, k = min(rank, n, d_in, d_out)).
  With `axis_name` (inside `jax.shard_map`), each device projects its own M^(d) with its own
  factors and R <- R + sum_d M'^(d) by one psum (the paper's data-parallel variant);
  `intra_reduction` is averaged over the devices.

  Update:
    `update(grads, state, params=None, *, factors)`: factors has the structure of grads with a
    `DenseFactors(activations (n, d_in), output_grads (n, d_out))` at 2-D kernel leaves and None
    elsewhere (accumulated unprojected). The fraction of each kernel's norm removed, averaged
    over the step, is in `state.intra_reduction`. Missing `factors` raises; `inner_args` and
    dtypes as in `proma_accumulation`. Under `optax.inject_hyperparams`, `rank` and `power_iters`
    must be in static_args (they fix shapes and loop counts).
  """
  return _proma(inner, num_microbatches, None, IntraOptions(rank, shrinkage, power_iters, seed),
                axis_name, inner_args, stacked)


def proma_both(inner: optax.GradientTransformation, num_microbatches: int, *, rank: int = 10,
               intra_shrinkage: float = 1.0, power_iters: int = 1, seed: int = 0,
               shrinkage: float = 1.0, ridge: float = 1e-2, relative_bound: float | None = None,
               skip_fraction: float = 0.0, solver: str = "exact",
               axis_name: str | None = None,
               inner_args: tuple[str, ...] = (),
               stacked=None) -> optax.GradientTransformationExtraArgs:
  """Both variants: intra-project M_m (`proma_intra`), then project R as `proma_accumulation` and add M_m.

      M'_m = M_m - intra_shrinkage * Qa Qa^T M_m Qg Qg^T;   R <- R - shrinkage * P_m(R) + M'_m

  The relative bound is taken against ||M'_m||. `update(grads, state, params, *, seq_grads, factors)`:
  both are required (a missing one raises).
  With `axis_name`, both projections are device-local: R <- R + sum_d (M'^(d) - shrinkage P^(d)(R)).
  """
  return _proma(inner, num_microbatches,
                AccumulationOptions(shrinkage, ridge, relative_bound, skip_fraction, solver),
                IntraOptions(rank, intra_shrinkage, power_iters, seed), axis_name, inner_args,
                stacked)


def find_proma_state(opt_state) -> ProMAState | None:
  if isinstance(opt_state, ProMAState):
    return opt_state
  if isinstance(opt_state, (tuple, list)):
    for sub in opt_state:
      found = find_proma_state(sub)
      if found is not None:
        return found
  return None


def proma_metrics(opt_state) -> dict[str, jax.Array]:
  """Metrics of the last completed step from a PROMA state (or any optax state containing one).

  `proma/reduction`: mean over projected microbatches of ||shrinkage * P|| / ||R||.
  `proma/intra_reduction`: mean over projected kernels of the fraction of norm removed, and
  (intra variants) `proma/intra_reduction/<leaf path>` for every leaf, 0 where nothing was removed.
  Jittable. `proma/dropped`: non-finite microbatches dropped.
  `grad/norm`: global norm of the accumulated update direction R handed to the inner optimizer.
  """
  state = find_proma_state(opt_state)
  if state is None:
    raise ValueError("opt_state holds no ProMAState")
  metrics = {"proma/reduction": state.reduction, "proma/dropped": state.dropped,
             "grad/norm": state.update_norm}
  if state.intra_reduction is None:  # no intra projection in this variant
    metrics["proma/intra_reduction"] = jnp.zeros((), jnp.float32)
    return metrics
  # Every leaf is listed (0 for leaves never projected) so that the keys do not depend on values
  # and the function can be jitted; the mean is over the leaves that had something removed.
  # A stacked leaf (`stacked=`) has one value per layer: `<leaf path>/<layer>`.
  per_leaf = {}
  for path, value in jax.tree_util.tree_flatten_with_path(state.intra_reduction)[0]:
    name = f"proma/intra_reduction/{jax.tree_util.keystr(path, simple=True, separator='/')}"
    if jnp.ndim(value):
      per_leaf.update({f"{name}/{layer}": value[layer] for layer in range(value.shape[0])})
    else:
      per_leaf[name] = value
  values = jnp.stack(list(per_leaf.values()) or [jnp.zeros((), jnp.float32)])
  positive = values > 0
  metrics["proma/intra_reduction"] = (
      jnp.sum(jnp.where(positive, values, 0.0)) / jnp.maximum(jnp.sum(positive), 1))
  metrics.update(per_leaf)
  return metrics
