"""Capture of dense-layer activations and output gradients (docs/algorithm.md#one-backward-capture).

This module only *captures*; the math that uses the captured factors lives in
`projection.py` and knows nothing of the model (the kfac-jax split).

A `Dense` layer (`proma_jax.nn`) is an `nnx.Linear` that, inside `nnx.capture`, records its input
(`nnx.Intermediate` "dense_inputs") and adds a zero `nnx.Perturbation` ("dense_outputs") to its
output. Differentiating the loss with respect to that perturbation gives the gradient with respect
to the layer output, so the kernel gradient is `A^T G` with A the inputs and G the output
gradients, token by token. Outside `nnx.capture` a `Dense` is exactly an `nnx.Linear`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from proma_jax import fused as fused_lib, fused_slots, leaf_change, seqgrads
# Importable from here too: the `Dense` layer of a fused kernel holds one.
from proma_jax.fused_slots import FusedSlotVariable  # noqa: F401  pylint: disable=unused-import
from proma_jax.nn import CALLS, INPUTS, OUTPUT_PERTURBATION, Dense
from proma_jax.seqgrads import DenseFactors
from proma_jax.transform_state import ProMAState


def _pure(tree: Any) -> Any:
  return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def _get(tree: dict, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def _flatten_tokens(x: jax.Array, kernel_shape: tuple[int, ...], axis: int) -> jax.Array:
  """(n_tok, d) of a layer's inputs (axis -2 of the kernel) or output gradients (axis -1); a
  stacked kernel (L, d_in, d_out) of scanned layers (`models.stacked`) gives (L, n_tok, d).
  In the compute dtype: the statistics cast to float32 inside their own products (seqgrads,
  projection), so no float32 copy of every layer's inputs stays live."""
  return x.reshape(*kernel_shape[:-2], -1, kernel_shape[axis])


def grads_and_dense_factors(
    loss_fn: Callable[..., Any],
    model: nnx.Module,
    *args: Any,
    token_mask: jax.Array | None = None,
    has_aux: bool = False,
) -> tuple[Any, dict, dict]:
  """One forward/backward pass giving the loss, the parameter gradients and every `Dense` layer's factors.

  Args:
    loss_fn: `loss_fn(model, *args)` returning a scalar (or `(scalar, aux)` with `has_aux`).
    model: an NNX module whose dense layers are `proma_jax.Dense`.
    token_mask: optional `(batch, time)` mask (1 = real token) of the tokens the dense layers see;
      padding rows of the activations are zeroed so they do not enter the range finder.
      Output gradients of padding tokens are whatever the loss gives them (zero for a masked loss).

  Returns:
    `(loss_or_(loss, aux), grads, factors)`: `grads` is the pure-dict gradient of all `nnx.Param`s;
    `factors` has the structure of `grads` with a `DenseFactors` (the loss's output gradients) at
    each `Dense` kernel and `None` at every other leaf. Call it under `jax.jit`.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def scalar_and_out(m, *args):
    out = loss_fn(m, *args)
    return (out[0] if has_aux else out), out

  def run(params, perturbations):
    m = nnx.merge(graphdef, params, rest)
    (value, out), inputs = nnx.capture(scalar_and_out, nnx.Intermediate, init=perturbations)(m, *args)
    return value, (out, inputs)

  def perturbation_shapes():
    m = nnx.merge(graphdef, params, rest)
    return nnx.capture(scalar_and_out, nnx.Perturbation)(m, *args)[1]

  zero_perturbations = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(perturbation_shapes))
  (param_grads, output_grads), (out, inputs) = jax.grad(run, argnums=(0, 1), has_aux=True)(
      params, zero_perturbations)

  grads = _pure(param_grads)
  inputs, output_grads = _pure(inputs), _pure(output_grads)
  factors = jax.tree.map(lambda _: None, grads)
  mask = None if token_mask is None else token_mask.reshape(-1, 1)
  for path, module in nnx.iter_modules(model):
    if not isinstance(module, Dense):
      continue
    shape = module.kernel.get_value().shape
    try:
      a = _flatten_tokens(_get(inputs, path)[INPUTS], shape, -2)
      g = _flatten_tokens(_get(output_grads, path)[OUTPUT_PERTURBATION], shape, -1)
    except KeyError:
      continue  # the layer was not called by this loss
    if mask is not None:
      a = a * mask.astype(a.dtype)
    _set(factors, tuple(path) + ("kernel",), DenseFactors(a, g))
  return out, grads, factors


# Cotangent weight of a sequence whose advantage is (relatively) zero; see `sequence_cotangents`.
ZERO_ADVANTAGE_WEIGHT = 2.0**-40


def sequence_cotangents(advantages_n: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(c_n, scale): the per-sequence cotangent weights of the one-backward capture, and their scale.

  The policy loss is -sum_i A_i f_i = scale * sum_i c_i f_i with c_i = -A_i / scale,
  scale = max_i |A_i|. A sequence with |A_i| <= ZERO_ADVANTAGE_WEIGHT * scale (zero advantage:
  a group with equal rewards) gets c_i = ZERO_ADVANTAGE_WEIGHT instead, so that its output-gradient
  rows are nonzero and can be divided by c_i: its S_i still enters PROMA's statistics. Its
  contribution to the returned gradient is then scale * 2^-40 * S_i instead of -A_i S_i, at most
  2^-39 scale ||S_i||, twelve orders below the gradient's own size (exactly 0 where all A_i are 0).
  """
  a_n = advantages_n.astype(jnp.float32)
  scale = jnp.max(jnp.abs(a_n))
  safe_scale = jnp.where(scale > 0, scale, 1.0)
  c_n = -a_n / safe_scale
  return jnp.where(jnp.abs(c_n) > ZERO_ADVANTAGE_WEIGHT, c_n, ZERO_ADVANTAGE_WEIGHT), scale


