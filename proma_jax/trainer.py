"""The compiled RL step of a config: the optimizer, the microbatch and minibatch updates, and
`Trainer`, which runs one RL step (rollout, log-prob passes, optimizer steps, metrics).

Every algorithm runs on one code path (docs/algorithm.md#the-problem): the same rollouts, advantages,
data order, token-mean normalisation (exact across microbatches), AdamW with global-norm clipping,
and the same microbatch accumulator (`proma_jax.transforms`; the baselines accumulate with
projection off). They differ only in the microbatch gradient function and the extra inputs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import proma_jax
from proma_jax import losses
from proma_jax import mesh as mesh_lib
from proma_jax import policy as policy_lib
from proma_jax import sft
from proma_jax.config import to_json, validate_config
from proma_jax.models import stacked as stacked_lib

# ---------------------------------------------------------------------------------------------
# Optimizer and microbatch gradients.


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """AdamW with global-norm clipping behind the microbatch accumulator of `c.algorithm`."""
  # The learning rate lives in the optimizer state (inject_hyperparams), not in the compiled
  # program, so runs that differ only in lr or seed share one compilation (see `trainer_for`).
  inner = optax.chain(optax.clip_by_global_norm(c.optim.max_grad_norm),
                      optax.inject_hyperparams(optax.adamw)(
                          learning_rate=c.optim.lr, b1=c.optim.b1, b2=c.optim.b2,
                          weight_decay=c.optim.weight_decay))
  m = c.train.num_microbatches
  # Local data-parallel mode: the transform runs per device inside shard_map and sums over "data".
  shared = dict(axis_name=mesh_lib.DATA_AXIS) if _local_mode(c) else {}
  # Scanned layers: each layer of a stacked leaf is projected as its own leaf.
  shared["stacked"] = stacked_lib.stacked_paths
  accumulation, intra = proma_options(c)
  if c.algorithm == "proma":
    return proma_jax.proma_accumulation(inner, m, **dataclasses.asdict(accumulation), **shared)
  if c.algorithm == "proma_intra":
    return proma_jax.proma_intra(inner, m, **dataclasses.asdict(intra), **shared)
  if c.algorithm == "proma_both":
    i = dataclasses.asdict(intra)
    return proma_jax.proma_both(inner, m, intra_shrinkage=i.pop("shrinkage"), **i,
                                **dataclasses.asdict(accumulation), **shared)
  # Baselines: the same accumulator, state and metrics with projection off.
  return proma_jax.microbatch_accumulation(inner, m, **shared)


def proma_options(c: ml_collections.ConfigDict) -> tuple[proma_jax.AccumulationOptions | None,
                                                         proma_jax.IntraOptions | None]:
  """The knobs of `c.algorithm`'s projections (None for a projection it does not make)."""
  p = c.proma
  accumulation = proma_jax.AccumulationOptions(
      shrinkage=p.shrinkage, ridge=p.ridge, relative_bound=p.relative_bound,
      skip_fraction=p.skip_fraction, solver=p.solver)
  intra = proma_jax.IntraOptions(rank=p.rank, shrinkage=p.intra_shrinkage,
                                 power_iters=p.power_iters, seed=p.range_finder_seed)
  return ({"proma": (accumulation, None), "proma_intra": (None, intra),
           "proma_both": (accumulation, intra)}.get(c.algorithm, (None, None)))


def _local_mode(c: ml_collections.ConfigDict) -> bool:
  return c.mesh.data > 1 and c.mesh.mode == "local"


def _is_dense_kernel(path) -> bool:
  return jax.tree_util.keystr(path).endswith("['kernel']")


def make_microbatch_update(c: ml_collections.ConfigDict, policy: policy_lib.Policy,
                           tx: optax.GradientTransformationExtraArgs, mesh=None, placement=None):
  """The jitted (params, opt_state, microbatch, num_tokens) -> (params, opt_state, metrics);
  params and opt_state are donated.

  With a mesh, jitted on it (`mesh_lib.data_parallel`): the microbatch sharded over "data", the
  rest replicated; in local mode each device's metrics (sums over its tokens) are psum-ed. With
  `placement` = (params shardings, opt_state shardings) on an FSDP mesh, the outputs keep them.
  """
  return _compile(c, microbatch_update_fn(c, policy, tx, placement), mesh, stacked=False,
                  placement=placement)


