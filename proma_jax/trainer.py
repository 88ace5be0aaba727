"""The RL step of a config: the optimizer, the compiled microbatch and minibatch updates, and
`Trainer`, which holds them and runs one RL step.

  Trainer.step      rollout -> kl/init -> learn -> the step's metrics
  Trainer.rollout   the step's prompts sampled and scored: a `Batch` (tokens, valid, mask,
                    old_logp, advantages) with group advantages
  Trainer.learn     num_epochs x num_minibatches optimizer steps on the batch, each accumulating
                    num_microbatches microbatches (`optimizer_step`), with its KL and entropy

Every algorithm takes this one code path; its row of `proma_jax.algorithms.TABLE` supplies the
transform, the microbatch gradient function and the metrics (docs/algorithm.md#the-problem).
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import proma_jax
from proma_jax import algorithms, losses
from proma_jax import mesh as mesh_lib
from proma_jax import policy as policy_lib
from proma_jax import sft, tasks
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
  return algorithms.TABLE[c.algorithm].transform(inner, m, accumulation, intra, **shared)


def proma_options(c: ml_collections.ConfigDict) -> tuple[proma_jax.AccumulationOptions | None,
                                                         proma_jax.IntraOptions | None]:
  """The knobs of `c.algorithm`'s projections (None for a projection it does not make)."""
  p = c.proma
  accumulation = proma_jax.AccumulationOptions(
      shrinkage=p.shrinkage, ridge=p.ridge, relative_bound=p.relative_bound,
      skip_fraction=p.skip_fraction, solver=p.solver)
  intra = proma_jax.IntraOptions(rank=p.rank, shrinkage=p.intra_shrinkage,
                                 power_iters=p.power_iters, seed=p.range_finder_seed)
  row = algorithms.TABLE[c.algorithm]
  return accumulation if row.accumulation else None, intra if row.intra else None


