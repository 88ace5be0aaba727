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
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

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


def _path_str(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _leaves_like_grads(name: str, tree: Any, grads_def, paths) -> list:
  """Leaves of `tree` aligned with the leaves of grads (a subtree per grad leaf, None allowed)."""
  if tree is None:
    return [None] * len(paths)
  try:
    return grads_def.flatten_up_to(tree)
  except (ValueError, TypeError) as err:
    raise ValueError(f"{name} must have the pytree structure of grads: {err}") from None


def _check_params(grads_paths, grads_leaves, grads_def, params) -> None:
  if params is None:
    return
  params_leaves = _leaves_like_grads("params", params, grads_def, grads_paths)
  for path, g, p in zip(grads_paths, grads_leaves, params_leaves):
    p_shape = getattr(p, "shape", None)
    if p_shape != g.shape:
      raise ValueError(f"grads{_path_str(path)} has shape {g.shape} but params{_path_str(path)} "
                       f"has shape {p_shape}")


def _check_dense_sequence_factors(path, g, f: DenseSequenceFactors) -> None:
  a, o, ids = f.activations, f.output_grads, f.segment_ids
  if g.ndim != 2:
    raise ValueError(f"seq_grads{_path_str(path)} is a DenseSequenceFactors but grads{_path_str(path)} "
                     f"has shape {g.shape}; only 2-D dense kernels (d_in, d_out) take one")
  shapes = tuple(getattr(x, "shape", None) for x in (a, o, ids))
  n = shapes[0][0] if shapes[0] else None
  if shapes != ((n, g.shape[0]), (n, g.shape[1]), (n,)):
    raise ValueError(f"seq_grads{_path_str(path)} has activations {shapes[0]}, output_grads "
                     f"{shapes[1]} and segment_ids {shapes[2]}; expected (n_tokens, {g.shape[0]}), "
                     f"(n_tokens, {g.shape[1]}) and (n_tokens,) for grads{_path_str(path)} of shape "
                     f"{g.shape}")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"seq_grads{_path_str(path)}.segment_ids must be integer, got {ids.dtype}")
  if int(f.num_sequences) != f.num_sequences or f.num_sequences < 1:
    raise ValueError(f"seq_grads{_path_str(path)}.num_sequences must be an integer >= 1, got "
                     f"{f.num_sequences!r}")
  if f.block_columns and (int(f.block_columns) != f.block_columns or f.block_columns < 0
                          or n % f.num_sequences):
    raise ValueError(f"seq_grads{_path_str(path)}.block_columns={f.block_columns!r} needs an "
                     f"integer >= 0 and the {n} tokens in {f.num_sequences} runs of equal length")


def _check_seq_grads(path, g, s) -> None:
  if s is None:
    return
  if isinstance(s, DenseSequenceFactors):
    _check_dense_sequence_factors(path, g, s)
    return
  if not hasattr(s, "shape") or s.ndim != g.ndim + 1 or s.shape[1:] != g.shape:
    raise ValueError(f"seq_grads{_path_str(path)} must have shape (n_seq, *{g.shape}) for "
                     f"grads{_path_str(path)} of shape {g.shape}; got {getattr(s, 'shape', type(s))}")


def _check_factors(path, g, f) -> None:
  if f is None:
    return
  if not isinstance(f, DenseFactors):
    raise ValueError(f"factors{_path_str(path)} must be a DenseFactors or None, got {type(f).__name__}")
  a, o = f.activations, f.output_grads
  if g.ndim != 2:
    raise ValueError(f"factors{_path_str(path)} given for grads{_path_str(path)} of shape {g.shape}; "
                     "only 2-D dense kernels (d_in, d_out) take factors")
  if a.ndim != 2 or o.ndim != 2 or a.shape[0] != o.shape[0] or (a.shape[1], o.shape[1]) != g.shape:
    raise ValueError(f"factors{_path_str(path)} have activations {a.shape} and output_grads {o.shape}; "
                     f"expected (n_tokens, {g.shape[0]}) and (n_tokens, {g.shape[1]}) for "
                     f"grads{_path_str(path)} of shape {g.shape}")


def _check_fused(path, s, f, fused) -> None:
  if fused is None:
    return
  if not isinstance(fused, FusedLeaf):
    raise ValueError(f"fused{_path_str(path)} must be a FusedLeaf or None, got {type(fused).__name__}")
  if s is not None or f is not None:
    raise ValueError(f"grads{_path_str(path)} has a FusedLeaf (its change was computed in the "
                     "backward pass) and also seq_grads or factors; give a leaf one or the other")


def _all_finite(leaves) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.array(True)]))


def _cast_like(tree, reference):
  """`tree`'s leaves in the dtypes of `reference`'s leaves (as `optax.MultiSteps` hands the sum on)."""
  return jax.tree.map(lambda x, ref: x.astype(jnp.asarray(ref).dtype), tree, reference)


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


