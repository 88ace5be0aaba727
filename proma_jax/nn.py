"""`Dense`: the dense layer that PROMA's statistics can see, for any Flax NNX model.

A `Dense` is an `nnx.Linear` with two hooks, both off unless PROMA's code turns them on:

  - inside `nnx.capture` it records its input (`nnx.Intermediate` INPUTS), counts its calls
    (CALLS) and adds a zero `nnx.Perturbation` (OUTPUT_PERTURBATION) to its output.
    Differentiating the loss with respect to that perturbation gives the gradient with respect to
    the layer output, so the kernel gradient is `A^T G` with A the inputs and G the output
    gradients, token by token (`capture.grads_and_dense_factors`).
  - given a slot (`proma_slot`, set by `capture.policy_gradient_and_fused_changes`) it computes
    y = x W through the slot's `dense(x, kernel)`, whose backward pass also computes PROMA's
    change of R_W (`fused.fused_dense`).

Outside both a `Dense` is exactly an `nnx.Linear`. This module knows nothing of PROMA's math, so
a model built from it (`models.decoder`) does not depend on the rest of the library.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

INPUTS = "dense_inputs"
OUTPUT_PERTURBATION = "dense_outputs"
CALLS = "dense_calls"


def _is_capturing(module: nnx.Module) -> bool:
  # `nnx.capture` installs `__captures__` on every module for the duration of the call.
  return hasattr(module, "__captures__")


class Dense(nnx.Linear):
  """`nnx.Linear` whose inputs and output gradients `capture.grads_and_dense_factors` can capture,
  and whose backward pass computes PROMA's change of R_W when
  `capture.policy_gradient_and_fused_changes` gives it a slot (`proma_slot`, a
  `fused_slots.FusedSlotVariable`)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    slot = getattr(self, "proma_slot", None)
    if slot is not None:
      return slot.dense(x.astype(self.dtype or x.dtype), self.kernel[...])
    if not _is_capturing(self):
      return super().__call__(x)
    self.sow(nnx.Intermediate, INPUTS, x, reduce_fn=lambda _, new: new, init_fn=lambda: None)
    self.sow(nnx.Intermediate, CALLS, jnp.zeros((), jnp.int8))  # a tuple, one entry per call
    return self.perturb(OUTPUT_PERTURBATION, super().__call__(x))