def _unpack(out: Any, has_aux: bool) -> tuple[jax.Array, Any]:
  return out if has_aux else (out, None)


def _weighted_objective(objectives_fn, c_n: jax.Array, has_aux: bool):
  """(model, batch) -> (sum_i c_i f_i, (f_n, aux)): the scalar whose one backward pass carries every
  sequence's gradient, row-scaled by c_i (`sequence_cotangents`)."""
  n_seq = c_n.shape[0]

  def weighted_objective(m, b):
    f_n, aux = _unpack(objectives_fn(m, b), has_aux)
    if f_n.shape != (n_seq,):
      raise ValueError(f"objectives_fn must return one objective per sequence, shape ({n_seq},) "
                       f"like the advantages, got {f_n.shape}")
    return jnp.sum(c_n * f_n.astype(jnp.float32)), (f_n, aux)

  return weighted_objective


def _tokens_per_sequence(path: str, n_tok: int, n_seq: int) -> int:
  if n_tok % n_seq:
    raise ValueError(f"Dense layer at {path} saw {n_tok} tokens, not a multiple of the {n_seq} "
                     f"sequences of the batch (the dense layers must see inputs laid out "
                     f"(n_seq, ..., d_in), sequence axis leading)")
  return n_tok // n_seq


def policy_gradient_and_dense_factors(
    objectives_fn: Callable[[nnx.Module, Any], Any],
    model: nnx.Module,
    batch: Any,
    advantages_n: jax.Array,
    *,
    token_mask: jax.Array | None = None,
    has_aux: bool = False,
) -> tuple[Any, dict, dict]:
  """Policy loss -sum_i A_i f_i, its gradient, and the advantage-free dense factors: ONE backward pass.

  The sequence gradients S_i and intra-PROMA's output gradients G come from the advantage-free
  objective sum_i f_i, while the optimizer needs the gradient of the loss -sum_i A_i f_i
  (docs/algorithm.md#one-backward-capture). Sequences do not interact, so the backward pass of
  sum_i c_i f_i scales every row of sequence i (at every layer) by c_i. One backward with
  c = `sequence_cotangents(A)` gives
    grads = scale * grad(sum_i c_i f_i)            (the loss gradient, see `sequence_cotangents`)
    G     = G_c / c_seq(t), row by row              (the output gradients of sum_i f_i)
  instead of one backward per scalar.

  Args:
    objectives_fn: `fn(model, batch) -> f_N` (or `(f_N, aux)` with `has_aux`): the advantage-free
      sequence objectives f_i of the microbatch, e.g. `losses.sequence_ratio` of the model's token
      log-probabilities, so that -sum_i A_i f_i is the REINFORCE loss.
    batch: a pytree of arrays whose leading axis is the sequence axis (n_seq); the dense layers must
      see inputs laid out (n_seq, ..., d_in).
    advantages_n: (n_seq,) advantages A_i.
    token_mask: optional (n_seq, T) mask of real tokens; padding rows of A are zeroed.

  Returns:
    `(loss_or_(loss, aux), grads, factors)` as `grads_and_dense_factors`, with the factors' output
    gradients those of sum_i f_i. Call it under `jax.jit`.
  """
  n_seq = advantages_n.shape[0]
  c_n, scale = sequence_cotangents(advantages_n)
  (_, (f_n, aux)), phi_grads, factors = grads_and_dense_factors(
      _weighted_objective(objectives_fn, c_n, has_aux), model, batch, token_mask=token_mask,
      has_aux=True)
  loss = -jnp.sum(advantages_n.astype(jnp.float32) * jax.lax.stop_gradient(f_n))
  grads = jax.tree.map(lambda g: (scale * g).astype(g.dtype), phi_grads)

  def advantage_free(path, f):
    if f is None:
      return None
    t = _tokens_per_sequence(jax.tree_util.keystr(path), f.output_grads.shape[-2], n_seq)
    g = f.output_grads / jnp.repeat(c_n, t)[:, None]
    return DenseFactors(f.activations, g.astype(f.output_grads.dtype))

  factors = jax.tree_util.tree_map_with_path(advantage_free, factors,
                                             is_leaf=lambda x: x is None or isinstance(x, DenseFactors))
  return ((loss, aux) if has_aux else loss), grads, factors