def _layer_view(path, x, what: str):
  """The shape a checker sees for one layer of a stacked leaf's statistic."""
  if x is None:
    return None
  if isinstance(x, DenseSequenceFactors):
    return x._replace(activations=_layer_view(path, x.activations, what),
                      output_grads=_layer_view(path, x.output_grads, what))
  if isinstance(x, DenseFactors):
    return DenseFactors(_layer_view(path, x.activations, what),
                        _layer_view(path, x.output_grads, what))
  if not hasattr(x, "shape") or len(x.shape) < 1:
    raise ValueError(f"{what}{_path_str(path)} of a stacked leaf must have the layer axis, got "
                     f"{getattr(x, 'shape', type(x))}")
  return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)


def _seq_layer_view(path, g, s):
  if s is None or isinstance(s, DenseSequenceFactors):
    return _layer_view(path, s, "seq_grads")
  if not hasattr(s, "shape") or s.shape[1:] != g.shape:
    raise ValueError(f"seq_grads{_path_str(path)} must have shape (n_seq, *{g.shape}) for the "
                     f"stacked leaf grads{_path_str(path)} of shape {g.shape} (layer axis "
                     f"first); got {getattr(s, 'shape', type(s))}")
  return jax.ShapeDtypeStruct(s.shape[:1] + s.shape[2:], s.dtype)


class _UpdateLeaves(NamedTuple):
  """`update`'s checked inputs as lists aligned with the leaves of grads (None where not given)."""

  treedef: Any
  grads: list
  seq_grads: list
  factors: list
  fused: list
  stacked: list[bool]


class _Changes(NamedTuple):
  """One microbatch's change of R per leaf, with what the metrics need.

  removed_sq: sum over the leaves projected against R of ||shrinkage * P||^2; r_sq: sum of ||R||^2
  over the same leaves (sqrt(removed_sq / r_sq) is this microbatch's term of `proma/reduction`).
  """

  changes: list
  intra_fractions: list
  removed_sq: jax.Array
  r_sq: jax.Array


class _Accepted(NamedTuple):
  """The step's running values once a microbatch is added (or dropped as non-finite)."""

  accumulator: Any
  finite: jax.Array
  intra_fractions: list
  reduction_sum: jax.Array
  projected: jax.Array
  accepted: jax.Array


def _split_extra_args(extra_args: dict, required: tuple[str, ...], inner_args: tuple[str, ...],
                      accumulation: AccumulationOptions | None,
                      intra: IntraOptions | None) -> tuple[dict, dict]:
  """`update`'s keywords as (the statistics seq_grads/factors/fused, those for the inner optimizer).

  An unknown keyword or a statistic this variant does not project with raises TypeError.
  """
  unknown = sorted(set(extra_args) - ({"seq_grads", "factors", "fused"} | set(inner_args)))
  if unknown:
    raise TypeError(
        f"update() got unexpected keyword argument(s) {unknown}; this transform takes "
        f"{list(required) or 'no statistics'}" + (
            f" and forwards {list(inner_args)} to the inner optimizer" if inner_args else
            " (name keywords meant for the inner optimizer in inner_args=...)"))
  given = {name: extra_args.get(name) for name in ("seq_grads", "factors", "fused")}
  for name, takes in (("seq_grads", accumulation is not None), ("factors", intra is not None),
                      ("fused", accumulation is not None or intra is not None)):
    if given[name] is not None and not takes:
      raise TypeError(f"{name}= was given but this transform does not project with it; it "
                      f"takes {list(required) or 'no statistics'}")
  return given, {name: v for name, v in extra_args.items() if name not in given}


def _check_leaf(path, g, s, f, fused, stacked: bool) -> None:
  """One leaf's statistics against its gradient; each layer of a stacked leaf as its own leaf."""
  if stacked:
    _check_seq_grads(path, _layer_view(path, g, "grads"), _seq_layer_view(path, g, s))
    _check_factors(path, _layer_view(path, g, "grads"), _layer_view(path, f, "factors"))
  else:
    _check_seq_grads(path, g, s)
    _check_factors(path, g, f)
  _check_fused(path, s, f, fused)


def _check_required(given: dict, required: tuple[str, ...]) -> None:
  """Each statistic the variant projects with must be given (or the step is fused)."""
  none = lambda tree: all(
      leaf is None for leaf in jax.tree.leaves(tree, is_leaf=lambda x: x is None))
  for name in required:
    if none(given[name]) and none(given["fused"]):
      raise ValueError(
          f"this PROMA transform projects with {name}= but update() got "
          f"{'none' if given[name] is None else 'a tree whose leaves are all None'}: without it "
          f"the step would be plain gradient accumulation. Pass {name}=... (leaves left None "
          f"are accumulated unprojected)")


