"""Where an RL step's time goes at the paper's batch shape, and the scanned optimizer step.

One RL step of `proma_jax.trainer.Trainer` at 64 prompts x 8 samples = 512 sequences, 2 minibatches
of 256 = 32 microbatches of 8 (the paper: minibatches of 512 in 64 microbatches of 8), on the
CPU-scale decoder of the sweep. For each algorithm, in one process:

  step      the whole RL step with train.scan_microbatches False (one compiled call per
            microbatch) and True (one lax.scan per optimizer step): median time/step_s and its
            split (sample, log-prob passes, update), and sequences per second.
  profile   one minibatch's update on the loop path taken apart: host slicing of the M
            microbatches, the M compiled calls (dispatched back to back, one wait at the end),
            the same M microbatches in ONE scanned call, and the per-step metrics
            (transform metrics, KL). Dispatch = M calls - one scanned call.
  compile   lower + compile seconds of the scanned step at M = 4 and M = 32 (must not grow with M).

  .venv/bin/python experiments/bench_rl_step.py --out results/bench_rl_step_cpu.jsonl
  .venv/bin/python experiments/bench_rl_step.py --quick      # 2 algorithms, 1 repeat
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs"))
from records import write_record  # noqa: E402

from proma_jax import losses, trainer as trainer_lib  # noqa: E402
from proma_jax.config import ALGORITHMS  # noqa: E402


def paper_config(task: str, algorithm: str, args, scan: bool, num_microbatches: int | None = None):
  c = __import__(task).get_config(algorithm)
  c.rollout.update(prompts_per_step=args.prompts, group_size=args.group)
  c.train.update(num_minibatches=args.minibatches,
                 num_microbatches=num_microbatches or args.microbatches, scan_microbatches=scan)
  return c


def copy(tree):
  return jax.block_until_ready(jax.tree.map(jnp.copy, tree))


def timed(fn, *a):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*a))
  return out, time.perf_counter() - start


def step_times(trainer, lr: float, repeats: int) -> dict:
  """Median time split of `repeats` RL steps (after one warm-up step, which compiles)."""
  params = trainer.fresh_params()
  opt_state = trainer.init_opt_state(params, lr)
  t = time.perf_counter()
  params, opt_state, _ = trainer.step(params, opt_state, 0, 0)
  first = time.perf_counter() - t
  rows = []
  for i in range(repeats):
    params, opt_state, metrics = trainer.step(params, opt_state, 1 + i, 0)
    rows.append(metrics)
  out = {k: statistics.median(r[f"time/{k}"] for r in rows)
         for k in ("step_s", "sample_s", "logprob_s", "update_s")}
  out["first_step_s"] = first
  return out


def profile_update(loop_trainer, scan_trainer, lr: float, repeats: int) -> dict:
  """One minibatch's update on the loop path, taken apart (medians over `repeats`)."""
  c = loop_trainer.c
  m = c.train.num_microbatches
  params = loop_trainer.fresh_params()
  opt_state = loop_trainer.init_opt_state(params, lr)
  batch, _, _ = loop_trainer.rollout(params, 0, 0, jax.random.PRNGKey(0))
  minibatch = trainer_lib.slice_rows(batch, np.arange(loop_trainer.minibatch_rows))._asdict()
  num_tokens = jnp.maximum(jnp.sum(minibatch["mask"]), 1.0)
  n = len(minibatch["tokens"])
  stacked = {k: v.reshape((m, -1) + v.shape[1:]) for k, v in minibatch.items()}
  rows = {k: [] for k in ("slice_s", "calls_s", "scan_s", "metrics_s")}
  for _ in range(repeats + 1):  # the first round compiles
    micro, t_slice = timed(lambda: [trainer_lib.slice_rows(minibatch, idx)
                                    for idx in np.split(np.arange(n), m)])
    p, o = copy(params), copy(opt_state)
    start = time.perf_counter()
    for mb in micro:
      p, o, metrics = loop_trainer.microbatch_update(p, o, mb, num_tokens)
    jax.block_until_ready((p, o, metrics))
    t_calls = time.perf_counter() - start
    _, t_metrics = timed(lambda: (trainer_lib.transform_metrics(c.algorithm, o),
                                  losses.kl_step(minibatch["old_logp"], minibatch["old_logp"],
                                                 minibatch["mask"]),
                                  losses.masked_mean(minibatch["old_logp"], minibatch["mask"])))
    p, o = copy(params), copy(opt_state)
    _, t_scan = timed(scan_trainer.minibatch_update, p, o, stacked, num_tokens)
    for k, v in (("slice_s", t_slice), ("calls_s", t_calls), ("scan_s", t_scan),
                 ("metrics_s", t_metrics)):
      rows[k].append(v)
  out = {k: statistics.median(v[1:]) for k, v in rows.items()}
  loop_total = out["slice_s"] + out["calls_s"] + out["metrics_s"]
  out["dispatch_s"] = max(out["calls_s"] - out["scan_s"], 0.0)
  out["overhead_frac"] = (out["dispatch_s"] + out["slice_s"] + out["metrics_s"]) / loop_total
  return out


