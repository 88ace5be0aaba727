"""RL fine-tuning: rollout -> advantages -> minibatches -> microbatches -> transform -> optimizer.

Every algorithm runs on this one code path (DESIGN sections 7-8): the same rollouts, advantages,
data order, token-mean normalisation (exact across microbatches), AdamW with global-norm clipping,
and the same microbatch accumulator (`proma_jax.transforms`; the baselines accumulate with
projection off). They differ only in the microbatch gradient function and the extra inputs:

  reinforce    unclipped ratio objective -sum A_i r_it / N
  grpo         PPO ratio clipping (eps 0.2/0.2) with dual clip 3
  proma        reinforce gradient + accumulation projection with vmap sequence gradients
  proma_intra  reinforce gradient + intra projection with captured dense factors
  proma_both   both projections

  python -m proma_jax.train --config=configs/arith.py:proma --workdir=runs/arith_proma \
      --config.steps=50 --config.optim.lr=3e-4

Rerunning the same command resumes from the latest checkpoint in --workdir.

Data parallelism (`proma_jax.mesh`): --config.mesh.data=D shards each microbatch's sequences over a
("data",) mesh of D devices with params replicated; --config.mesh.mode=exact (the single-device
result; the compiler inserts the collectives) or local (shard_map: each device projects against its
own sequences, one psum per microbatch). Multi-process: start the same command N times with
--config.distributed.num_processes=N --config.distributed.process_id=i
--config.distributed.coordinator=127.0.0.1:PORT and --config.mesh.data=<total devices>; each
process computes the rollout, feeds its own rows of every microbatch, and process 0 writes the
metrics (checkpoints are saved collectively through orbax, whose primary process writes them).
Rollouts, log-prob statistics and evaluation run replicated on every device of the mesh.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

import proma_jax
from proma_jax import losses
from proma_jax.config import ALGORITHMS
from proma_jax import mesh as mesh_lib
from proma_jax import policy as policy_lib
from proma_jax import sft
from proma_jax.checkpoint import Checkpointer

_SOLVERS = ("exact", "gram_schmidt")
_SCOPES = ("all", "dense")


# ---------------------------------------------------------------------------------------------
# Config validation: before anything is compiled, naming the field.


def validate_config(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid field of an RL config."""

  def need(ok: bool, field: str, message: str):
    if not ok:
      raise ValueError(f"config.{field}: {message}")

  need(c.algorithm in ALGORITHMS, "algorithm", f"unknown {c.algorithm!r}; expected one of {ALGORITHMS}")
  need(c.steps >= 0, "steps", f"must be >= 0, got {c.steps}")
  r, t = c.rollout, c.train
  need(r.group_size >= 2, "rollout.group_size", f"must be >= 2 for group advantages, got {r.group_size}")
  need(r.prompts_per_step >= 1, "rollout.prompts_per_step", f"must be >= 1, got {r.prompts_per_step}")
  need(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}")
  need(r.extra_new_tokens >= 0, "rollout.extra_new_tokens", f"must be >= 0, got {r.extra_new_tokens}")
  batch = r.prompts_per_step * r.group_size
  need(t.num_minibatches >= 1 and batch % t.num_minibatches == 0, "train.num_minibatches",
       f"{t.num_minibatches} does not divide the rollout batch of {batch} sequences "
       f"(rollout.prompts_per_step * rollout.group_size)")
  minibatch = batch // t.num_minibatches
  need(t.num_microbatches >= 1 and minibatch % t.num_microbatches == 0, "train.num_microbatches",
       f"{t.num_microbatches} does not divide the minibatch of {minibatch} sequences")
  microbatch, m, d = minibatch // t.num_microbatches, c.mesh, c.distributed
  need(m.data >= 1 and microbatch % m.data == 0, "mesh.data",
       f"{m.data} does not divide the microbatch of {microbatch} sequences, which are sharded over "
       "the mesh.data devices")
  need(m.mode in mesh_lib.MODES, "mesh.mode", f"unknown {m.mode!r}; expected one of {mesh_lib.MODES}")
  need(d.num_processes >= 1, "distributed.num_processes", f"must be >= 1, got {d.num_processes}")
  need(0 <= d.process_id < d.num_processes, "distributed.process_id",
       f"must be in [0, {d.num_processes}), got {d.process_id}")
  need(d.num_processes == 1 or m.data % d.num_processes == 0, "mesh.data",
       f"a {d.num_processes}-process run shards over all devices of all processes; "
       f"{m.data} is not a multiple of distributed.num_processes")
  o = c.optim
  need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
  need(o.max_grad_norm > 0, "optim.max_grad_norm", f"must be > 0, got {o.max_grad_norm}")
  need(c.grpo.eps_low >= 0 and c.grpo.eps_high >= 0, "grpo.eps_low/eps_high", "must be >= 0")
  need(c.grpo.dual_clip is None or c.grpo.dual_clip > 1, "grpo.dual_clip", "must be > 1 or None")
  p = c.proma
  need(p.solver in _SOLVERS, "proma.solver", f"unknown {p.solver!r}; expected one of {_SOLVERS}")
  need(p.scope in _SCOPES, "proma.scope", f"unknown {p.scope!r}; expected one of {_SCOPES}")
  need(p.shrinkage >= 0, "proma.shrinkage", f"must be >= 0, got {p.shrinkage}")
  need(p.ridge >= 0, "proma.ridge", f"must be >= 0, got {p.ridge}")
  need(p.rank >= 1, "proma.rank", f"must be >= 1, got {p.rank}")
  need(0 <= p.skip_fraction <= 1, "proma.skip_fraction", f"must be in [0, 1], got {p.skip_fraction}")
  need(c.eval.every >= 1, "eval.every", f"must be >= 1, got {c.eval.every}")
  need(c.eval.num_examples >= 1, "eval.num_examples", f"must be >= 1, got {c.eval.num_examples}")
  need(c.checkpoint.every >= 1, "checkpoint.every", f"must be >= 1, got {c.checkpoint.every}")


