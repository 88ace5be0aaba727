"""Scanned decoder layers: the layers' parameters stacked on a leading axis and run by `lax.scan`.

With `ModelConfig.scan_layers`, `Transformer.layers` is ONE `Block` whose every parameter has a
leading layer axis of length L (`layers/self_attn/q_proj/kernel` is (L, d_in, d_out)), and the
forward pass is a `jax.lax.scan` over that axis: the block is traced and compiled once, whatever
the depth. The parameter dict of the unscanned model (`layers/3/self_attn/q_proj/kernel`) and the
stacked one hold the same numbers; `stack_layers` and `unstack_layers` convert between them, so
checkpoint files, the Hugging Face and GGUF loaders and older runs' checkpoints keep one layout.

`scan` runs a stacked module under `nnx.capture` too: Flax's capture cannot see through a scan
(flax#5571), so the captures of the block's modules (sown intermediates, perturbations) are carried
in and out of the scan explicitly, each with the layer axis leading. Every other `nnx.Variable`
of the stacked module (a `fused_slots.FusedSlotVariable`, for instance) must have the layer axis
leading too: it is sliced like the parameters (its metadata, static, reaches every layer).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import pytreelib

LAYERS = "layers"
_CAPTURES = "__captures__"


def is_stacked(params: dict) -> bool:
  """Whether a pure parameter dict has its layers stacked (no integer keys under "layers")."""
  layers = params.get(LAYERS)
  return isinstance(layers, dict) and bool(layers) and not any(
      isinstance(k, int) for k in layers)


def is_stacked_path(path: tuple) -> bool:
  """Whether the pure-dict key path of a parameter (("layers", "mlp", "up_proj", "kernel")) is a
  stacked layer leaf, whose leading axis is the layer axis (not ("layers", 3, ...))."""
  return len(path) > 1 and path[0] == LAYERS and not isinstance(path[1], int)


def is_stacked_name(name: str) -> bool:
  """`is_stacked_path` of a `jax.tree_util.keystr` path, e.g. "['layers']['mlp']..." (params)
  or "[0].mu['layers']['mlp']..." (their copies in an optimizer state)."""
  return f"['{LAYERS}']['" in name


def stack_layers(params: dict) -> dict:
  """The pure parameter dict `{"layers": {0: tree, 1: tree, ...}, ...}` with the layers stacked:
  `{"layers": tree of (L, ...) arrays, ...}`. Leaves may be arrays or ShapeDtypeStructs."""
  if is_stacked(params):
    return params
  layers = params[LAYERS]
  order = sorted(layers)
  if order != list(range(len(order))):
    raise ValueError(f"params['{LAYERS}'] has keys {order}; expected 0..{len(order) - 1}")

  def stack(*leaves):
    if isinstance(leaves[0], jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype)
    return jnp.stack(leaves)

  out = dict(params)
  out[LAYERS] = jax.tree.map(stack, *(layers[i] for i in order))
  return out


def unstack_layers(params: dict) -> dict:
  """The inverse of `stack_layers`: `{"layers": {0: tree, ...}, ...}` from stacked layers."""
  if not is_stacked(params):
    return params
  stacked = params[LAYERS]
  n = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
  if len(n) != 1:
    raise ValueError(f"params['{LAYERS}'] leaves have different leading (layer) sizes {sorted(n)}")
  out = dict(params)
  out[LAYERS] = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n.pop())}
  return out


def stacked_paths(params: dict) -> Any:
  """A tree like `params` with True at every leaf under a stacked "layers" (layer axis leading),
  False elsewhere: the `stacked=` argument of the PROMA transforms."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: is_stacked_path(tuple(k.key for k in path)), params)


def _take_captures(module: nnx.Module) -> dict:
  """{path: captures tuple} of `module`'s submodules under `nnx.capture`, taken off them."""
  taken = {}
  for path, m in nnx.iter_modules(module):
    captures = getattr(m, _CAPTURES, None)
    if captures is not None:
      delattr(m, _CAPTURES)
      taken[tuple(path)] = captures
  return taken


def _modules(module: nnx.Module) -> dict:
  return {tuple(path): m for path, m in nnx.iter_modules(module)}


