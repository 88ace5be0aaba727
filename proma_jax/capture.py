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
    factor_loss_fn: Callable[..., jax.Array] | None = None,
) -> tuple[Any, dict, dict]:
  """One forward/backward pass giving the loss, the parameter gradients and every `Dense` layer's factors.

  Args:
    loss_fn: `loss_fn(model, *args)` returning a scalar (or `(scalar, aux)` with `has_aux`).
    model: an NNX module whose dense layers are `proma_jax.Dense`.
    token_mask: optional `(batch, time)` mask (1 = real token) of the tokens the dense layers see;
      padding rows of the activations are zeroed so they do not enter the range finder.
      Output gradients of padding tokens are whatever the loss gives them (zero for a masked loss).
    factor_loss_fn: optional `factor_loss_fn(model, *args) -> scalar` whose output gradients the
      factors hold instead of the loss's, e.g. the advantage-free log-prob objective whose K-FAC
      Fisher intra-PROMA approximates (DESIGN section 4). Both share one forward pass: the
      backward pass is run for the two scalars at once (`jax.vjp` vmapped over two cotangents).

  Returns:
    `(loss_or_(loss, aux), grads, factors)`: `grads` is the pure-dict gradient of all `nnx.Param`s;
    `factors` has the structure of `grads` with a `DenseFactors` at each `Dense` kernel and `None`
    at every other leaf. Call it under `jax.jit`.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def both_losses(m, *args):
    out = loss_fn(m, *args)
    loss = out[0] if has_aux else out
    scalars = loss if factor_loss_fn is None else jnp.stack([loss, factor_loss_fn(m, *args)])
    return scalars, out

  def run(params, perturbations):
    m = nnx.merge(graphdef, params, rest)
    (scalars, out), inputs = nnx.capture(both_losses, nnx.Intermediate, init=perturbations)(m, *args)
    return scalars, (out, inputs)

  def perturbation_shapes():
    m = nnx.merge(graphdef, params, rest)
    return nnx.capture(both_losses, nnx.Perturbation)(m, *args)[1]

  zero_perturbations = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(perturbation_shapes))
  if factor_loss_fn is None:
    (param_grads, output_grads), (out, inputs) = jax.grad(run, argnums=(0, 1), has_aux=True)(
        params, zero_perturbations)
  else:
    _, vjp_fn, (out, inputs) = jax.vjp(run, params, zero_perturbations, has_aux=True)
    (param_grads2, output_grads2) = jax.vmap(vjp_fn)(jnp.eye(2, dtype=jnp.float32))
    param_grads = jax.tree.map(lambda x: x[0], param_grads2)
    output_grads = jax.tree.map(lambda x: x[1], output_grads2)

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
