"""The paper's comparison at CPU scale: algorithms x learning rates x seeds x tasks.

  python experiments/sweep.py --out runs/sweep                  # the full grid, in the background:
  nohup python experiments/sweep.py --out runs/sweep > runs/sweep.log 2>&1 &
  python experiments/report.py runs/sweep --out results         # table, CSV and figures

Every run starts from its task's shared warm start and uses the same rollouts budget and number
of optimizer steps. Runs are grouped by (task, algorithm) and each group runs in one worker
process, so the jitted step compiles once per group: learning rate and seed are run-time inputs
(`train._trainer_for`). Interrupting the sweep loses at most the runs in flight since their last
checkpoint: rerunning skips finished runs (a `DONE` file) and resumes the others.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import multiprocessing as mp
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config_schema():
  """proma_jax/config.py alone: importing the proma_jax package would import JAX before the
  workers set their XLA_FLAGS."""
  spec = importlib.util.spec_from_file_location("proma_config", os.path.join(REPO, "proma_jax",
                                                                            "config.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ALGORITHMS = _load_config_schema().ALGORITHMS
# Relative cost of a step, for scheduling the slowest groups first.
COST = {"proma_both": 4, "proma_intra": 2.5, "proma": 1.2, "reinforce": 1, "grpo": 1}


def run_dir(out: str, task: str, algorithm: str, lr: float, seed: int) -> str:
  return os.path.join(out, task, algorithm, f"lr{lr:g}_seed{seed}")


def make_config(task: str, algorithm: str, lr: float, seed: int, steps: int,
                overrides: list[str]):
  sys.path.insert(0, os.path.join(REPO, "configs"))
  module = __import__(task)
  c = module.get_config(algorithm)
  c.optim.lr, c.seed, c.steps = lr, seed, steps
  c.sft.checkpoint_dir = os.path.join(REPO, c.sft.checkpoint_dir)
  c.eval.every = max(1, steps // 6)
  c.checkpoint.every = max(1, steps // 3)
  for item in overrides:
    field, _, value = item.partition("=")
    *parents, leaf = field.split(".")
    node = c
    for parent in parents:
      node = node[parent]
    node[leaf] = json.loads(value)
  return c


def _worker(args):
  """Runs every (lr, seed) of one (task, algorithm) in this process, sequentially."""
  group, cells, out, steps, overrides = args
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
  from absl import logging

  from proma_jax import train
  logging.set_verbosity(logging.WARNING)
  task, algorithm = group
  for lr, seed in cells:
    directory = run_dir(out, task, algorithm, lr, seed)
    if os.path.exists(os.path.join(directory, "DONE")):
      continue
    config = make_config(task, algorithm, lr, seed, steps, overrides)
    start = time.perf_counter()
    train.run(config, directory, progress=False)
    with open(os.path.join(directory, "DONE"), "w") as f:
      json.dump({"wall_s": time.perf_counter() - start}, f)
  return group


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--out", default="runs/sweep")
  parser.add_argument("--tasks", default="reverse,arith")
  parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
  parser.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--override", action="append", default=[],
                      help="config field=JSON value applied to every run, e.g. model.d_model=32")
  args = parser.parse_args(argv)
  tasks = args.tasks.split(",")
  algorithms = args.algorithms.split(",")
  lrs = [float(x) for x in args.lrs.split(",")]
  seeds = [int(x) for x in args.seeds.split(",")]
  cells = list(itertools.product(lrs, seeds))
  groups = sorted(itertools.product(tasks, algorithms), key=lambda g: -COST.get(g[1], 1))
  total = len(groups) * len(cells)

  # Warm starts first, in this process, so workers never race to create the same one.
  from absl import logging

  from proma_jax import sft
  logging.set_verbosity(logging.WARNING)
  for task in tasks:
    sft.load_or_train(make_config(task, algorithms[0], lrs[0], seeds[0], args.steps, args.override))

  def finished() -> int:
    return sum(os.path.exists(os.path.join(run_dir(args.out, t, a, lr, s), "DONE"))
               for (t, a), (lr, s) in itertools.product(groups, cells))

  import tqdm
  start = time.perf_counter()
  bar = tqdm.tqdm(total=total, initial=finished(), desc="sweep runs", file=sys.stdout)
  jobs = [(g, cells, args.out, args.steps, args.override) for g in groups]
  with mp.get_context("spawn").Pool(args.workers) as pool:
    pending = pool.map_async(_worker, jobs)
    while not pending.ready():
      pending.wait(5)
      bar.update(finished() - bar.n)
    pending.get()  # re-raises a worker's exception
  bar.update(finished() - bar.n)
  bar.close()
  print(f"sweep: {finished()}/{total} runs done in {time.perf_counter() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
  main()
