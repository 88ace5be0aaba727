"""PROMA's state (`ProMAState`) and the steps of a transform's `update` that advance it.

Per microbatch: each leaf's change of R (`projected_changes`), summed over the devices in local
mode (`sum_over_devices`), added to R when finite (`accept_if_finite`); on the step's last
microbatch the inner optimizer on R (`inner_step`), then the metrics and the reset (`next_state`).
`init_state` is the state before the first microbatch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from proma_jax.leaf_change import (
    AccumulationOptions,
    IntraOptions,
    layer_keys,
    layerwise_change,
    microbatch_change,
    resolve_stacked,
)
from proma_jax.transform_checks import UpdateLeaves


class ProMAState(NamedTuple):
  """State of a PROMA transform.

  microbatch:      index (0..M-1) of the next microbatch within the current optimizer step.
  accumulator:     R, float32, like params.
  inner_state:     state of the inner optimizer (advances once per M microbatches).
  count:           total microbatches seen (seeds the range finder).
  dropped:         microbatches dropped so far because their gradient or statistics were not finite.
  reduction_sum, projected: running sum of ||shrinkage * P|| / ||R|| over this step's projected
                   microbatches, and their number.
  accepted:        finite microbatches accumulated so far this step; when a step ends with none,
                   the inner optimizer does not step (no weight decay, no count advance).
  reduction:       that mean for the last completed step (metric `proma/reduction`).
  intra_sum:       like params, running sum of each kernel's fraction of norm removed this step
                   (None for variants without intra projection).
  intra_reduction: like params, its mean over the last completed step (0 for unprojected leaves;
                   None without intra projection).
  update_norm:     global norm of the R handed to the inner optimizer at the last completed step.
  """

  microbatch: jax.Array
  accumulator: Any
  inner_state: optax.OptState
  count: jax.Array
  dropped: jax.Array
  reduction_sum: jax.Array
  projected: jax.Array
  accepted: jax.Array
  reduction: jax.Array
  intra_sum: Any
  intra_reduction: Any
  update_norm: jax.Array


def _all_finite(leaves) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.array(True)]))


def _cast_like(tree, reference):
  """`tree`'s leaves in the dtypes of `reference`'s leaves (as `optax.MultiSteps` hands the sum on)."""
  return jax.tree.map(lambda x, ref: x.astype(jnp.asarray(ref).dtype), tree, reference)


class Changes(NamedTuple):
  """One microbatch's change of R per leaf, with what the metrics need.

  removed_sq: sum over the leaves projected against R of ||shrinkage * P||^2; r_sq: sum of ||R||^2
  over the same leaves (sqrt(removed_sq / r_sq) is this microbatch's term of `proma/reduction`).
  """

  changes: list
  intra_fractions: list
  removed_sq: jax.Array
  r_sq: jax.Array


class Accepted(NamedTuple):
  """The step's running values once a microbatch is added (or dropped as non-finite)."""

  accumulator: Any
  finite: jax.Array
  intra_fractions: list
  reduction_sum: jax.Array
  projected: jax.Array
  accepted: jax.Array


def projected_changes(r_leaves: list, leaves: UpdateLeaves, keys: list, project: jax.Array,
                      accumulation: AccumulationOptions | None,
                      intra: IntraOptions | None) -> Changes:
  """Each leaf's change of R, R <- R + change (`microbatch_change`, per layer when stacked).

  A fused leaf's change was computed inside the backward pass and arrives as its grads leaf.
  """
  changes, intra_fracs, removed_sq, r_sq = [], [], jnp.zeros(()), jnp.zeros(())
  for r, g, s, f, fused, key, st in zip(r_leaves, leaves.grads, leaves.seq_grads, leaves.factors,
                                        leaves.fused, keys, leaves.stacked):
    if fused is not None:  # per layer (L,) metrics for a stacked leaf
      change, removed_norm, frac = g.astype(jnp.float32), fused.removed_norm, fused.intra_fraction
    elif st:
      change, removed_norm, frac = layerwise_change(
          r, g.astype(jnp.float32), s, f, layer_keys(key, r.shape[0]), project, accumulation,
          intra)
    else:
      change, removed_norm, frac = microbatch_change(
          r, g.astype(jnp.float32), s, f, key, project, accumulation, intra)
    changes.append(change)
    intra_fracs.append(frac)
    if s is not None or (fused is not None and accumulation is not None):
      removed_sq = removed_sq + jnp.sum(jnp.square(removed_norm))
      r_sq = r_sq + jnp.sum(jnp.square(r))
  return Changes(changes, intra_fracs, removed_sq, r_sq)


def sum_over_devices(changes: Changes, axis_name: str) -> Changes:
  """Local data-parallel mode: R <- R + sum_d change^(d), one psum of a parameter-sized tree.

  `proma/reduction` becomes the root-sum-square of the devices' removed norms over ||R||, and the
  intra fractions their mean over the devices.
  """
  return changes._replace(
      changes=jax.lax.psum(changes.changes, axis_name),
      removed_sq=jax.lax.psum(changes.removed_sq, axis_name),
      intra_fractions=jax.lax.pmean(changes.intra_fractions, axis_name))


def accept_if_finite(state: ProMAState, r_leaves: list, changes: Changes, treedef,
                     project: jax.Array) -> Accepted:
  """R <- R + change when everything is finite, else R unchanged and the microbatch dropped.

  A non-finite M_m or statistic (of a projected microbatch) makes R + change non-finite: one check.
  A finite projected microbatch adds ||shrinkage * P|| / ||R|| to the step's reduction sum.
  """
  new_r = [r + change for r, change in zip(r_leaves, changes.changes)]
  finite = _all_finite(new_r + changes.intra_fractions)
  new_r = [jnp.where(finite, nr, r) for nr, r in zip(new_r, r_leaves)]
  counted = finite & project & (changes.r_sq > 0)
  ratio = jnp.sqrt(changes.removed_sq) / jnp.sqrt(jnp.maximum(changes.r_sq, 1e-30))
  return Accepted(
      accumulator=treedef.unflatten(new_r), finite=finite, intra_fractions=changes.intra_fractions,
      reduction_sum=state.reduction_sum + jnp.where(counted, ratio, 0.0),
      projected=state.projected + counted.astype(jnp.int32),
      accepted=state.accepted + finite.astype(jnp.int32))


def update_dtypes(leaves: UpdateLeaves, params):
  """The dtypes R is handed on in: the gradient's; at a fused leaf (whose grads leaf is a float32
  change of R) the parameter's, when params are given."""
  params_leaves = ([None] * len(leaves.grads) if params is None
                   else leaves.treedef.flatten_up_to(params))
  return leaves.treedef.unflatten([
      p if fused is not None and p is not None else g
      for g, p, fused in zip(leaves.grads, params_leaves, leaves.fused)])


def inner_step(inner, steps: jax.Array, accumulator, dtypes, inner_state, params,
               extra_args: dict):
  """(updates, inner state) of inner.update(R cast to `dtypes`) when `steps`, else zero updates
  and `inner_state` unchanged.

  The inner optimizer runs inside a lax.cond. Selecting its result with jnp.where (as
  optax.MultiSteps does) was measured to need more memory at every depth, 56-252 MiB more on 1-8
  Qwen3-0.6B-shaped layers (experiments/README.md, "Memory against depth").
  """

  def finish(_):
    updates, new_inner = inner.update(
        _cast_like(accumulator, dtypes), inner_state, params, **extra_args)
    # Both branches must give the same types: the inner state keeps its dtypes.
    return updates, _cast_like(new_inner, inner_state)

  def hold(_):
    return optax.tree.zeros_like(update_shapes), inner_state

  update_shapes = jax.eval_shape(finish, None)[0]
  return jax.lax.cond(steps, finish, hold, None)


def next_state(state: ProMAState, step: Accepted, inner_state, last: jax.Array,
               num_microbatches: int, treedef, intra: IntraOptions | None) -> ProMAState:
  """The state after this microbatch; on the step's last one the running sums become the step's
  metrics (reduction = reduction_sum / projected, intra_reduction = intra_sum / M) and reset."""
  reset = lambda tree: jax.tree.map(lambda x: jnp.where(last, jnp.zeros_like(x), x), tree)
  if intra is None:
    intra_sum = intra_reduction = None
  else:
    intra_sum = treedef.unflatten([
        acc + jnp.where(step.finite, frac, 0.0)
        for acc, frac in zip(treedef.flatten_up_to(state.intra_sum), step.intra_fractions)])
    intra_reduction = jax.tree.map(
        lambda s, old: jnp.where(last, s / num_microbatches, old), intra_sum,
        state.intra_reduction)
    intra_sum = reset(intra_sum)
  return ProMAState(
      microbatch=jnp.where(last, 0, state.microbatch + 1).astype(jnp.int32),
      accumulator=reset(step.accumulator),
      inner_state=inner_state,
      count=state.count + 1,
      dropped=state.dropped + (~step.finite).astype(jnp.int32),
      reduction_sum=reset(step.reduction_sum),
      projected=reset(step.projected),
      accepted=reset(step.accepted),
      reduction=jnp.where(last, step.reduction_sum / jnp.maximum(step.projected, 1),
                          state.reduction),
      intra_sum=intra_sum,
      intra_reduction=intra_reduction,
      update_norm=jnp.where(last, optax.tree.norm(step.accumulator), state.update_norm),
  )


def init_state(params, inner: optax.GradientTransformation, intra: IntraOptions | None,
               stacked) -> ProMAState:
  """The state before the first microbatch: R = 0, zero sums, the inner optimizer's first state."""
  stacked_leaves = resolve_stacked(stacked, params)
  # Every leaf is its own buffer, so the state can be donated to a jitted step.
  zeros = lambda: jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  scalar = lambda dtype=jnp.float32: jnp.zeros((), dtype)
  # One intra fraction per kernel: per layer for a stacked leaf.
  leaves, treedef = jax.tree.flatten(params)
  intra_tree = (lambda: None) if intra is None else (lambda: treedef.unflatten([
      jnp.zeros((jnp.shape(p)[0],) if st else (), jnp.float32)
      for p, st in zip(leaves, stacked_leaves)]))
  return ProMAState(
      microbatch=scalar(jnp.int32), accumulator=zeros(), inner_state=inner.init(params),
      count=scalar(jnp.int32), dropped=scalar(jnp.int32), reduction_sum=scalar(),
      projected=scalar(jnp.int32), accepted=scalar(jnp.int32), reduction=scalar(),
      intra_sum=intra_tree(), intra_reduction=intra_tree(), update_norm=scalar())
