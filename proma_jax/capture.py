"""Capture of dense-layer activations and output gradients (DESIGN section 6).

This module only *captures*; the math that uses the captured factors lives in
`projection.py` and knows nothing of the model (the kfac-jax split).

A `Dense` layer is an `nnx.Linear` that, inside `nnx.capture`, records its input (`nnx.Intermediate`
"dense_inputs") and adds a zero `nnx.Perturbation` ("dense_outputs") to its output. Differentiating
the loss with respect to that perturbation gives the gradient with respect to the layer output, so
the kernel gradient is `A^T G` with A the inputs and G the output gradients, token by token.
Outside `nnx.capture` a `Dense` is exactly an `nnx.Linear`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from proma_jax import seqgrads

INPUTS = "dense_inputs"
OUTPUT_PERTURBATION = "dense_outputs"


class DenseFactors(NamedTuple):
  """Per-token factors of one dense kernel's gradient: grad W = activations^T @ output_grads.

  activations:  (n_tokens, d_in)   layer inputs, zero rows for padding tokens.
  output_grads: (n_tokens, d_out)  gradient of the objective w.r.t. the layer outputs.
  """

  activations: jax.Array
  output_grads: jax.Array


def _is_capturing(module: nnx.Module) -> bool:
  # `nnx.capture` installs `__captures__` on every module for the duration of the call.
  return hasattr(module, "__captures__")


class Dense(nnx.Linear):
  """`nnx.Linear` whose inputs and output gradients `grads_and_dense_factors` can capture."""

  def __call__(self, x: jax.Array) -> jax.Array:
    if not _is_capturing(self):
      return super().__call__(x)
    self.sow(nnx.Intermediate, INPUTS, x, reduce_fn=lambda _, new: new, init_fn=lambda: None)
    return self.perturb(OUTPUT_PERTURBATION, super().__call__(x))


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


def _flatten_tokens(x: jax.Array, width: int) -> jax.Array:
  return x.reshape(-1, width).astype(jnp.float32)


def grads_and_dense_factors(
    loss_fn: Callable[..., Any],
    model: nnx.Module,
    *args: Any,
    token_mask: jax.Array | None = None,
    has_aux: bool = False,
    factor_objective: bool = False,
) -> tuple[Any, dict, dict]:
  """One forward/backward pass giving the loss, the parameter gradients and every `Dense` layer's factors.

  Args:
    loss_fn: `loss_fn(model, *args)` returning a scalar (or `(scalar, aux)` with `has_aux`); with
      `factor_objective`, a pair of scalars `(loss, objective)` (or `((loss, objective), aux)`).
    model: an NNX module whose dense layers are `proma_jax.Dense`.
    token_mask: optional `(batch, time)` mask (1 = real token) of the tokens the dense layers see;
      padding rows of the activations are zeroed so they do not enter the range finder.
      Output gradients of padding tokens are whatever the loss gives them (zero for a masked loss).
    factor_objective: the factors hold the output gradients of `objective` instead of the loss's,
      e.g. the advantage-free log-prob objective whose K-FAC Fisher intra-PROMA approximates
      (DESIGN section 4). Both scalars come from ONE forward pass; the backward pass runs once per
      scalar (`jax.vjp`), each keeping only what it is used for (parameter gradients of the loss,
      output gradients of the objective).

  Returns:
    `(loss_or_(loss, aux), grads, factors)`: `grads` is the pure-dict gradient of all `nnx.Param`s;
    `factors` has the structure of `grads` with a `DenseFactors` at each `Dense` kernel and `None`
    at every other leaf. Call it under `jax.jit`.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def both_losses(m, *args):
    out = loss_fn(m, *args)
    value = out[0] if has_aux else out
    return (jnp.stack(value) if factor_objective else value), out

  def run(params, perturbations):
    m = nnx.merge(graphdef, params, rest)
    (scalars, out), inputs = nnx.capture(both_losses, nnx.Intermediate, init=perturbations)(m, *args)
    return scalars, (out, inputs)

  def perturbation_shapes():
    m = nnx.merge(graphdef, params, rest)
    return nnx.capture(both_losses, nnx.Perturbation)(m, *args)[1]

  zero_perturbations = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(perturbation_shapes))
  if not factor_objective:
    (param_grads, output_grads), (out, inputs) = jax.grad(run, argnums=(0, 1), has_aux=True)(
        params, zero_perturbations)
  else:
    _, vjp_fn, (out, inputs) = jax.vjp(run, params, zero_perturbations, has_aux=True)
    # Two plain backward calls, not one vmapped over both cotangents: XLA drops the unused halves
    # (output grads of the first, parameter grads of the second), and on CPU the batched backward
    # was measured 5x slower than a single one (experiments/README.md, "Step-time benchmark").
    param_grads, _ = vjp_fn(jnp.array([1.0, 0.0], jnp.float32))
    _, output_grads = vjp_fn(jnp.array([0.0, 1.0], jnp.float32))

  grads = _pure(param_grads)
  inputs, output_grads = _pure(inputs), _pure(output_grads)
  factors = jax.tree.map(lambda _: None, grads)
  mask = None if token_mask is None else token_mask.reshape(-1, 1).astype(jnp.float32)
  for path, module in nnx.iter_modules(model):
    if not isinstance(module, Dense):
      continue
    kernel = module.kernel.get_value()
    d_in, d_out = kernel.shape
    try:
      a = _flatten_tokens(_get(inputs, path)[INPUTS], d_in)
      g = _flatten_tokens(_get(output_grads, path)[OUTPUT_PERTURBATION], d_out)
    except KeyError:
      continue  # the layer was not called by this loss
    if mask is not None:
      a = a * mask
    _set(factors, tuple(path) + ("kernel",), DenseFactors(a, g))
  return out, grads, factors