def scan(stack: nnx.Module, fn: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], carry: Any,
         xs: Any = None, *, policy: Callable | None = None,
         unroll: int | bool = 1) -> tuple[Any, Any]:
  """`lax.scan` of `fn(layer, carry, x) -> (carry, y)` over the layers of a stacked module.

  `layer` is a copy of `stack` holding layer l's slice of every Variable; `xs` and the returned
  `ys` have the layer axis leading. With a `policy` (`jax.checkpoint_policies`), the body is
  `jax.checkpoint`ed with it: what the policy does not save of a layer's forward is recomputed in
  its backward step (`nothing_saveable`: only the carry of every layer and what `fn` returns stay
  alive between the passes). Without one every residual is stored, stacked over the layers.
  Captures (`nnx.capture`) made inside `fn` are returned into the stacked module's own captures,
  stacked over the layers. `unroll`: as `jax.lax.scan`'s.
  """
  taken = _take_captures(stack)
  try:
    graphdef, state = nnx.split(stack)
    # The captures' initial values (perturbations given to nnx.capture's `init`) enter stacked.
    capture_init = {path: tuple(dict(var.get_value()) for var in captures)
                    for path, captures in taken.items()}

    def body(carry, inputs):
      layer_state, x, init = inputs
      layer = nnx.merge(graphdef, layer_state)
      modules = _modules(layer)
      for path, captures in taken.items():
        setattr(modules[path], _CAPTURES, pytreelib.data(tuple(
            type(var)(dict(values)) for var, values in zip(captures, init[path]))))
      carry, y = fn(layer, carry, x)
      captured = {path: tuple(dict(var.get_value()) for var in getattr(modules[path], _CAPTURES))
                  for path in init}
      return carry, (y, captured)

    if policy is not None:
      body = jax.checkpoint(body, policy=policy)
    carry, (ys, captured) = jax.lax.scan(body, carry, (state, xs, capture_init), unroll=unroll)
  finally:
    modules = _modules(stack)
    for path, captures in taken.items():
      setattr(modules[path], _CAPTURES, pytreelib.data(captures))
  for path, values in captured.items():
    for var, stacked_values in zip(getattr(modules[path], _CAPTURES), values):
      for name, value in stacked_values.items():
        var[name] = value
  return carry, ys


def make_stacked(make_layer: Callable[[], nnx.Module], n_layers: int) -> nnx.Module:
  """One module holding `n_layers` calls of `make_layer()` stacked: the same numbers, in the same
  order, as the list of layers built one after the other."""
  layers = [make_layer() for _ in range(n_layers)]
  graphdef = nnx.graphdef(layers[0])
  states = [nnx.state(layer) for layer in layers]
  return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


def _holds_layers(x: Any) -> bool:
  return isinstance(x, dict) and isinstance(x.get(LAYERS), dict)


def map_layer_dicts(convert: Callable[[dict], dict], tree: Any) -> Any:
  """`convert` (`stack_layers` or `unstack_layers`) applied to every dict of `tree` that holds a
  "layers" dict: the params, and their copies in an optimizer state (Adam's moments, PROMA's
  accumulator and per-leaf metrics)."""
  return jax.tree.map(lambda x: convert(x) if _holds_layers(x) else x, tree,
                      is_leaf=_holds_layers)


def restore_either_layout(checkpointer, template: Any) -> tuple[int, Any, dict] | None:
  """`checkpointer.restore(template)`, falling back to the other layer layout: a checkpoint saved
  with the layers unstacked (before `scan_layers`, or with it off) restores into a stacked
  template, and the other way round; the result has the template's layout."""
  from proma_jax.checkpoint import IncompatibleCheckpointError  # pylint: disable=import-outside-toplevel
  try:
    return checkpointer.restore(template)
  except IncompatibleCheckpointError as first:
    layouts = []
    map_layer_dicts(lambda d: layouts.append(is_stacked(d)) or d, template)
    if not layouts:
      raise
    to_stored, back = ((unstack_layers, stack_layers) if layouts[0]
                       else (stack_layers, unstack_layers))
    other = map_layer_dicts(to_stored, template)
    try:
      restored = checkpointer.restore(other)
    except IncompatibleCheckpointError:
      raise first from None
  if restored is None:
    return None
  step, state, meta = restored
  return step, map_layer_dicts(back, state), meta