def _check_update_args(grads, params, given: dict, required: tuple[str, ...],
                       stacked) -> _UpdateLeaves:
  """grads, params and the statistics checked against each other and flattened like grads."""
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(grads)
  paths = [p for p, _ in paths_leaves]
  g_leaves = [jnp.asarray(g) for _, g in paths_leaves]
  _check_params(paths, g_leaves, treedef, params)
  seq_grads, factors, fused = (_leaves_like_grads(name, given[name], treedef, paths)
                               for name in ("seq_grads", "factors", "fused"))
  leaves = _UpdateLeaves(treedef, g_leaves, seq_grads, factors, fused,
                         resolve_stacked(stacked, grads))
  for path, g, s, f, fused, st in zip(paths, leaves.grads, leaves.seq_grads, leaves.factors,
                                      leaves.fused, leaves.stacked):
    _check_leaf(path, g, s, f, fused, st)
  _check_required(given, required)
  return leaves


def _projected_changes(r_leaves: list, leaves: _UpdateLeaves, keys: list, project: jax.Array,
                       accumulation: AccumulationOptions | None,
                       intra: IntraOptions | None) -> _Changes:
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
  return _Changes(changes, intra_fracs, removed_sq, r_sq)


def _sum_over_devices(changes: _Changes, axis_name: str) -> _Changes:
  """Local data-parallel mode: R <- R + sum_d change^(d), one psum of a parameter-sized tree.

  `proma/reduction` becomes the root-sum-square of the devices' removed norms over ||R||, and the
  intra fractions their mean over the devices.
  """
  return changes._replace(
      changes=jax.lax.psum(changes.changes, axis_name),
      removed_sq=jax.lax.psum(changes.removed_sq, axis_name),
      intra_fractions=jax.lax.pmean(changes.intra_fractions, axis_name))


def _accept_if_finite(state: ProMAState, r_leaves: list, changes: _Changes, treedef,
                      project: jax.Array) -> _Accepted:
  """R <- R + change when everything is finite, else R unchanged and the microbatch dropped.

  A non-finite M_m or statistic (of a projected microbatch) makes R + change non-finite: one check.
  A finite projected microbatch adds ||shrinkage * P|| / ||R|| to the step's reduction sum.
  """
  new_r = [r + change for r, change in zip(r_leaves, changes.changes)]
  finite = _all_finite(new_r + changes.intra_fractions)
  new_r = [jnp.where(finite, nr, r) for nr, r in zip(new_r, r_leaves)]
  counted = finite & project & (changes.r_sq > 0)
  ratio = jnp.sqrt(changes.removed_sq) / jnp.sqrt(jnp.maximum(changes.r_sq, 1e-30))
  return _Accepted(
      accumulator=treedef.unflatten(new_r), finite=finite, intra_fractions=changes.intra_fractions,
      reduction_sum=state.reduction_sum + jnp.where(counted, ratio, 0.0),
      projected=state.projected + counted.astype(jnp.int32),
      accepted=state.accepted + finite.astype(jnp.int32))


def _update_dtypes(leaves: _UpdateLeaves, params):
  """The dtypes R is handed on in: the gradient's; at a fused leaf (whose grads leaf is a float32
  change of R) the parameter's, when params are given."""
  params_leaves = ([None] * len(leaves.grads) if params is None
                   else leaves.treedef.flatten_up_to(params))
  return leaves.treedef.unflatten([
      p if fused is not None and p is not None else g
      for g, p, fused in zip(leaves.grads, params_leaves, leaves.fused)])


def _inner_step(inner, steps: jax.Array, accumulator, dtypes, inner_state, params,
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


def _next_state(state: ProMAState, step: _Accepted, inner_state, last: jax.Array,
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


def _init_state(params, inner: optax.GradientTransformation, intra: IntraOptions | None,
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
    return _init_state(params, inner, intra, stacked)

  def update_fn(grads, state: ProMAState, params=None, **extra_args):
    given, inner_extra_args = _split_extra_args(extra_args, required, inner_args, accumulation,
                                                intra)
    leaves = _check_update_args(grads, params, given, required, stacked)
    r_leaves = leaves.treedef.flatten_up_to(state.accumulator)

    # With axis_name (inside shard_map), m and the statistics are this device's own: the changes
    # are summed over the devices (the local data-parallel mode).
    project = projects_now(state.microbatch, num_microbatches, skip_fraction)
    keys = range_finder_keys(0 if intra is None else intra.seed, state.count, len(leaves.grads))
    changes = _projected_changes(r_leaves, leaves, keys, project, accumulation, intra)
    if axis_name is not None:
      changes = _sum_over_devices(changes, axis_name)
    step = _accept_if_finite(state, r_leaves, changes, leaves.treedef, project)

    # The inner optimizer steps once per M microbatches, and not at all when every microbatch of
    # the step was dropped.
    last = state.microbatch == num_microbatches - 1
    updates, inner_state = _inner_step(
        inner, last & (step.accepted > 0), step.accumulator, _update_dtypes(leaves, params),
        state.inner_state, params, inner_extra_args)
    return updates, _next_state(state, step, inner_state, last, num_microbatches, leaves.treedef,
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