# ---------------------------------------------------------------------------------------------
# Optimizer and microbatch gradients.


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """AdamW with global-norm clipping behind the microbatch accumulator of `c.algorithm`."""
  # The learning rate lives in the optimizer state (inject_hyperparams), not in the compiled
  # program, so runs that differ only in lr or seed share one compilation (see `_trainer_for`).
  inner = optax.chain(optax.clip_by_global_norm(c.optim.max_grad_norm),
                      optax.inject_hyperparams(optax.adamw)(
                          learning_rate=c.optim.lr, b1=c.optim.b1, b2=c.optim.b2,
                          weight_decay=c.optim.weight_decay))
  m, p = c.train.num_microbatches, c.proma
  # Local data-parallel mode: the transform runs per device inside shard_map and sums over "data".
  axis = dict(axis_name=mesh_lib.DATA_AXIS) if _local_mode(c) else {}
  accumulation = dict(shrinkage=p.shrinkage, ridge=p.ridge, relative_bound=p.relative_bound,
                      skip_fraction=p.skip_fraction, solver=p.solver)
  intra = dict(rank=p.rank, power_iters=p.power_iters, seed=p.range_finder_seed)
  if c.algorithm == "proma":
    return proma_jax.proma_accumulation(inner, m, **accumulation, **axis)
  if c.algorithm == "proma_intra":
    return proma_jax.proma_intra(inner, m, shrinkage=p.intra_shrinkage, **intra, **axis)
  if c.algorithm == "proma_both":
    return proma_jax.proma_both(inner, m, intra_shrinkage=p.intra_shrinkage, **intra,
                                **accumulation, **axis)
  # Baselines: the same accumulator with no sequence statistics is plain gradient accumulation.
  return proma_jax.proma_accumulation(inner, m, shrinkage=0.0, **axis)


def _local_mode(c: ml_collections.ConfigDict) -> bool:
  return c.mesh.data > 1 and c.mesh.mode == "local"


def _is_dense_kernel(path) -> bool:
  return jax.tree_util.keystr(path).endswith("['kernel']")