SEQUENCE_SCOPES = ("all", "dense")


def policy_gradient_and_sequence_statistics(
    objectives_fn: Callable[[nnx.Module, Any], Any],
    model: nnx.Module,
    batch: Any,
    advantages_n: jax.Array,
    *,
    token_mask: jax.Array | None = None,
    has_aux: bool = False,
    scope: str = "all",
    dense_path: str = "auto",
) -> tuple[Any, dict, dict, dict]:
  """Policy loss, its gradient, the `seq_grads` and the `factors` of the PROMA transforms, in one pass.

  One forward and one backward pass (`policy_gradient_and_dense_factors`) give the loss gradient of
  every leaf and each `Dense` layer's inputs A and advantage-free output gradients G; the rows of
  G for sequence i are those of grad f_i, so S_i = A_i^T G_i. Per dense kernel,
  `seqgrads.choose_dense_path(n_seq, T, d_in, d_out, dense_path)` picks:
    "matrix_free":  a `DenseSequenceFactors(A, G, segment_ids, n_seq)`; no S_i is ever formed.
    "materialise":  the stacked S_i = A_i^T G_i, (n_seq, d_in, d_out), by one batched matmul, and
                    the kernel gradient -sum_i A_i S_i from them (exact; the backward pass's own
                    A^T G_c matmul is then unused and dropped by XLA, so S_i cost no extra flops).
  Every other leaf (embeddings, norms, biases, kernels of layers the objective does not reach) gets
  its stacked per-sequence gradients by `jax.vmap(jax.grad(f_i))` over the sequences with scope
  "all" (a second forward/backward, differentiating those leaves only), or None with scope "dense".

  Args: as `policy_gradient_and_dense_factors`, plus `scope` and `dense_path`.

  Returns:
    `(loss_or_(loss, aux), grads, seq_grads, factors)`: pure dicts like the model's params;
    `factors` (a `DenseFactors` per dense kernel, None elsewhere) is what `proma_intra` and
    `proma_both` take as `factors`.
  """
  if scope not in SEQUENCE_SCOPES:
    raise ValueError(f"unknown scope {scope!r}; expected one of {SEQUENCE_SCOPES}")
  out, grads, factors = policy_gradient_and_dense_factors(
      objectives_fn, model, batch, advantages_n, token_mask=token_mask, has_aux=has_aux)

  paths_grads, grads_def = jax.tree_util.tree_flatten_with_path(grads)
  factor_leaves = grads_def.flatten_up_to(factors)
  grad_leaves = [g for _, g in paths_grads]
  seq_leaves = [None] * len(grad_leaves)
  for idx, ((path, g), f) in enumerate(zip(paths_grads, factor_leaves)):
    if f is not None:
      seq_leaves[idx], grad_leaves[idx] = _dense_sequence_statistics(path, g, f, advantages_n,
                                                                     dense_path)
  other = [idx for idx, f in enumerate(factor_leaves) if f is None]
  if scope == "all":
    seq_leaves = _vmap_sequence_gradients(objectives_fn, has_aux, model, batch, other, seq_leaves)
  return (out, grads_def.unflatten(grad_leaves), grads_def.unflatten(seq_leaves), factors)


