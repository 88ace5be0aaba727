"""The fused path placed in a model (docs/algorithm.md#fused-statistics): which `Dense` kernels are
fused, the slot each one holds, and the function `capture.policy_gradient_and_fused_changes`
differentiates.

`proma_jax.fused` is the math of one fused kernel's backward step; this module puts a
`FusedSlotVariable` (that kernel's R, metrics, key and the shared per-sequence fields) in every
fused `Dense` layer of the model, differentiates with respect to (the other leaves, every R, the
metrics) at once, and sorts the result into the `grads` and `fused` trees the transform takes.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from proma_jax import fused as fused_lib, leaf_change
from proma_jax.transform_state import ProMAState


class FusedSlotVariable(nnx.Variable):
  """A `Dense` layer's `fused.FusedSlot` while `policy_gradient_and_fused_changes` runs it, with
  its `fused.FusedRule` as the metadata `rule` (static: it survives `nnx.split`, so scanned layers
  hand it to every layer)."""

  def dense(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """y = x W by `fused.fused_dense`, whose backward pass also gives the change of R_W."""
    return fused_lib.fused_dense(self.rule, x, kernel, self.get_value())


class FusedLayout(NamedTuple):
  """The model split for the fused path: its params as flat leaves, and which are fused kernels.

  fused_paths: the module path of each fused `Dense` -> the index of its kernel among `leaves`;
  fused_idx: those indices ascending (the order of the kernels' slots); other_idx: the rest.
  """

  graphdef: Any
  params: Any
  rest: Any
  params_def: Any
  leaves: list
  fused_paths: dict[tuple, int]
  fused_idx: list[int]
  other_idx: list[int]


def fused_layout(model: nnx.Module, calls: dict[tuple, int]) -> FusedLayout:
  """The fused kernels of `model`: those of the `Dense` layers called once (`calls`, module path
  -> number of calls by the objective, `capture.dense_calls`).

  Raises ValueError when a layer is called twice (it would add two changes of R) or none is.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  paths_leaves, params_def = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))
  leaves = [leaf for _, leaf in paths_leaves]
  index = {tuple(k.key for k in path): i for i, (path, _) in enumerate(paths_leaves)}
  twice = [path for path, n in calls.items() if n > 1]
  if twice:
    raise ValueError(f"Dense layer(s) {twice} are called more than once in one forward pass; the "
                     "fused path would add one change of R per call. Use the unfused path "
                     "(seq_grads=/factors=; config proma.fused=False)")
  fused_paths = {path: index[path + ("kernel",)] for path, n in calls.items() if n == 1}
  if not fused_paths:
    raise ValueError("the fused path found no proma_jax.Dense layer that the objective calls, so "
                     "there is nothing to fuse; build the model's dense layers with "
                     "proma_jax.Dense, or use the unfused path (config proma.fused=False)")
  fused_idx = sorted(fused_paths.values())
  other_idx = [i for i in range(len(leaves)) if i not in set(fused_idx)]
  return FusedLayout(graphdef, params, rest, params_def, leaves, fused_paths, fused_idx,
                     other_idx)


def slot_maker(layout: FusedLayout, rule: fused_lib.FusedRule, proma_state: ProMAState,
               num_microbatches: int, shared: tuple, param_shardings: Any = None
               ) -> Callable[[int, jax.Array, jax.Array], tuple[fused_lib.FusedSlot,
                                                                 fused_lib.FusedRule]]:
  """`(leaf index, R, metrics) -> (slot, rule)` of each fused kernel at the transform's state.

  The keys and the skip decision are the transform's own (`leaf_change.range_finder_keys`,
  `leaf_change.projects_now`); `shared` is (cotangent weights, advantages, scale, token mask),
  the fields every kernel's slot holds. With `param_shardings` (an FSDP mesh) each kernel's rule
  shards its stacked S_i like the kernel (`FusedRule.stack_sharding`).
  """
  sharding_leaves = (None if param_shardings is None
                     else layout.params_def.flatten_up_to(param_shardings))
  keys = leaf_change.range_finder_keys(0 if rule.intra is None else rule.intra.seed,
                                       proma_state.count, len(layout.leaves))
  project = leaf_change.projects_now(
      proma_state.microbatch, num_microbatches,
      0.0 if rule.accumulation is None else rule.accumulation.skip_fraction)
  common = (*shared, project)

  def slot_and_rule(idx, r, metrics):
    stacked = layout.leaves[idx].ndim == 3  # (L, d_in, d_out)
    sharding = None if sharding_leaves is None else sharding_leaves[idx]
    return (_kernel_slot(r, metrics, keys[idx], common, stacked),
            _kernel_rule(rule, sharding, layout.leaves[idx].ndim, stacked))

  return slot_and_rule