def make_minibatch_update(c: ml_collections.ConfigDict, policy: policy_lib.Policy,
                          tx: optax.GradientTransformationExtraArgs, mesh=None, placement=None):
  """One optimizer step in one compiled call: the jitted
  (params, opt_state, microbatches, num_tokens) -> (params, opt_state, metrics), where every leaf
  of `microbatches` stacks the step's M microbatches on a leading axis (M, n, ...).

  A `lax.scan` runs the microbatch update of `make_microbatch_update` over the M microbatches with
  params and the transform's state carried, so the result is the loop's (to float rounding) and
  the program compiles once whatever M; the metrics are summed over the microbatches, as the loop
  sums them. params and opt_state are donated. With a mesh, each microbatch's sequences (axis 1)
  are sharded over "data".
  """
  update = microbatch_update_fn(c, policy, tx, placement)

  def minibatch_update(params, opt_state, microbatches, num_tokens):
    def body(carry, mb):
      params, opt_state, metrics = update(*carry, mb, num_tokens)
      return (params, opt_state), metrics

    (params, opt_state), metrics = jax.lax.scan(body, (params, opt_state), microbatches)
    return params, opt_state, jax.tree.map(lambda x: jnp.sum(x, axis=0), metrics)

  return _compile(c, minibatch_update, mesh, stacked=True, placement=placement)


def _compile(c: ml_collections.ConfigDict, update, mesh, stacked: bool, placement=None):
  """`update` jitted with params and opt_state donated, on the mesh when there is one (in local
  mode its metrics, sums over each device's tokens, are psum-ed; on an FSDP mesh the inputs come
  placed and the outputs keep `placement`, the metrics replicated)."""
  if mesh is None:
    return jax.jit(update, donate_argnums=(0, 1))
  if placement is not None:
    return jax.jit(update, out_shardings=(*placement, mesh_lib.replicated(mesh)),
                   donate_argnums=(0, 1))
  if _local_mode(c):
    def update_local(params, opt_state, mb, num_tokens):
      params, opt_state, metrics = update(params, opt_state, mb, num_tokens)
      return params, opt_state, jax.lax.psum(metrics, mesh_lib.DATA_AXIS)
    return mesh_lib.data_parallel(update_local, mesh, c.mesh.mode, sequence_axis=int(stacked))
  return mesh_lib.data_parallel(update, mesh, c.mesh.mode, sequence_axis=int(stacked))


