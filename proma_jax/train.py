"""The RL run and its command line: `run` trains a config's steps in a workdir, resuming it.

Each RL step is rollout -> advantages -> minibatches -> microbatches -> transform -> optimizer
(`proma_jax.trainer.Trainer.step`), one code path for every algorithm; `proma_jax.algorithms.TABLE`
holds what differs between reinforce, grpo, proma, proma_intra and proma_both. This module keeps
the run around the steps: resume, metrics, evaluation, checkpoints and signals.

  python -m proma_jax.train --config=configs/arith.py:proma --workdir=runs/arith_proma \
      --config.steps=50 --config.optim.lr=3e-4

Rerunning the same command resumes from the latest checkpoint in --workdir, with metrics.jsonl cut
back to that checkpoint's step (rows logged after it, and a line cut short by a kill, are dropped and
recomputed). The resumed config must equal the one in <workdir>/run.json except for the run-time
fields RESUMABLE_FIELDS (steps, checkpoint.every, checkpoint.max_to_keep, eval.every,
sft.checkpoint_dir, distributed.coordinator, distributed.process_id, logging, and the mesh shape
mesh.data / mesh.fsdp / mesh.fsdp_min_size, except mesh.data in local mode); any other difference
is refused with every differing field named, unless --allow_config_change (recorded in run.json under
"config_changes"). A run holds an exclusive lock on <workdir>/.lock: a second run on the same
workdir fails at once, naming the holder's pid.

Data parallelism (`proma_jax.mesh`): --config.mesh.data=D shards each microbatch's sequences over a
("data",) mesh of D devices with params replicated; --config.mesh.mode=exact (the single-device
result; the compiler inserts the collectives) or local (shard_map: each device projects against its
own sequences, one psum per microbatch). --config.mesh.fsdp=F adds an "fsdp" axis (D x F devices,
exact mode): params, optimizer state and the accumulator sharded over it ZeRO-3 style
(`mesh.param_specs`). Multi-process: start the same command N times with
--config.distributed.num_processes=N --config.distributed.process_id=i
--config.distributed.coordinator=127.0.0.1:PORT, with D x F = the total device count; each
process computes the rollout, feeds its own rows of every microbatch, and process 0 writes the
metrics (checkpoints are saved collectively through orbax, each process writing its shards).
Rollouts, log-prob statistics and evaluation run on the mesh with the params as they are placed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

import jax
import ml_collections
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

from proma_jax import cli, run_records, writers
from proma_jax import mesh as mesh_lib
from proma_jax import trainer as trainer_lib
from proma_jax.checkpoint import Checkpointer
from proma_jax.config import to_json, validate_config
from proma_jax.models import stacked as stacked_lib
from proma_jax.models.loading import checkpoint_fingerprint
from proma_jax.run_records import RESUMABLE_FIELDS, ConfigChangedError, WorkdirLockedError

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


def run(c: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
        allow_config_change: bool = False) -> list[dict]:
  """Trains `c.steps` RL steps in `workdir`, resuming from its latest checkpoint. Returns the
  metrics records written by this call (one per step, plus the step-0 validation record).

  Resuming: a workdir holding run.json is resumed only under the same config, up to
  RESUMABLE_FIELDS (steps, checkpoint.every, checkpoint.max_to_keep, eval.every,
  sft.checkpoint_dir, distributed.coordinator, distributed.process_id, logging, the mesh shape
  except mesh.data in local mode: checkpoints restore onto any mesh); any other
  difference raises ConfigChangedError naming every differing field, unless `allow_config_change` (then
  run.json takes the new config and lists the change under "config_changes"). metrics.jsonl is
  cut back to the restored checkpoint's step first (to nothing without one), so a run killed at
  any point and resumed leaves the file an uninterrupted run would have written. run.json is
  (re)written, atomically, only once these checks and the restore have passed.

  The run holds an exclusive lock on `<workdir>/.lock` for its lifetime; a second run on the same
  workdir raises WorkdirLockedError at once, naming the holder's pid.

  In a multi-process run (c.distributed) every process calls this; only process 0 takes the lock
  and writes run.json and metrics.jsonl, and checkpoints are saved collectively (orbax: each
  process writes its devices' shards). Every process checks the config against run.json, so all
  refuse together.
  """
  validate_config(c)
  os.makedirs(workdir, exist_ok=True)
  lead = c.distributed.process_id == 0  # == jax.process_index() once distributed is initialised
  with run_records.workdir_lock(workdir) if lead else contextlib.nullcontext():
    return _run(c, workdir, progress=progress, allow_config_change=allow_config_change)


def _run(c: ml_collections.ConfigDict, workdir: str, *, progress: bool,
         allow_config_change: bool) -> list[dict]:
  """`run` once the workdir is locked: resume checks, restore, run records, then the steps."""
  config = to_json(c)
  previous, changes = run_records.check_resume_config(workdir, config, allow_config_change)
  fingerprint = checkpoint_fingerprint(c.model.checkpoint) if c.model.checkpoint else None
  changes.update(run_records.check_checkpoint_fingerprint(workdir, previous, fingerprint,
                                                         allow_config_change))
  mesh_lib.initialize_distributed(c.distributed.num_processes, c.distributed.process_id,
                                  c.distributed.coordinator)
  lead = jax.process_index() == 0
  trainer, warm_summary = trainer_lib.trainer_for(c)
  params, opt_state, restored, checkpointer = _restore(trainer, c, workdir)
  start = 0 if restored is None else restored

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if lead:
    dropped = run_records.truncate_metrics(metrics_path, restored)
    if dropped:
      print(f"{metrics_path}: dropped {dropped} line(s) logged after the restored step {start}")
    if start == 0 or start < c.steps:  # the run starts or extends: record what it runs
      meta = {"algorithm": c.algorithm, "task": c.task, "lr": c.optim.lr, "seed": c.seed,
              "warm_start": warm_summary, "config": config}
      run_records.write_run_json(workdir, meta, previous, changes, start, fingerprint)

  records = []
  sinks = (writers.make_writers(c.logging, workdir, start_step=start,
                                run_name=os.path.basename(os.path.abspath(workdir)),
                                config_dict=config)
           if lead else writers.MultiWriter([]))
  with (open(metrics_path, "a") if lead else contextlib.nullcontext()) as log, \
      _StopRequested() as stop, sinks:

    def write(record):
      records.append(record)
      if lead:
        log.write(json.dumps(record) + "\n")
        log.flush()
        sinks.write(record["step"], {k: v for k, v in record.items() if k != "step"})

    if start == 0:
      write({"step": 0, **trainer.evaluate(params)})
    _train_steps(c, trainer, checkpointer, (params, opt_state), start, write, stop,
                 progress=progress and lead)
  checkpointer.close()
  return records


def _restore(trainer: trainer_lib.Trainer, c: ml_collections.ConfigDict, workdir: str):
  """(params, opt_state, the restored step or None, the checkpointer): the latest checkpoint's
  state in `workdir` placed on the trainer's mesh, else fresh params and optimizer state."""
  params = trainer.fresh_params()
  opt_state = trainer.init_opt_state(params, c.optim.lr)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), c.checkpoint.max_to_keep)
  # A run saved with the other layer layout (model.scan_layers) restores too.
  restored = stacked_lib.restore_either_layout(checkpointer,
                                               {"params": params, "opt_state": opt_state})
  if restored is None:
    return params, opt_state, None, checkpointer
  start, state, _ = restored
  params, opt_state = trainer.place((state["params"], state["opt_state"]))
  print(f"resuming {workdir} from step {start}")
  return params, opt_state, start, checkpointer