def make_microbatch_update(c: ml_collections.ConfigDict, policy: policy_lib.Policy,
                           tx: optax.GradientTransformationExtraArgs, mesh=None):
  """The jitted (params, opt_state, microbatch, num_tokens) -> (params, opt_state, metrics).

  With a mesh, jitted on it (`mesh_lib.data_parallel`): the microbatch sharded over "data", the
  rest replicated; in local mode each device's metrics (sums over its tokens) are psum-ed.
  """
  algorithm = c.algorithm
  if algorithm == "grpo":
    policy_loss = losses.get_policy_loss("grpo", eps_low=c.grpo.eps_low, eps_high=c.grpo.eps_high,
                                         dual_clip=c.grpo.dual_clip)
  else:
    policy_loss = losses.get_policy_loss("reinforce")

  def response_logp(model, mb):
    return policy_lib.response_logprobs(policy, model, mb["tokens"], mb["valid"])[0]

  def loss_of_logp(logp, mb, num_tokens):
    return policy_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], num_tokens)

  def loss_on_model(model, mb, num_tokens):
    return loss_of_logp(response_logp(model, mb), mb, num_tokens)

  def objectives_of_logp(logp, mb, num_tokens):  # f_i, advantage-free (DESIGN section 2)
    return losses.sequence_ratio(logp, mb["old_logp"], mb["mask"], num_tokens)

  def objectives_and_metrics(model, mb, num_tokens):  # f_i and the loss's metrics, one forward
    logp = response_logp(model, mb)
    return objectives_of_logp(logp, mb, num_tokens), loss_of_logp(logp, mb, num_tokens)[1]

  def sequence_grads(params, mb, num_tokens):
    def f_i(params, seq):
      one = jax.tree.map(lambda x: x[None], seq)
      model = policy_lib.bind(policy, params)
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

  def update(params, opt_state, mb, num_tokens):
    extra, metrics = {}, {}
    if algorithm in ("reinforce", "grpo"):
      (loss, metrics), grads = jax.value_and_grad(
          lambda p: loss_on_model(policy_lib.bind(policy, p), mb, num_tokens), has_aux=True)(params)
    elif algorithm == "proma":
      loss, grads, extra["seq_grads"] = sequence_grads(params, mb, num_tokens)
    elif algorithm == "proma_intra":
      loss, metrics, grads, extra["factors"] = factor_grads(params, mb, num_tokens)
    else:  # proma_both: gradient, factors and dense S_i from one pass, other leaves' S_i by vmap
      (loss, metrics), grads, extra["seq_grads"], extra["factors"] = (
          proma_jax.policy_gradient_and_sequence_statistics(
              lambda m, b: objectives_and_metrics(m, b, num_tokens), policy_lib.bind(policy, params),
              mb, mb["advantages"], token_mask=mb["valid"], has_aux=True, scope=c.proma.scope))
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
    return params, opt_state, dict(metrics, **{"loss": loss})

  def update_local(params, opt_state, mb, num_tokens):
    params, opt_state, metrics = update(params, opt_state, mb, num_tokens)
    return params, opt_state, jax.lax.psum(metrics, mesh_lib.DATA_AXIS)

  if mesh is None:
    return jax.jit(update)
  return mesh_lib.data_parallel(update_local if _local_mode(c) else update, mesh, c.mesh.mode)


# ---------------------------------------------------------------------------------------------
# One RL step.


def step_examples(c: ml_collections.ConfigDict, policy: policy_lib.Policy, step: int, seed: int):
  """The step's prompts, each repeated group_size times (a deterministic function of seed, step)."""
  prompts = policy.task.train_examples(c.rollout.prompts_per_step, seed=seed * 1_000_003 + step)
  return [ex for ex in prompts for _ in range(c.rollout.group_size)]


def _slice(tree: dict, idx: np.ndarray) -> dict:
  return {k: v[idx] for k, v in tree.items()}