def microbatch_update_fn(c: ml_collections.ConfigDict, policy: policy_lib.Policy,
                          tx: optax.GradientTransformationExtraArgs, placement=None):
  """The pure (params, opt_state, microbatch, num_tokens) -> (params, opt_state, metrics) of
  `c.algorithm`: the microbatch's gradient (and PROMA statistics), the transform, apply_updates.
  With `placement` (FSDP), the per-sequence gradients are resharded like the params before the
  transform (`mesh_lib.constrain_sequence_gradients`)."""
  algorithm = c.algorithm
  if algorithm == "grpo":
    policy_loss = losses.get_policy_loss("grpo", eps_low=c.grpo.eps_low, eps_high=c.grpo.eps_high,
                                         dual_clip=c.grpo.dual_clip)
  else:
    policy_loss = losses.get_policy_loss("reinforce")

  def response_logp(model, mb):
    return policy_lib.response_logprobs(model, mb["tokens"], mb["valid"], mb["mask"].shape[1])[0]

  def loss_of_logp(logp, mb, num_tokens):
    return policy_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], num_tokens)

  def loss_on_model(model, mb, num_tokens):
    return loss_of_logp(response_logp(model, mb), mb, num_tokens)

  def objectives_of_logp(logp, mb, num_tokens):  # f_i, advantage-free (docs/algorithm.md#the-problem)
    return losses.sequence_ratio(logp, mb["old_logp"], mb["mask"], num_tokens)

  def objectives_and_metrics(model, mb, num_tokens):  # f_i and the loss's metrics, one forward
    logp = response_logp(model, mb)
    return objectives_of_logp(logp, mb, num_tokens), loss_of_logp(logp, mb, num_tokens)[1]

  # Per-sequence gradients vmap the model: no cuDNN attention there (`policy_lib.vmappable`).
  vmap_policy = (policy_lib.vmappable(policy) if algorithm in ("proma", "proma_both")
                 else policy)

  def sequence_grads(params, mb, num_tokens):
    def f_i(params, seq):
      one = jax.tree.map(lambda x: x[None], seq)
      model = policy_lib.bind(vmap_policy, params)
      return objectives_of_logp(response_logp(model, one), one, num_tokens)[0]

    seqs = {k: mb[k] for k in ("tokens", "valid", "mask", "old_logp")}
    loss, grads, seq_grads = proma_jax.policy_gradient_and_sequence_gradients(
        f_i, params, seqs, mb["advantages"])
    if c.proma.scope == "dense":
      seq_grads = jax.tree_util.tree_map_with_path(
          lambda path, s: s if _is_dense_kernel(path) else None, seq_grads)
    return loss, grads, seq_grads

  def factor_grads(params, mb, num_tokens):
    # The REINFORCE loss is -sum_i A_i f_i: one backward pass gives its gradient and the
    # advantage-free factors (capture.policy_gradient_and_dense_factors).
    (loss, metrics), grads, factors = proma_jax.policy_gradient_and_dense_factors(
        lambda m, b: objectives_and_metrics(m, b, num_tokens), policy_lib.bind(policy, params), mb,
        mb["advantages"], token_mask=mb["valid"], has_aux=True)
    return loss, metrics, grads, factors

  accumulation, intra = proma_options(c)

  def fused_changes(params, opt_state, mb, num_tokens):
    # Every PROMA variant: each dense kernel's change of R from inside its backward pass
    # (docs/algorithm.md#fused-statistics); other leaves' S_i (scope "all") by vmap.
    (loss, metrics), grads, seq_grads, fused = proma_jax.policy_gradient_and_fused_changes(
        lambda m, b: objectives_and_metrics(m, b, num_tokens), policy_lib.bind(policy, params), mb,
        mb["advantages"], proma_jax.find_proma_state(opt_state),
        num_microbatches=c.train.num_microbatches, accumulation=accumulation, intra=intra,
        token_mask=mb["valid"], has_aux=True, scope=c.proma.scope,
        sequence_model=policy_lib.bind(vmap_policy, params),
        param_shardings=None if placement is None else placement[0])
    extra = dict(fused=fused)
    if accumulation is not None:
      extra["seq_grads"] = seq_grads
    return loss, metrics, grads, extra

  def update(params, opt_state, mb, num_tokens):
    extra, metrics = {}, {}
    if algorithm in ("reinforce", "grpo"):
      (loss, metrics), grads = jax.value_and_grad(
          lambda p: loss_on_model(policy_lib.bind(policy, p), mb, num_tokens), has_aux=True)(params)
    elif c.proma.fused:
      loss, metrics, grads, extra = fused_changes(params, opt_state, mb, num_tokens)
    elif algorithm == "proma":
      loss, grads, extra["seq_grads"] = sequence_grads(params, mb, num_tokens)
    elif algorithm == "proma_intra":
      loss, metrics, grads, extra["factors"] = factor_grads(params, mb, num_tokens)
    else:  # proma_both: gradient, factors and dense S_i from one pass, other leaves' S_i by vmap
      (loss, metrics), grads, extra["seq_grads"], extra["factors"] = (
          proma_jax.policy_gradient_and_sequence_statistics(
              lambda m, b: objectives_and_metrics(m, b, num_tokens),
              policy_lib.bind(vmap_policy, params), mb, mb["advantages"], token_mask=mb["valid"],
              has_aux=True, scope=c.proma.scope))
    if placement is not None and "seq_grads" in extra:
      extra["seq_grads"] = mesh_lib.constrain_sequence_gradients(extra["seq_grads"], placement[0])
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
    return params, opt_state, dict(metrics, **{"loss": loss})

  return update