def _train_steps(c: ml_collections.ConfigDict, trainer: trainer_lib.Trainer, checkpointer,
                 state: tuple, start: int, write, stop: _StopRequested, *, progress: bool):
  """Steps `start`..c.steps from `state` = (params, opt_state): each step's metrics written
  (with the evaluation every eval.every steps and at the end), a checkpoint every
  checkpoint.every steps, at the end, and after a signal, which then exits."""
  params, opt_state = state
  bar = tqdm.tqdm(range(start, c.steps), initial=start, total=c.steps, file=sys.stdout,
                  desc=f"{c.task}/{c.algorithm}", disable=not progress, mininterval=1.0)
  last_val = None
  for step in bar:
    params, opt_state, metrics = trainer.step(params, opt_state, step, c.seed)
    done = step + 1
    if done % c.eval.every == 0 or done == c.steps:
      metrics.update(trainer.evaluate(params))
      last_val = metrics["val/accuracy"]
    write(dict(step=done, **metrics))
    bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", kl=f"{metrics['kl/step']:.1e}",
                    val="-" if last_val is None else f"{last_val:.2f}")
    if done % c.checkpoint.every == 0 or done == c.steps or stop.signal is not None:
      checkpointer.save(done, {"params": params, "opt_state": opt_state}, {"step": done})
    if stop.signal is not None:
      checkpointer.close()
      print(f"stopped at step {done}; rerun the same command to resume")
      sys.exit(128 + stop.signal)


def main():
  config = config_flags.DEFINE_config_file(
      "config", None, "Experiment config (configs/<task>.py:<algorithm>).")
  workdir = flags.DEFINE_string("workdir", None, "Run directory: metrics.jsonl, run.json, checkpoints/.")
  allow_config_change = flags.DEFINE_bool(
      "allow_config_change", False,
      "Resume a workdir whose run.json holds a config that differs in more than the fields that "
      f"may change on resume ({', '.join(RESUMABLE_FIELDS)}); run.json then takes the new config.")
  flags.mark_flags_as_required(["config", "workdir"])
  def _main(argv):
    cli.refuse_positional_arguments(argv)
    logging.set_verbosity(logging.WARNING)  # keep orbax's per-save INFO lines off the console
    with cli.expected_errors_as_messages(ConfigChangedError, WorkdirLockedError):
      run(config.value, workdir.value, allow_config_change=allow_config_change.value)

  app.run(_main)



if __name__ == "__main__":
  main()