class Trainer:
  """The compiled functions of a config; `step` advances params and opt_state by one RL step.

  Nothing compiled depends on `c.seed` or `c.optim.lr` (both arrive at run time), so one Trainer
  serves every seed and learning rate of an otherwise identical config.
  """

  def __init__(self, c: ml_collections.ConfigDict, policy: policy_lib.Policy, init_params: dict):
    validate_config(c)
    self.mesh = mesh_lib.data_mesh(c.mesh.data) if c.mesh.data > 1 else None
    self.c, self.policy, self.init_params = c, policy, self.replicate(init_params)
    self.tx = make_optimizer(c)
    self.microbatch_update = make_microbatch_update(c, policy, self.tx, self.mesh)
    self.stats = jax.jit(lambda params, tokens, valid: policy_lib.response_logprobs(
        policy, policy_lib.bind(policy, params), tokens, valid))
    self.val_examples = policy.task.val_examples(c.eval.num_examples, seed=c.eval.seed)

  def evaluate(self, params: dict) -> float:
    return policy_lib.greedy_accuracy(self.policy, params, self.val_examples)

  def init_opt_state(self, params: dict, lr: float):
    return self.replicate(
        optax.tree.set(self.tx.init(params), learning_rate=jnp.asarray(lr, jnp.float32)))

  def replicate(self, tree):
    """`tree` replicated on the mesh (unchanged without one)."""
    return tree if self.mesh is None else mesh_lib.replicate(tree, self.mesh)

  def shard(self, microbatch: dict) -> dict:
    """A microbatch's sequences sharded over the mesh, this process feeding its own rows."""
    return microbatch if self.mesh is None else mesh_lib.shard_sequences(microbatch, self.mesh)

  def step(self, params: dict, opt_state, step: int, seed: int):
    c, policy = self.c, self.policy
    t0 = time.perf_counter()
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    examples = step_examples(c, policy, step, seed)
    rollout = policy_lib.generate(policy, params, examples, key, temperature=c.rollout.temperature)
    rewards = policy_lib.rewards(policy, rollout, examples)
    advantages = losses.group_advantages(jnp.asarray(rewards), c.rollout.group_size)
    batch = {"tokens": rollout.tokens_BxT, "valid": rollout.valid_BxT,
             "mask": rollout.response_mask_BxL, "old_logp": rollout.logprobs_BxL,
             "advantages": advantages}
    jax.block_until_ready(batch)
    t1 = time.perf_counter()

    logp_init, _ = self.stats(self.init_params, batch["tokens"], batch["valid"])
    kl_init = losses.kl_step(batch["old_logp"], logp_init, batch["mask"])
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), len(examples)))
    minibatches = np.split(order, c.train.num_minibatches)
    sums: dict[str, list] = {}
    for mb_idx in minibatches:
      mb = _slice(batch, mb_idx)
      num_tokens = self.replicate(jnp.maximum(jnp.sum(mb["mask"]), 1.0))
      logp_before, entropy = self.stats(params, mb["tokens"], mb["valid"])
      step_metrics: dict[str, Any] = {}
      for micro_idx in np.split(np.arange(len(mb_idx)), c.train.num_microbatches):
        params, opt_state, micro_metrics = self.microbatch_update(
            params, opt_state, self.shard(_slice(mb, micro_idx)), num_tokens)
        for k, v in micro_metrics.items():
          step_metrics[k] = step_metrics.get(k, 0.0) + v
      logp_after, _ = self.stats(params, mb["tokens"], mb["valid"])
      step_metrics["kl/step"] = losses.kl_step(logp_before, logp_after, mb["mask"])
      step_metrics["kl/step_k3"] = losses.kl_step_k3(logp_before, logp_after, mb["mask"])
      step_metrics["entropy"] = losses.masked_mean(entropy, mb["mask"])
      for k, v in dict(step_metrics, **_transform_metrics(c.algorithm, opt_state)).items():
        sums.setdefault(k, []).append(v)
    jax.block_until_ready(params)
    t2 = time.perf_counter()

    metrics = {k: float(np.mean([float(x) for x in v])) for k, v in sums.items()}
    metrics["kl/step_max"] = float(np.max([float(x) for x in sums["kl/step"]]))
    metrics.update({
        "reward/mean": float(np.mean(rewards)),
        "kl/init": float(kl_init),
        "response/length": float(jnp.mean(jnp.sum(batch["mask"], axis=1))),
        "time/sample_s": t1 - t0, "time/update_s": t2 - t1, "time/step_s": t2 - t0,
    })
    return params, opt_state, metrics


def _transform_metrics(algorithm: str, opt_state) -> dict:
  """grad/norm for every algorithm; the scalar proma/* metrics for the PROMA variants."""
  metrics = proma_jax.proma_metrics(opt_state)
  keep = ["grad/norm"] + ([k for k in metrics if k.count("/") == 1 and k.startswith("proma/")]
                          if algorithm.startswith("proma") else [])
  return {k: metrics[k] for k in keep}