# ---------------------------------------------------------------------------------------------
# One RL step.


def step_examples(c: ml_collections.ConfigDict, policy: policy_lib.Policy, step: int, seed: int):
  """The step's prompts, each repeated group_size times (a deterministic function of seed, step)."""
  prompts = policy.task.train_examples(c.rollout.prompts_per_step, seed=seed * 1_000_003 + step)
  return [ex for ex in prompts for _ in range(c.rollout.group_size)]


# Train-split seeds of RL steps are seed * 1_000_003 + step; the val_id draws use this one +
# eval.seed: fresh draws for generated tasks (a few may repeat training prompts), draws from the
# same training file for file-based tasks (GSM8K), which are then not held out.
_HELDOUT_SEED = 2**31 - 1_000_003


def slice_rows(tree: dict, idx: np.ndarray) -> dict:
  return {k: v[idx] for k, v in tree.items()}


class Trainer:
  """The compiled functions of a config; `step` advances params and opt_state by one RL step.

  Nothing compiled depends on `c.seed` or `c.optim.lr` (both arrive at run time), so one Trainer
  serves every seed and learning rate of an otherwise identical config.
  """

  def __init__(self, c: ml_collections.ConfigDict, policy: policy_lib.Policy, init_params: dict):
    validate_config(c)
    self.c = c
    if c.mesh.fsdp > 1:
      self.mesh = mesh_lib.fsdp_mesh(c.mesh.data, c.mesh.fsdp)
    else:
      self.mesh = mesh_lib.data_mesh(c.mesh.data) if c.mesh.data > 1 else None
    self.policy, self.init_params = policy, self.place(init_params)
    self.tx = make_optimizer(c)
    placement = None
    if c.mesh.fsdp > 1:  # the outputs keep the inputs' FSDP placement
      state = jax.eval_shape(lambda p: self.tx.init(p), init_params)
      placement = tuple(mesh_lib.shardings(self.mesh, self._specs(tree))
                        for tree in (init_params, state))
    self.microbatch_update = make_microbatch_update(c, policy, self.tx, self.mesh, placement)
    self.minibatch_update = make_minibatch_update(c, policy, self.tx, self.mesh, placement)
    batch = c.rollout.prompts_per_step * c.rollout.group_size
    self.minibatch_rows = batch // c.train.num_minibatches
    self.stats_rows = self.minibatch_rows // c.train.num_microbatches

    def stats(params, tokens, valid, response_len):  # one chunk of stats_rows rows at a time
      model = policy_lib.bind(policy, params)
      chunks = [x.reshape((-1, self.stats_rows) + x.shape[1:]) for x in (tokens, valid)]
      out = jax.lax.map(lambda tv: policy_lib.response_logprobs(model, *tv, response_len), chunks)
      return tuple(x.reshape((-1,) + x.shape[2:]) for x in out)

    self._stats = jax.jit(stats, static_argnums=3)
    self.val_examples = policy.task.val_examples(c.eval.num_examples, seed=c.eval.seed)
    # In-distribution held-out: other draws of the train split (from a seed no step uses; a
    # task with few distinct prompts repeats some training prompts).
    self.val_id_examples = (policy.task.train_examples(c.eval.num_examples,
                                                       seed=_HELDOUT_SEED + c.eval.seed)
                            if c.eval.in_distribution else [])

  def evaluate(self, params: dict) -> dict[str, float]:
    """Greedy accuracy on the val split ("val/accuracy") and, with eval.in_distribution, on
    held-out draws of the train split ("val_id/accuracy")."""
    out = {"val/accuracy": policy_lib.greedy_accuracy(self.policy, params, self.val_examples)}
    if self.val_id_examples:
      out["val_id/accuracy"] = policy_lib.greedy_accuracy(self.policy, params, self.val_id_examples)
    return out

  def stats(self, params: dict, tokens_BxT, valid_BxT, response_len: int):
    """(logp_BxL, entropy_BxL) of the responses (B a multiple of the minibatch), one compiled call
    per minibatch of rows that maps over chunks of a microbatch's rows (`lax.map`): memory stays
    that of a microbatch whatever the batch, and one program serves the whole batch and its
    minibatches."""
    rows = min(len(tokens_BxT), self.minibatch_rows)
    parts = [self._stats(params, tokens_BxT[i:i + rows], valid_BxT[i:i + rows], response_len)
             for i in range(0, len(tokens_BxT), rows)]
    if len(parts) == 1:
      return parts[0]
    return tuple(jnp.concatenate(columns, axis=0) for columns in zip(*parts))

  def fresh_params(self) -> dict:
    """A copy of the initial params to train (the microbatch update donates its params, and
    `init_params` must survive for kl/init and later runs of a sweep)."""
    return self.place(jax.tree.map(jnp.copy, self.init_params))

  def init_opt_state(self, params: dict, lr: float):
    return self.place(
        optax.tree.set(self.tx.init(params), learning_rate=jnp.asarray(lr, jnp.float32)))

  def place(self, tree):
    """`tree` (params, optimizer state, scalars) placed on the mesh: replicated, or with
    mesh.fsdp > 1 each leaf by the FSDP rule (`mesh_lib.param_specs`; small leaves and scalars
    replicated). Unchanged without a mesh."""
    if self.mesh is None:
      return tree
    return mesh_lib.place(tree, self.mesh, self._specs(tree))  # fsdp 1: every spec is P()

  def _specs(self, tree):
    return mesh_lib.param_specs(tree, self.c.mesh.fsdp, min_size=self.c.mesh.fsdp_min_size,
                                layer_axis=stacked_lib.is_stacked_name)

  def shard(self, microbatch: dict, axis: int = 0) -> dict:
    """A microbatch's sequences (along `axis`) sharded over the mesh, this process feeding its
    own rows."""
    return (microbatch if self.mesh is None
            else mesh_lib.shard_sequences(microbatch, self.mesh, axis))

  def optimizer_step(self, params: dict, opt_state, minibatch: dict, num_tokens):
    """One optimizer step on a minibatch: its M microbatches (consecutive rows) accumulated by
    the transform. (params, opt_state, metrics summed over the microbatches)."""
    m = self.c.train.num_microbatches
    if self.c.train.scan_microbatches:  # one compiled call (make_minibatch_update)
      stacked = {k: v.reshape((m, -1) + v.shape[1:]) for k, v in minibatch.items()}
      return self.minibatch_update(params, opt_state, self.shard(stacked, axis=1), num_tokens)
    metrics: dict[str, Any] = {}
    for idx in np.split(np.arange(len(minibatch["tokens"])), m):  # one call per microbatch
      params, opt_state, micro_metrics = self.microbatch_update(
          params, opt_state, self.shard(slice_rows(minibatch, idx)), num_tokens)
      for k, v in micro_metrics.items():
        metrics[k] = metrics.get(k, 0.0) + v
    return params, opt_state, metrics

  def step(self, params: dict, opt_state, step: int, seed: int):
    c, policy = self.c, self.policy
    t0 = time.perf_counter()
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    examples = step_examples(c, policy, step, seed)
    rollout = policy_lib.generate(policy, params, examples, key, temperature=c.rollout.temperature)
    scores = policy_lib.score(policy, rollout, examples)
    advantages = losses.group_advantages(jnp.asarray(scores.rewards_B), c.rollout.group_size)
    batch = {"tokens": rollout.tokens_BxT, "valid": rollout.valid_BxT,
             "mask": rollout.response_mask_BxL, "old_logp": rollout.logprobs_BxL,
             "advantages": advantages}
    jax.block_until_ready(batch)
    t1 = time.perf_counter()
    length = batch["mask"].shape[1]
    logprob_s = 0.0

    def timed_stats(params, tokens, valid):
      nonlocal logprob_s
      jax.block_until_ready(params)  # the updates dispatched before count as update time
      start = time.perf_counter()
      out = jax.block_until_ready(self.stats(params, tokens, valid, length))
      logprob_s += time.perf_counter() - start
      return out

    logp_init, _ = timed_stats(self.init_params, batch["tokens"], batch["valid"])
    kl_init = losses.kl_step(batch["old_logp"], logp_init, batch["mask"])
    # Each epoch passes over the rollout batch in a fresh order (epoch 0's is the one-epoch order).
    order_key = jax.random.fold_in(key, 1)
    minibatches = [idx for epoch in range(c.train.num_epochs) for idx in np.split(
        np.asarray(jax.random.permutation(
            order_key if epoch == 0 else jax.random.fold_in(order_key, epoch), len(examples))),
        c.train.num_minibatches)]
    sums: dict[str, list] = {}
    for mb_idx in minibatches:
      mb = slice_rows(batch, mb_idx)
      num_tokens = self.place(jnp.maximum(jnp.sum(mb["mask"]), 1.0))
      logp_before, entropy = timed_stats(params, mb["tokens"], mb["valid"])
      params, opt_state, step_metrics = self.optimizer_step(params, opt_state, mb, num_tokens)
      step_metrics = dict(step_metrics)
      logp_after, _ = timed_stats(params, mb["tokens"], mb["valid"])
      step_metrics["kl/step"] = losses.kl_step(logp_before, logp_after, mb["mask"])
      step_metrics["kl/step_k3"] = losses.kl_step_k3(logp_before, logp_after, mb["mask"])
      step_metrics["entropy"] = losses.masked_mean(entropy, mb["mask"])
      for k, v in dict(step_metrics, **transform_metrics(c.algorithm, opt_state)).items():
        sums.setdefault(k, []).append(v)
    jax.block_until_ready(params)
    t2 = time.perf_counter()

    metrics = {k: float(np.mean([float(x) for x in v])) for k, v in sums.items()}
    metrics["kl/step_max"] = float(np.max([float(x) for x in sums["kl/step"]]))
    lengths = np.asarray(jnp.sum(batch["mask"], axis=1))
    ended = np.any((policy_lib.response_tokens(rollout) == policy.tokenizer.eos_id)
                   & (np.asarray(batch["mask"]) > 0), axis=1)
    metrics.update({
        "reward/mean": float(np.mean(scores.rewards_B)),
        "reward/format": float(np.mean(scores.formatted_B)),
        "reward/errors": float(scores.errors),
        "kl/init": float(kl_init),
        "response/length": float(np.mean(lengths)),
        "response/length_max": float(np.max(lengths)),
        # Responses that reached max_new_tokens without emitting EOS.
        "response/clipped_frac": float(np.mean(~ended)),
        "time/sample_s": t1 - t0, "time/logprob_s": logprob_s,
        "time/update_s": t2 - t1 - logprob_s, "time/step_s": t2 - t0,
    })
    return params, opt_state, metrics