def _dense_sequence_statistics(path, g: jax.Array, f: DenseFactors, advantages_n: jax.Array,
                               dense_path: str) -> tuple[Any, jax.Array]:
  """(seq_grads leaf, grads leaf) of one dense kernel from its factors, by the route
  `seqgrads.choose_dense_path` picks: a `DenseSequenceFactors` and the gradient `g` unchanged, or
  the stacked S_i and the kernel gradient -sum_i A_i S_i made from them."""
  n_seq = advantages_n.shape[0]
  t = _tokens_per_sequence(jax.tree_util.keystr(path), f.activations.shape[-2], n_seq)
  lead, (d_in, d_out) = g.shape[:-2], g.shape[-2:]  # lead: (L,) for scanned layers
  if seqgrads.choose_dense_path(n_seq, t, d_in, d_out, dense_path) == "matrix_free":
    segment_ids = jnp.repeat(jnp.arange(n_seq, dtype=jnp.int32), t)
    return seqgrads.DenseSequenceFactors(f.activations, f.output_grads, segment_ids, n_seq), g
  # (n_seq, d_in, d_out), or (n_seq, L, d_in, d_out) for scanned layers
  s_nxixo = jnp.einsum("...bti,...bto->b...io", f.activations.reshape(*lead, n_seq, t, d_in),
                       f.output_grads.reshape(*lead, n_seq, t, d_out),
                       preferred_element_type=jnp.float32)
  return s_nxixo, (-jnp.tensordot(advantages_n.astype(jnp.float32), s_nxixo, axes=1)
                   ).astype(g.dtype)


def _vmap_sequence_gradients(objectives_fn, has_aux: bool, model: nnx.Module, batch: Any,
                             indices: list[int], seq_leaves: list) -> list:
  """`seq_leaves` with the stacked per-sequence gradients of f_i (`objectives_fn` without its aux)
  at the param leaves at `indices` (flattened order), by `jax.vmap(jax.grad(f_i))`; unchanged
  when `indices` is empty."""
  if not indices:
    return seq_leaves
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  leaves, params_def = jax.tree.flatten(nnx.to_pure_dict(params))

  def objective(chosen, sequence):
    full = list(leaves)
    for idx, value in zip(indices, chosen):
      full[idx] = value
    state = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(state, params_def.unflatten(full))
    one = jax.tree.map(lambda x: x[None], sequence)
    return _unpack(objectives_fn(nnx.merge(graphdef, state, rest), one), has_aux)[0][0]

  chosen = [leaves[idx] for idx in indices]
  seq_leaves = list(seq_leaves)
  for idx, s in zip(indices, jax.vmap(jax.grad(objective), in_axes=(None, 0))(chosen, batch)):
    seq_leaves[idx] = s
  return seq_leaves


def dense_calls(fn: Callable[[nnx.Module], Any], model: nnx.Module) -> dict[tuple, int]:
  """How often `fn(model)` calls each `Dense` layer, by module path (traced abstractly: no FLOPs)."""
  graphdef, state = nnx.split(model)

  def calls():
    return nnx.capture(fn, nnx.Intermediate)(nnx.merge(graphdef, state))[1]

  sown = _pure(jax.eval_shape(calls))
  counts = {}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, Dense):
      try:
        counts[tuple(path)] = len(_get(sown, path)[CALLS])
      except KeyError:
        counts[tuple(path)] = 0
  return counts