def _kernel_slot(r: jax.Array, metrics: jax.Array, key: jax.Array, common: tuple,
                 stacked: bool) -> fused_lib.FusedSlot:
  """One fused kernel's `FusedSlot`: its R and metrics, its range finder key, and the fields all
  kernels share (`common`, the slot's fields after the key)."""
  if not stacked:
    return fused_lib.FusedSlot(r, metrics, key, *common)
  # Scanned layers: every field gets the layer axis, so that `models.stacked.scan` hands each
  # layer its slice (the shared fields are broadcast; they are a few numbers per sequence).
  n_layers = r.shape[0]
  common = [None if x is None else jnp.broadcast_to(x, (n_layers, *jnp.shape(x)))
            for x in common]
  return fused_lib.FusedSlot(r, metrics, leaf_change.layer_keys(key, n_layers), *common)


def _kernel_rule(rule: fused_lib.FusedRule, sharding, ndim: int,
                 stacked: bool) -> fused_lib.FusedRule:
  """`rule` for one fused kernel of `ndim` dimensions: on an FSDP mesh (`sharding`, the kernel's
  NamedSharding) its stacked S_i are sharded like one layer's kernel, sequence axis replicated."""
  if sharding is None:
    return rule
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  layer_spec = spec[1:] if stacked else spec  # one layer's kernel inside the scan
  return rule._replace(stack_sharding=jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(None, *layer_spec)))


def fused_gradients(weighted, batch: Any, layout: FusedLayout, slot_and_rule,
                    proma_state: ProMAState, scale: jax.Array) -> tuple[list, list, Any]:
  """(grads leaves, fused leaves, (f_n, aux)) from one backward pass of `weighted(model, batch)`
  (`capture._weighted_objective`) with a slot in every fused `Dense`: the loss gradient (`scale`
  times the weighted objective's) at the other leaves, the change of R at the fused kernels, and
  a `FusedLeaf` of each kernel's metrics."""
  r_leaves = layout.params_def.flatten_up_to(proma_state.accumulator)
  other = [layout.leaves[i] for i in layout.other_idx]
  rs = [r_leaves[i] for i in layout.fused_idx]
  zeros = [jnp.zeros(layout.leaves[i].shape[:-2] + (2,), jnp.float32) for i in layout.fused_idx]
  (other_grads, changes, metrics), f_n_and_aux = jax.grad(
      _fused_objective(weighted, batch, layout, slot_and_rule), argnums=(0, 1, 2),
      has_aux=True)(other, rs, zeros)

  grad_leaves = [None] * len(layout.leaves)
  for i, g in zip(layout.other_idx, other_grads):
    grad_leaves[i] = (scale * g).astype(g.dtype)
  fused_leaves = [None] * len(layout.leaves)
  for i, change, metric in zip(layout.fused_idx, changes, metrics):
    grad_leaves[i] = change
    fused_leaves[i] = leaf_change.FusedLeaf(metric[..., 0], metric[..., 1])
  return grad_leaves, fused_leaves, f_n_and_aux


def _fused_objective(weighted, batch: Any, layout: FusedLayout, slot_and_rule):
  """(other leaves, fused kernels' R, their metrics) -> `weighted` of the model with those leaves
  and a `FusedSlotVariable` in every fused `Dense` (`slot_and_rule` gives its slot and rule)."""
  position = {idx: pos for pos, idx in enumerate(layout.fused_idx)}  # leaf index -> slot position

  def run(other_leaves, fused_rs, fused_metrics):
    full = list(layout.leaves)
    for i, value in zip(layout.other_idx, other_leaves):
      full[i] = value
    state = jax.tree.map(lambda x: x, layout.params)
    nnx.replace_by_pure_dict(state, layout.params_def.unflatten(full))
    m = nnx.merge(layout.graphdef, state, layout.rest)
    for path, module in nnx.iter_modules(m):
      idx = layout.fused_paths.get(tuple(path))
      if idx is not None:
        pos = position[idx]
        slot, rule = slot_and_rule(idx, fused_rs[pos], fused_metrics[pos])
        module.proma_slot = FusedSlotVariable(slot, rule=rule)
    return weighted(m, batch)

  return run
