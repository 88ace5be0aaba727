"""The checks of a PROMA transform's `update` arguments: grads, params and the statistics
(seq_grads, factors, fused) against each other, leaf by leaf, before anything is computed.

`split_extra_args` sorts `update`'s keywords into the statistics and those for the inner optimizer;
`check_update_args` checks them and returns them flattened like grads (`UpdateLeaves`). A stacked
leaf (`stacked=`) is checked layer by layer, as the leaves of its layers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from proma_jax.leaf_change import AccumulationOptions, FusedLeaf, IntraOptions, resolve_stacked
from proma_jax.seqgrads import DenseFactors, DenseSequenceFactors


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


class UpdateLeaves(NamedTuple):
  """`update`'s checked inputs as lists aligned with the leaves of grads (None where not given)."""

  treedef: Any
  grads: list
  seq_grads: list
  factors: list
  fused: list
  stacked: list[bool]


def split_extra_args(extra_args: dict, required: tuple[str, ...], inner_args: tuple[str, ...],
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


def check_update_args(grads, params, given: dict, required: tuple[str, ...],
                      stacked) -> UpdateLeaves:
  """grads, params and the statistics checked against each other and flattened like grads."""
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(grads)
  paths = [p for p, _ in paths_leaves]
  g_leaves = [jnp.asarray(g) for _, g in paths_leaves]
  _check_params(paths, g_leaves, treedef, params)
  seq_grads, factors, fused = (_leaves_like_grads(name, given[name], treedef, paths)
                               for name in ("seq_grads", "factors", "fused"))
  leaves = UpdateLeaves(treedef, g_leaves, seq_grads, factors, fused,
                         resolve_stacked(stacked, grads))
  for path, g, s, f, fused, st in zip(paths, leaves.grads, leaves.seq_grads, leaves.factors,
                                      leaves.fused, leaves.stacked):
    _check_leaf(path, g, s, f, fused, st)
  _check_required(given, required)
  return leaves
