"""The RL algorithms, one row each in `TABLE`: what differs between them on the shared step.

Every algorithm runs on one code path (docs/algorithm.md#the-problem): the same rollouts,
advantages, data order, token-mean normalisation (exact across microbatches), AdamW with
global-norm clipping and the same microbatch accumulator (`proma_jax.transforms`; the baselines
accumulate with projection off). A row names what differs:

  algorithm    loss       statistics                transform                 unfused gradients
  reinforce    reinforce  -                         microbatch_accumulation   loss_gradient
  grpo         grpo       -                         microbatch_accumulation   loss_gradient
  proma        reinforce  sequence gradients S_i    proma_accumulation        sequence_gradients
  proma_intra  reinforce  dense factors             proma_intra               dense_factor_gradients
  proma_both   reinforce  S_i and dense factors     proma_both                sequence_statistics

reinforce is the unclipped ratio objective -sum A_i r_it / N, grpo adds PPO ratio clipping (eps
0.2/0.2) with dual clip 3. With proma.fused every projecting row takes its statistics from inside
each dense layer's backward pass instead (`fused_gradients`). The baselines report grad/norm, the
projecting rows also the scalar proma/* metrics (`gradient_norm`, `projection_metrics`).

A gradient function maps (objective, params, opt_state, microbatch, num_tokens) to (loss, the
loss's metrics, grads, extra), where extra holds the keyword inputs of the transform's update
(seq_grads, factors, fused). The microbatch is the dict {"tokens", "valid", "mask", "old_logp",
"advantages"} of `trainer.Batch`'s arrays; its response length L is the mask's (static) width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
import optax

import proma_jax
from proma_jax import losses
from proma_jax import policy as policy_lib


class Objective(NamedTuple):
  """What a gradient function needs besides params, opt_state and the microbatch.

  Attributes:
    policy: the policy whose log-probs the loss differentiates.
    sequence_policy: the policy bound for per-sequence gradients: `policy_lib.vmappable(policy)`
      where they vmap the model (no cuDNN attention there), else `policy`.
    policy_loss: the row's `losses.get_policy_loss`, called as (logp, old_logp, advantages, mask,
      num_tokens) -> (loss, metrics).
    scope: proma.scope: "all" leaves' sequence gradients, or the "dense" kernels' only.
    num_microbatches: M, the microbatches accumulated per optimizer step.
    accumulation: the accumulation projection's options, None where the row makes none.
    intra: the intra projection's options, None where the row makes none.
    param_shardings: on an FSDP mesh the params' shardings (S_i are resharded like them), else None.
  """
  policy: policy_lib.Policy
  sequence_policy: policy_lib.Policy
  policy_loss: losses.PolicyLossFn
  scope: str
  num_microbatches: int
  accumulation: proma_jax.AccumulationOptions | None
  intra: proma_jax.IntraOptions | None
  param_shardings: Any = None


GradientFn = Callable[[Objective, Any, Any, dict, jax.Array], tuple[jax.Array, dict, Any, dict]]


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One algorithm's row of `TABLE`.

  Attributes:
    loss: the name of its policy loss (`losses.get_policy_loss`).
    loss_options: config -> the keyword options of that loss.
    accumulation: projects each microbatch out of the span of the earlier ones (needs S_i).
    intra: projects within each microbatch (needs the dense layers' captured factors).
    transform: (inner, num_microbatches, accumulation options, intra options, **shared) -> its
      microbatch accumulator.
    gradients: its unfused gradient function (see the module docstring).
    metrics: opt_state -> the transform metrics it reports.
  """
  loss: str
  loss_options: Callable[[ml_collections.ConfigDict], dict]
  accumulation: bool
  intra: bool
  transform: Callable[..., optax.GradientTransformationExtraArgs]
  gradients: GradientFn
  metrics: Callable[[Any], dict[str, jax.Array]]

  @property
  def projects(self) -> bool:
    """A PROMA variant: it projects, and proma.fused may take its statistics in the backward pass."""
    return self.accumulation or self.intra


# ---------------------------------------------------------------------------------------------
# Policy losses and objectives of a microbatch.


def no_loss_options(c: ml_collections.ConfigDict) -> dict:
  """The REINFORCE loss: no options."""
  del c
  return {}