SEQUENCE_SCOPES = ("all", "dense")


def grads_and_sequence_statistics(
    loss_and_objectives_fn: Callable[[nnx.Module, Any], Any],
    model: nnx.Module,
    batch: Any,
    *,
    token_mask: jax.Array | None = None,
    has_aux: bool = False,
    scope: str = "all",
    dense_path: str = "auto",
) -> tuple[Any, dict, dict]:
  """Loss, policy gradient and the `seq_grads` of the PROMA transforms, in one pass (call under jit).

  One forward pass serves the loss and the advantage-free objective sum_i f_i; one backward pass
  (two cotangents, `grads_and_dense_factors`) gives the true gradient of the loss for EVERY leaf
  and each `Dense` layer's inputs A and output gradients G of sum_i f_i. Sequences do not interact,
  so the rows of G for sequence i are those of grad f_i and S_i = A_i^T G_i. Per dense kernel,
  `seqgrads.choose_dense_path(T, d_in, d_out, dense_path)` picks:
    "matrix_free":  a `DenseSequenceFactors(A, G, segment_ids, n_seq)`; no S_i is ever formed.
    "materialise":  the stacked S_i = A_i^T G_i, (n_seq, d_in, d_out), by one batched matmul.
  Every other leaf (embeddings, norms, biases, kernels of layers the objective does not reach) gets
  its stacked per-sequence gradients by `jax.vmap(jax.grad(f_i))` over the sequences with scope
  "all" (a second forward/backward, differentiating those leaves only), or None with scope "dense".

  Args:
    loss_and_objectives_fn: `fn(model, batch) -> (loss, f_N)` (or `((loss, f_N), aux)` with
      `has_aux`): the microbatch policy loss and the advantage-free sequence objectives f_i (e.g.
      `losses.sequence_logprob` of the model's token log-probabilities), from one forward pass.
    batch: a pytree of arrays whose leading axis is the sequence axis (n_seq).
    token_mask: optional (n_seq, T) mask of real tokens; padding rows of A are zeroed.
    The dense layers must see inputs laid out (n_seq, ..., d_in), sequence axis leading.

  Returns:
    `(loss_or_(loss, aux), grads, seq_grads)`, grads and seq_grads pure dicts like the model's params.
  """
  if scope not in SEQUENCE_SCOPES:
    raise ValueError(f"unknown scope {scope!r}; expected one of {SEQUENCE_SCOPES}")
  n_seq = jax.tree.leaves(batch)[0].shape[0]
  def loss_and_objective(m, b):
    out = loss_and_objectives_fn(m, b)
    (loss, f_n), aux = out if has_aux else (out, None)
    summed = (loss, jnp.sum(f_n))
    return (summed, aux) if has_aux else summed

  out, grads, factors = grads_and_dense_factors(
      loss_and_objective, model, batch, token_mask=token_mask, has_aux=has_aux,
      factor_objective=True)
  out = ((out[0][0], out[1]) if has_aux else out[0])

  paths_grads, grads_def = jax.tree_util.tree_flatten_with_path(grads)
  factor_leaves = grads_def.flatten_up_to(factors)
  seq_leaves = []
  for (path, g), f in zip(paths_grads, factor_leaves):
    if f is None:
      seq_leaves.append(None)
      continue
    n_tok = f.activations.shape[0]
    if n_tok % n_seq:
      raise ValueError(f"Dense layer at {jax.tree_util.keystr(path)} saw {n_tok} tokens, not a "
                       f"multiple of the {n_seq} sequences of the batch")
    t, (d_in, d_out) = n_tok // n_seq, g.shape
    if seqgrads.choose_dense_path(t, d_in, d_out, dense_path) == "matrix_free":
      segment_ids = jnp.repeat(jnp.arange(n_seq, dtype=jnp.int32), t)
      seq_leaves.append(seqgrads.DenseSequenceFactors(f.activations, f.output_grads, segment_ids,
                                                      n_seq))
    else:
      seq_leaves.append(jnp.einsum("bti,bto->bio", f.activations.reshape(n_seq, t, d_in),
                                   f.output_grads.reshape(n_seq, t, d_out)))

  other = [idx for idx, f in enumerate(factor_leaves) if f is None]
  if scope == "all" and other:
    def seq_objective_fn(m, b):
      out = loss_and_objectives_fn(m, b)
      return (out[0] if has_aux else out)[1]

    for idx, s in zip(other, _vmap_sequence_gradients(seq_objective_fn, model, batch, other)):
      seq_leaves[idx] = s
  return out, grads, grads_def.unflatten(seq_leaves)


def _vmap_sequence_gradients(seq_objective_fn, model: nnx.Module, batch: Any,
                             indices: list[int]) -> list[jax.Array]:
  """Stacked per-sequence gradients of f_i w.r.t. the param leaves at `indices` (flattened order)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  leaves, params_def = jax.tree.flatten(nnx.to_pure_dict(params))

  def objective(chosen, sequence):
    full = list(leaves)
    for idx, value in zip(indices, chosen):
      full[idx] = value
    state = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(state, params_def.unflatten(full))
    one = jax.tree.map(lambda x: x[None], sequence)
    return seq_objective_fn(nnx.merge(graphdef, state, rest), one)[0]

  chosen = [leaves[idx] for idx in indices]
  return jax.vmap(jax.grad(objective), in_axes=(None, 0))(chosen, batch)