def compile_seconds(task: str, algorithm: str, args, num_microbatches: int) -> float:
  c = paper_config(task, algorithm, args, True, num_microbatches)
  trainer, _ = trainer_lib.trainer_for(c)
  params = trainer.init_params
  opt_state = jax.eval_shape(lambda p: trainer.init_opt_state(p, 1e-3), params)
  minibatch = c.rollout.prompts_per_step * c.rollout.group_size // c.train.num_minibatches
  length = 16
  spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
  n = minibatch // num_microbatches
  stacked = {"tokens": spec(num_microbatches, n, 32, dtype=jnp.int32),
             "valid": spec(num_microbatches, n, 32, dtype=jnp.bool_),
             "mask": spec(num_microbatches, n, length), "old_logp": spec(num_microbatches, n, length),
             "advantages": spec(num_microbatches, n)}
  start = time.perf_counter()
  trainer.minibatch_update.lower(params, opt_state, stacked, spec()).compile()
  return time.perf_counter() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--task", default="reverse")
  parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
  parser.add_argument("--prompts", type=int, default=64)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--minibatches", type=int, default=2)
  parser.add_argument("--microbatches", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--lr", type=float, default=3e-4)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default=None, help="append one JSON line per algorithm")
  args = parser.parse_args(argv)
  algorithms = args.algorithms.split(",")
  if args.quick:
    algorithms, args.repeats = algorithms[:2], 1
  sequences = args.prompts * args.group
  machine = f"{jax.devices()[0].device_kind}, {os.cpu_count()} cpus"
  for algorithm in algorithms:
    loop, _ = trainer_lib.trainer_for(paper_config(args.task, algorithm, args, False))
    scan, _ = trainer_lib.trainer_for(paper_config(args.task, algorithm, args, True))
    times = {name: step_times(trainer, args.lr, args.repeats)
             for name, trainer in (("loop", loop), ("scan", scan))}
    record = {"bench": "rl_step", "task": args.task, "algorithm": algorithm, "machine": machine,
              "sequences": sequences, "minibatches": args.minibatches,
              "microbatches": args.microbatches, "repeats": args.repeats,
              "loop": times["loop"], "scan": times["scan"],
              "seq_per_s_loop": sequences / times["loop"]["step_s"],
              "seq_per_s_scan": sequences / times["scan"]["step_s"],
              "speedup": times["loop"]["step_s"] / times["scan"]["step_s"],
              "profile": profile_update(loop, scan, args.lr, args.repeats),
              "compile_s": {m: compile_seconds(args.task, algorithm, args, m)
                            for m in (4, args.microbatches)}}
    write_record(record, args.out)


if __name__ == "__main__":
  main()