def grpo_loss_options(c: ml_collections.ConfigDict) -> dict:
  """GRPO's ratio clipping: eps_low, eps_high and dual_clip of `c.grpo`."""
  return dict(eps_low=c.grpo.eps_low, eps_high=c.grpo.eps_high, dual_clip=c.grpo.dual_clip)


def _response_logp(model, mb: dict) -> jax.Array:
  """logp_BxL of the microbatch's responses under `model` (L static: the mask's width)."""
  return policy_lib.response_logprobs(model, mb["tokens"], mb["valid"], mb["mask"].shape[1])[0]


def _loss_of_logp(objective: Objective, logp_BxL, mb: dict, num_tokens):
  return objective.policy_loss(logp_BxL, mb["old_logp"], mb["advantages"], mb["mask"], num_tokens)


def _sequence_objectives(logp_BxL, mb: dict, num_tokens):
  """f_i, advantage-free (docs/algorithm.md#the-problem): the ratio sum of sequence i / N."""
  return losses.sequence_ratio(logp_BxL, mb["old_logp"], mb["mask"], num_tokens)


def _objectives_and_metrics(objective: Objective, model, mb: dict, num_tokens):
  """(f_B, the loss's metrics) from one forward pass."""
  logp = _response_logp(model, mb)
  return (_sequence_objectives(logp, mb, num_tokens),
          _loss_of_logp(objective, logp, mb, num_tokens)[1])


def _is_dense_kernel(path) -> bool:
  return jax.tree_util.keystr(path).endswith("['kernel']")


# ---------------------------------------------------------------------------------------------
# Gradient functions: (objective, params, opt_state, mb, num_tokens) -> (loss, metrics, grads, extra).


def loss_gradient(objective: Objective, params, opt_state, mb: dict, num_tokens):
  """reinforce, grpo: the policy loss, its metrics and its gradient; no statistics."""
  del opt_state
  (loss, metrics), grads = jax.value_and_grad(
      lambda p: _loss_of_logp(objective, _response_logp(policy_lib.bind(objective.policy, p), mb),
                              mb, num_tokens), has_aux=True)(params)
  return loss, metrics, grads, {}


def sequence_gradients(objective: Objective, params, opt_state, mb: dict, num_tokens):
  """proma: the loss -sum_i A_i f_i, its gradient -sum_i A_i S_i and every S_i = grad f_i, by vmap
  over the sequences (scope "dense": the dense kernels' S_i only). No loss metrics."""
  del opt_state

  def f_i(params, seq):
    one = jax.tree.map(lambda x: x[None], seq)
    model = policy_lib.bind(objective.sequence_policy, params)
    return _sequence_objectives(_response_logp(model, one), one, num_tokens)[0]

  seqs = {k: mb[k] for k in ("tokens", "valid", "mask", "old_logp")}
  loss, grads, seq_grads = proma_jax.policy_gradient_and_sequence_gradients(
      f_i, params, seqs, mb["advantages"])
  if objective.scope == "dense":
    seq_grads = jax.tree_util.tree_map_with_path(
        lambda path, s: s if _is_dense_kernel(path) else None, seq_grads)
  return loss, {}, grads, {"seq_grads": seq_grads}


def dense_factor_gradients(objective: Objective, params, opt_state, mb: dict, num_tokens):
  """proma_intra: the REINFORCE loss is -sum_i A_i f_i, so one backward pass gives its gradient
  and the dense layers' advantage-free factors (`capture.policy_gradient_and_dense_factors`)."""
  del opt_state
  (loss, metrics), grads, factors = proma_jax.policy_gradient_and_dense_factors(
      lambda m, b: _objectives_and_metrics(objective, m, b, num_tokens),
      policy_lib.bind(objective.policy, params), mb, mb["advantages"], token_mask=mb["valid"],
      has_aux=True)
  return loss, metrics, grads, {"factors": factors}


def sequence_statistics(objective: Objective, params, opt_state, mb: dict, num_tokens):
  """proma_both: the gradient, the dense factors and the dense kernels' S_i from one pass, the
  other leaves' S_i (scope "all") by vmap (`capture.policy_gradient_and_sequence_statistics`)."""
  del opt_state
  (loss, metrics), grads, seq_grads, factors = proma_jax.policy_gradient_and_sequence_statistics(
      lambda m, b: _objectives_and_metrics(objective, m, b, num_tokens),
      policy_lib.bind(objective.sequence_policy, params), mb, mb["advantages"],
      token_mask=mb["valid"], has_aux=True, scope=objective.scope)
  return loss, metrics, grads, {"seq_grads": seq_grads, "factors": factors}