# ---------------------------------------------------------------------------------------------
# The run: warm start, resume, loop, metrics, checkpoints, signals.


class _StopRequested:
  """Turns SIGINT/SIGTERM into a flag the loop checks after each step (then saves and exits)."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None:  # a second signal: stop now
      raise KeyboardInterrupt
    self.signal = signum
    print(f"\nreceived signal {signum}: finishing this step, then checkpointing and exiting",
          flush=True)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _to_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


_RUNTIME_FIELDS = ("seed", "steps", "optim.lr", "checkpoint")
_TRAINERS: dict[str, tuple[Trainer, dict]] = {}


def _trainer_for(c: ml_collections.ConfigDict) -> tuple[Trainer, dict]:
  """(Trainer, warm-start summary), reused within the process for configs that differ only in
  seed, steps, learning rate or checkpointing (a sweep compiles once per task and algorithm)."""
  static = _to_json(c)
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


def run(c: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> list[dict]:
  """Trains `c.steps` RL steps in `workdir`, resuming from its latest checkpoint. Returns the
  metrics records written by this call (one per step, plus the step-0 validation record).

  In a multi-process run (c.distributed) every process calls this; only process 0 writes
  run.json and metrics.jsonl, and checkpoints are saved collectively (orbax writes from process 0).
  """
  validate_config(c)
  mesh_lib.initialize_distributed(c.distributed.num_processes, c.distributed.process_id,
                                  c.distributed.coordinator)
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  trainer, warm_summary = _trainer_for(c)
  warm_params = trainer.init_params
  meta = {"algorithm": c.algorithm, "task": c.task, "lr": c.optim.lr, "seed": c.seed,
          "warm_start": warm_summary, "config": _to_json(c)}
  if lead:
    with open(os.path.join(workdir, "run.json"), "w") as f:
      json.dump(meta, f, indent=1)

  params, opt_state, start = warm_params, trainer.init_opt_state(warm_params, c.optim.lr), 0
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), c.checkpoint.max_to_keep)
  restored = checkpointer.restore({"params": params, "opt_state": opt_state})
  if restored is not None:
    start, state, _ = restored
    params, opt_state = trainer.replicate((state["params"], state["opt_state"]))
    print(f"resuming {workdir} from step {start}")

  records = []
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  with (open(metrics_path, "a") if lead else contextlib.nullcontext()) as log, \
      _StopRequested() as stop:

    def write(record):
      records.append(record)
      if lead:
        log.write(json.dumps(record) + "\n")
        log.flush()

    if start == 0:
      write({"step": 0, "val/accuracy": trainer.evaluate(params)})
    bar = tqdm.tqdm(range(start, c.steps), initial=start, total=c.steps, file=sys.stdout,
                    desc=f"{c.task}/{c.algorithm}", disable=not (progress and lead),
                    mininterval=1.0)
    last_val = None
    step = start
    for step in bar:
      params, opt_state, metrics = trainer.step(params, opt_state, step, c.seed)
      done = step + 1
      if done % c.eval.every == 0 or done == c.steps:
        last_val = metrics["val/accuracy"] = trainer.evaluate(params)
      write(dict(step=done, **metrics))
      bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", kl=f"{metrics['kl/step']:.1e}",
                      val="-" if last_val is None else f"{last_val:.2f}")
      if done % c.checkpoint.every == 0 or done == c.steps or stop.signal is not None:
        checkpointer.save(done, {"params": params, "opt_state": opt_state}, {"step": done})
      if stop.signal is not None:
        checkpointer.close()
        print(f"stopped at step {done}; rerun the same command to resume")
        sys.exit(128 + stop.signal)
  checkpointer.close()
  return records


def main():
  config = config_flags.DEFINE_config_file(
      "config", None, "Experiment config (configs/<task>.py:<algorithm>).")
  workdir = flags.DEFINE_string("workdir", None, "Run directory: metrics.jsonl, run.json, checkpoints/.")
  flags.mark_flags_as_required(["config", "workdir"])
  def _main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # keep orbax's per-save INFO lines off the console
    run(config.value, workdir.value)

  app.run(_main)


if __name__ == "__main__":
  main()