def transform_metrics(algorithm: str, opt_state) -> dict:
  """grad/norm for every algorithm; the scalar proma/* metrics for the PROMA variants."""
  metrics = proma_jax.proma_metrics(opt_state)
  keep = ["grad/norm"] + ([k for k in metrics if k.count("/") == 1 and k.startswith("proma/")]
                          if algorithm.startswith("proma") else [])
  # Copies: the state's own buffers are donated to the next microbatch update.
  return {k: jnp.copy(metrics[k]) for k in keep}


_RUNTIME_FIELDS = ("seed", "steps", "optim.lr", "checkpoint", "logging")
_TRAINERS: dict[str, tuple[Trainer, dict]] = {}


def trainer_for(c: ml_collections.ConfigDict) -> tuple[Trainer, dict]:
  """(Trainer, warm-start summary), reused within the process for configs that differ only in
  seed, steps, learning rate or checkpointing (a sweep compiles once per task and algorithm)."""
  static = to_json(c)
  for field in _RUNTIME_FIELDS:
    *parents, leaf = field.split(".")
    node = static
    for parent in parents:
      node = node[parent]
    node.pop(leaf)
  key = json.dumps(static, sort_keys=True)
  if key not in _TRAINERS:
    policy, warm_params, warm_summary = sft.load_or_train(c)
    _TRAINERS[key] = (Trainer(c, policy, warm_params), warm_summary)
  return _TRAINERS[key]