def fused_gradients(objective: Objective, params, opt_state, mb: dict, num_tokens):
  """Every PROMA variant with proma.fused: each dense kernel's change of R from inside its
  backward pass (docs/algorithm.md#fused-statistics), against the accumulator in `opt_state`;
  the other leaves' S_i (scope "all") by vmap."""
  (loss, metrics), grads, seq_grads, fused = proma_jax.policy_gradient_and_fused_changes(
      lambda m, b: _objectives_and_metrics(objective, m, b, num_tokens),
      policy_lib.bind(objective.policy, params), mb, mb["advantages"],
      proma_jax.find_proma_state(opt_state), num_microbatches=objective.num_microbatches,
      accumulation=objective.accumulation, intra=objective.intra, token_mask=mb["valid"],
      has_aux=True, scope=objective.scope,
      sequence_model=policy_lib.bind(objective.sequence_policy, params),
      param_shardings=objective.param_shardings)
  extra = dict(fused=fused)
  if objective.accumulation is not None:
    extra["seq_grads"] = seq_grads
  return loss, metrics, grads, extra


# ---------------------------------------------------------------------------------------------
# Transforms: (inner, num_microbatches, accumulation, intra, **shared) -> the accumulator.


def plain_accumulation(inner, num_microbatches: int, accumulation, intra, **shared):
  """The baselines: the same accumulator, state and metrics with projection off."""
  del accumulation, intra
  return proma_jax.microbatch_accumulation(inner, num_microbatches, **shared)


def accumulation_projection(inner, num_microbatches: int, accumulation, intra, **shared):
  del intra
  return proma_jax.proma_accumulation(inner, num_microbatches, **dataclasses.asdict(accumulation),
                                      **shared)


def intra_projection(inner, num_microbatches: int, accumulation, intra, **shared):
  del accumulation
  return proma_jax.proma_intra(inner, num_microbatches, **dataclasses.asdict(intra), **shared)


def both_projections(inner, num_microbatches: int, accumulation, intra, **shared):
  i = dataclasses.asdict(intra)
  return proma_jax.proma_both(inner, num_microbatches, intra_shrinkage=i.pop("shrinkage"), **i,
                              **dataclasses.asdict(accumulation), **shared)


# ---------------------------------------------------------------------------------------------
# Metrics read back from the transform's state.


def gradient_norm(opt_state) -> dict[str, jax.Array]:
  """grad/norm: the global norm of the accumulated direction R handed to the inner optimizer."""
  return {"grad/norm": proma_jax.proma_metrics(opt_state)["grad/norm"]}


def _is_scalar_proma_metric(name: str) -> bool:
  """proma/<metric>, not a per-leaf proma/intra_reduction/<leaf path>."""
  return name.startswith("proma/") and name.count("/") == 1


def projection_metrics(opt_state) -> dict[str, jax.Array]:
  """grad/norm and the scalar proma/* metrics (reduction, dropped, intra_reduction)."""
  metrics = proma_jax.proma_metrics(opt_state)
  return {"grad/norm": metrics["grad/norm"],
          **{k: v for k, v in metrics.items() if _is_scalar_proma_metric(k)}}


TABLE: dict[str, Algorithm] = {
    "reinforce": Algorithm(
        loss="reinforce", loss_options=no_loss_options, accumulation=False, intra=False,
        transform=plain_accumulation, gradients=loss_gradient, metrics=gradient_norm),
    "grpo": Algorithm(
        loss="grpo", loss_options=grpo_loss_options, accumulation=False, intra=False,
        transform=plain_accumulation, gradients=loss_gradient, metrics=gradient_norm),
    "proma": Algorithm(
        loss="reinforce", loss_options=no_loss_options, accumulation=True, intra=False,
        transform=accumulation_projection, gradients=sequence_gradients,
        metrics=projection_metrics),
    "proma_intra": Algorithm(
        loss="reinforce", loss_options=no_loss_options, accumulation=False, intra=True,
        transform=intra_projection, gradients=dense_factor_gradients, metrics=projection_metrics),
    "proma_both": Algorithm(
        loss="reinforce", loss_options=no_loss_options, accumulation=True, intra=True,
        transform=both_projections, gradients=sequence_statistics, metrics=projection_metrics),
}