def _local_mode(c: ml_collections.ConfigDict) -> bool:
  return c.mesh.data > 1 and c.mesh.mode == "local"


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
  `c.algorithm`: the microbatch's gradient (and PROMA statistics) by its row's gradient function
  (`algorithms.fused_gradients` for a projecting row with proma.fused), the transform,
  apply_updates. With `placement` (FSDP), the per-sequence gradients are resharded like the
  params before the transform (`mesh_lib.constrain_sequence_gradients`)."""
  row = algorithms.TABLE[c.algorithm]
  accumulation, intra = proma_options(c)
  objective = algorithms.Objective(
      policy=policy,
      # Per-sequence gradients vmap the model: no cuDNN attention there (`policy_lib.vmappable`).
      sequence_policy=policy_lib.vmappable(policy) if row.accumulation else policy,
      policy_loss=losses.get_policy_loss(row.loss, **row.loss_options(c)),
      scope=c.proma.scope, num_microbatches=c.train.num_microbatches,
      accumulation=accumulation, intra=intra,
      param_shardings=None if placement is None else placement[0])
  gradients = algorithms.fused_gradients if row.projects and c.proma.fused else row.gradients
  return functools.partial(_microbatch_update, objective, gradients, tx)


def _microbatch_update(objective: algorithms.Objective, gradients: algorithms.GradientFn,
                       tx: optax.GradientTransformationExtraArgs, params, opt_state, mb: dict,
                       num_tokens):
  """One microbatch through `gradients` and the transform: (params, opt_state, metrics)."""
  loss, metrics, grads, extra = gradients(objective, params, opt_state, mb, num_tokens)
  if objective.param_shardings is not None and "seq_grads" in extra:
    extra["seq_grads"] = mesh_lib.constrain_sequence_gradients(extra["seq_grads"],
                                                               objective.param_shardings)
  updates, opt_state = tx.update(grads, opt_state, params, **extra)
  params = optax.apply_updates(params, updates)
  return params, opt_state, dict(metrics, **{"loss": loss})


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


def slice_rows(tree, idx: np.ndarray):
  """The rows `idx` of every leaf of `tree` (a `Batch`, or a microbatch dict of its arrays)."""
  return jax.tree.map(lambda x: x[idx], tree)


def minibatch_rows(c: ml_collections.ConfigDict, key: jax.Array, num_rows: int) -> list[np.ndarray]:
  """The rows of each optimizer step of an RL step: every one of `c.train.num_epochs` epochs
  passes over the batch in a fresh order (epoch 0's is the one-epoch order), split into
  `c.train.num_minibatches` minibatches."""
  order_key = jax.random.fold_in(key, 1)
  return [idx for epoch in range(c.train.num_epochs) for idx in np.split(
      np.asarray(jax.random.permutation(
          order_key if epoch == 0 else jax.random.fold_in(order_key, epoch), num_rows)),
      c.train.num_minibatches)]


class Batch(NamedTuple):
  """A rollout as the optimizer steps read it: B sequences of T = P + L tokens, L response tokens.

  `_asdict()` is the microbatch dict the compiled updates take (`algorithms`); `slice_rows` takes
  minibatches of it.
  """
  tokens: jax.Array      # (B, T) int32 prompt then response; pad_id after EOS
  valid: jax.Array       # (B, T) 1 at real prompt tokens and response tokens up to the first EOS
  mask: jax.Array        # (B, L) the response columns of `valid`
  old_logp: jax.Array    # (B, L) log-probs of the response tokens under the sampling params
  advantages: jax.Array  # (B,) group-normalised rewards (`losses.group_advantages`)

  @property
  def response_len(self) -> int:
    """L, static: the width of the response mask (not a leaf, so never traced or sliced)."""
    return self.mask.shape[1]


class _Clock:
  """Seconds a step spends in its log-prob passes (time/logprob_s)."""

  def __init__(self):
    self.logprob_s = 0.0


def placement_specs(tree: Any, c: ml_collections.ConfigDict) -> Any:
  """The PartitionSpec of each leaf of `tree` (params, optimizer state) on the run's mesh:
  replicated, or with mesh.fsdp > 1 by the FSDP rule (`mesh_lib.param_specs`, the layer axis of
  stacked leaves never sharded). Shared by training and `proma_jax.evaluate`."""
  return mesh_lib.param_specs(tree, c.mesh.fsdp, min_size=c.mesh.fsdp_min_size,
                              layer_axis=stacked_lib.is_stacked_name)


class Trainer:
  """The compiled functions of a config; `step` advances params and opt_state by one RL step.

  Nothing compiled depends on `c.seed` or `c.optim.lr` (both arrive at run time), so one Trainer
  serves every seed and learning rate of an otherwise identical config.
  """

  def __init__(self, c: ml_collections.ConfigDict, policy: policy_lib.Policy, init_params: dict):
    validate_config(c)
    self.c = c
    self.mesh = mesh_lib.make_mesh(c)
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
    self.logprob_rows = self.minibatch_rows // c.train.num_microbatches
    self._logprobs_and_entropy = jax.jit(self._chunked_logprobs_and_entropy, static_argnums=3)
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

  def _chunked_logprobs_and_entropy(self, params, tokens, valid, response_len: int):
    """The traced body of `logprobs_and_entropy`: `logprob_rows` rows at a time (`lax.map`)."""
    model = policy_lib.bind(self.policy, params)
    chunks = [x.reshape((-1, self.logprob_rows) + x.shape[1:]) for x in (tokens, valid)]
    out = jax.lax.map(lambda tv: policy_lib.response_logprobs(model, *tv, response_len), chunks)
    return tuple(x.reshape((-1,) + x.shape[2:]) for x in out)

  def logprobs_and_entropy(self, params: dict, tokens_BxT, valid_BxT, response_len: int):
    """(logp_BxL, entropy_BxL) of the responses (B a multiple of the minibatch), one compiled call
    per minibatch of rows that maps over chunks of a microbatch's rows (`lax.map`): memory stays
    that of a microbatch whatever the batch, and one program serves the whole batch and its
    minibatches."""
    rows = min(len(tokens_BxT), self.minibatch_rows)
    parts = [self._logprobs_and_entropy(params, tokens_BxT[i:i + rows], valid_BxT[i:i + rows],
                                        response_len)
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
    return placement_specs(tree, self.c)

  def shard(self, microbatch: dict, axis: int = 0) -> dict:
    """A microbatch's sequences (along `axis`) sharded over the mesh, this process feeding its
    own rows."""
    return (microbatch if self.mesh is None
            else mesh_lib.shard_sequences(microbatch, self.mesh, axis))

  def optimizer_step(self, params: dict, opt_state, minibatch: dict, num_tokens):
    """One optimizer step on a minibatch (a dict of `Batch`'s arrays): its M microbatches
    (consecutive rows) accumulated by the transform. (params, opt_state, metrics summed over the
    microbatches)."""
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

  def rollout(self, params: dict, step: int, seed: int,
              key: jax.Array) -> tuple[Batch, tasks.Scores, np.ndarray]:
    """The step's rollout under `params`: group_size responses to each of its prompts
    (`step_examples`), sampled with `key`, scored, with group advantages. (batch, scores,
    ended_B: whether each response emitted EOS)."""
    c, policy = self.c, self.policy
    examples = step_examples(c, policy, step, seed)
    sampled = policy_lib.generate(policy, params, examples, key, temperature=c.rollout.temperature)
    scores = policy_lib.score(policy, sampled, examples)
    advantages = losses.group_advantages(jnp.asarray(scores.rewards_B), c.rollout.group_size)
    batch = Batch(tokens=sampled.tokens_BxT, valid=sampled.valid_BxT,
                  mask=sampled.response_mask_BxL, old_logp=sampled.logprobs_BxL,
                  advantages=advantages)
    jax.block_until_ready(batch)
    ended = np.any((policy_lib.response_tokens(sampled) == policy.tokenizer.eos_id)
                   & (np.asarray(batch.mask) > 0), axis=1)
    return batch, scores, ended

  def _timed_logprobs(self, params: dict, batch: Batch, clock: _Clock):
    """`logprobs_and_entropy` of `batch` under `params`, its seconds added to `clock`."""
    jax.block_until_ready(params)  # the updates dispatched before count as update time
    start = time.perf_counter()
    out = jax.block_until_ready(
        self.logprobs_and_entropy(params, batch.tokens, batch.valid, batch.response_len))
    clock.logprob_s += time.perf_counter() - start
    return out

  def learn(self, params: dict, opt_state, batch: Batch, key: jax.Array, clock: _Clock):
    """The optimizer steps of one RL step on `batch` (`minibatch_rows`), with each minibatch's
    kl/step, kl/step_k3 (log-probs before and after its step), entropy and the transform's
    metrics. (params, opt_state, {metric: [one value per optimizer step]})."""
    sums: dict[str, list] = {}
    for idx in minibatch_rows(self.c, key, len(batch.tokens)):
      mb = slice_rows(batch, idx)
      num_tokens = self.place(jnp.maximum(jnp.sum(mb.mask), 1.0))
      logp_before, entropy = self._timed_logprobs(params, mb, clock)
      params, opt_state, step_metrics = self.optimizer_step(params, opt_state, mb._asdict(),
                                                            num_tokens)
      step_metrics = dict(step_metrics)
      logp_after, _ = self._timed_logprobs(params, mb, clock)
      step_metrics["kl/step"] = losses.kl_step(logp_before, logp_after, mb.mask)
      step_metrics["kl/step_k3"] = losses.kl_step_k3(logp_before, logp_after, mb.mask)
      step_metrics["entropy"] = losses.masked_mean(entropy, mb.mask)
      for k, v in dict(step_metrics, **transform_metrics(self.c.algorithm, opt_state)).items():
        sums.setdefault(k, []).append(v)
    return params, opt_state, sums

  def step(self, params: dict, opt_state, step: int, seed: int):
    """One RL step: the rollout (`rollout`), its kl/init against the initial params, the
    optimizer steps (`learn`) and the step's metrics. (params, opt_state, metrics)."""
    t0 = time.perf_counter()
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    batch, scores, ended = self.rollout(params, step, seed, key)
    t1 = time.perf_counter()
    clock = _Clock()
    logp_init, _ = self._timed_logprobs(self.init_params, batch, clock)
    kl_init = losses.kl_step(batch.old_logp, logp_init, batch.mask)
    params, opt_state, sums = self.learn(params, opt_state, batch, key, clock)
    jax.block_until_ready(params)
    t2 = time.perf_counter()

    metrics = {k: float(np.mean([float(x) for x in v])) for k, v in sums.items()}
    metrics["kl/step_max"] = float(np.max([float(x) for x in sums["kl/step"]]))
    metrics.update(_rollout_metrics(batch, scores, ended, kl_init))
    metrics.update({"time/sample_s": t1 - t0, "time/logprob_s": clock.logprob_s,
                    "time/update_s": t2 - t1 - clock.logprob_s, "time/step_s": t2 - t0})
    return params, opt_state, metrics


def _rollout_metrics(batch: Batch, scores: tasks.Scores, ended_B: np.ndarray,
                     kl_init) -> dict[str, float]:
  """reward/*, kl/init (the rollout's KL from the initial params) and response/*."""
  lengths = np.asarray(jnp.sum(batch.mask, axis=1))
  return {
      "reward/mean": float(np.mean(scores.rewards_B)),
      "reward/format": float(np.mean(scores.formatted_B)),
      "reward/errors": float(scores.errors),
      "kl/init": float(kl_init),
      "response/length": float(np.mean(lengths)),
      "response/length_max": float(np.max(lengths)),
      # Responses that reached max_new_tokens without emitting EOS.
      "response/clipped_frac": float(np.mean(~ended_B)),
  }


def transform_metrics(algorithm: str, opt_state) -> dict:
  """The transform metrics `algorithm` reports (its row's `metrics`: grad/norm, and for the PROMA
  variants the scalar proma/* metrics)."""
  # Copies: the state's own buffers are donated to the next microbatch update.
  return {k: jnp.copy(v) for k, v in algorithms.TABLE[algorithm].metrics(opt_state).items()}


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