def policy_gradient_and_fused_changes(
    objectives_fn: Callable[[nnx.Module, Any], Any], model: nnx.Module, batch: Any,
    advantages_n: jax.Array, proma_state: ProMAState, *, num_microbatches: int,
    accumulation: leaf_change.AccumulationOptions | None = None,
    intra: leaf_change.IntraOptions | None = None, token_mask: jax.Array | None = None,
    has_aux: bool = False, scope: str = "all", dense_path: str = "auto",
    sequence_model: nnx.Module | None = None, param_shardings: Any = None,
) -> tuple[Any, dict, dict, dict]:
  """The fused path: one forward and backward pass in which every `Dense` kernel computes its
  change of PROMA's accumulator inside its own backward step (`proma_jax.fused`).

  For the transform built with the same options (`proma_accumulation`, `proma_intra` or
  `proma_both` with `num_microbatches`, `accumulation`'s and `intra`'s knobs), whose state is
  `proma_state`:

    out, grads, seq_grads, fused = policy_gradient_and_fused_changes(...)
    updates, state = tx.update(grads, state, params, fused=fused, seq_grads=seq_grads)

  gives what `tx.update` gives from the unfused statistics, to float rounding; no two layers'
  per-sequence gradients are ever alive together. The backward pass carries sum_i c_i f_i
  (`sequence_cotangents`), as in `policy_gradient_and_dense_factors`.

  Args:
    objectives_fn, model, batch, advantages_n, token_mask, has_aux: as
      `policy_gradient_and_dense_factors`. Every `Dense` layer the objective reaches must be called
      exactly once (a second call would add a second change); a layer it does not reach is not
      fused.
    proma_state: the transform's current `ProMAState` (R, the microbatch index, the count).
    scope: "all": every leaf that is not a fused kernel (norm scales, embeddings, a head read as
      a plain array) gets its stacked S_i by `jax.vmap(jax.grad(f_i))` over the sequences when
      `accumulation` projects (on `sequence_model`, default `model`; the same parameters with a
      graph that can be vmapped); "dense": those leaves are accumulated unprojected.
    dense_path: `FusedRule.dense_path`.
    param_shardings: on an FSDP mesh, NamedShardings like the params: each fused kernel's stacked
      S_i are constrained to its sharding, sequence axis replicated (`FusedRule.stack_sharding`).

  Returns:
    `(loss_or_(loss, aux), grads, seq_grads, fused)`, pure dicts like the params: `grads` is the
    loss gradient at every leaf except the fused kernels, where it is the change of R;
    `fused` has a `transforms.FusedLeaf` (the metrics) at those kernels and None elsewhere;
    `seq_grads` the vmap path's S_i (None at fused kernels). Call it under `jax.jit`.
  """
  _check_fused_options(scope, accumulation, intra)
  c_n, scale = sequence_cotangents(advantages_n)
  weighted = _weighted_objective(objectives_fn, c_n, has_aux)
  layout = fused_slots.fused_layout(model, dense_calls(lambda m: weighted(m, batch), model))
  slot_and_rule = fused_slots.slot_maker(
      layout, fused_lib.FusedRule(accumulation, intra, dense_path), proma_state, num_microbatches,
      (c_n, advantages_n, scale, token_mask), param_shardings)
  grad_leaves, fused_leaves, (f_n, aux) = fused_slots.fused_gradients(
      weighted, batch, layout, slot_and_rule, proma_state, scale)
  vmapped = layout.other_idx if (scope == "all" and accumulation is not None
                                 and accumulation.projects) else []
  seq_leaves = _vmap_sequence_gradients(
      objectives_fn, has_aux, model if sequence_model is None else sequence_model, batch, vmapped,
      [None] * len(layout.leaves))
  loss = -jnp.sum(advantages_n.astype(jnp.float32) * jax.lax.stop_gradient(f_n))
  unflatten = layout.params_def.unflatten
  return (((loss, aux) if has_aux else loss), unflatten(grad_leaves), unflatten(seq_leaves),
          unflatten(fused_leaves))


def _check_fused_options(scope: str, accumulation, intra) -> None:
  """A known scope, and a PROMA variant to fuse (accumulation or intra options)."""
  if scope not in SEQUENCE_SCOPES:
    raise ValueError(f"unknown scope {scope!r}; expected one of {SEQUENCE_SCOPES}")
  if accumulation is None and intra is None:
    raise ValueError("the fused path needs accumulation or intra options (a PROMA variant); "
                     "plain accumulation has nothing to fuse")
