"""The main job: warm start, then short runs of every algorithm on the CPU, a table and plots.

  python -m proma_jax.demo --workdir=runs/demo        (or `make demo`)

Runs `configs/reverse_paper.py` (string reversal at the paper's batch shape: 512 sequences per RL
step, minibatches of 256 accumulated over 32 microbatches of 8, lr 1e-4, 30 steps) for each
algorithm from the same cached warm start, with the same rollouts, then prints the results table
(validation on the val split, longer strings than training, and on held-out draws of the training
distribution) and writes `<workdir>/curves.png` and `<workdir>/summary.csv`. Each run resumes if
interrupted (rerun the same command).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

from proma_jax import report, train
from proma_jax.config import ALGORITHMS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, algorithm: str):
  spec = importlib.util.spec_from_file_location("demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(algorithm)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--workdir", default="runs/demo")
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "reverse_paper.py"))
  parser.add_argument("--steps", type=int, default=None, help="default: the config's")
  parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
  args = parser.parse_args(argv)
  start = time.perf_counter()
  run_dirs = []
  for algorithm in args.algorithms.split(","):
    config = load_config(args.config, algorithm)
    config.steps = args.steps or config.steps
    config.sft.checkpoint_dir = os.path.join(REPO, config.sft.checkpoint_dir)
    run_dir = os.path.join(args.workdir, algorithm)
    print(f"\n=== {algorithm}: {config.steps} RL steps -> {run_dir}", flush=True)
    train.run(config, run_dir)
    run_dirs.append(run_dir)
  runs = [report.load_run(d) for d in run_dirs]
  summaries = [report.summarize_run(r) for r in runs]
  report.write_summary_csv(summaries, os.path.join(args.workdir, "summary.csv"))
  png = os.path.join(args.workdir, "curves.png")
  report.plot_runs(runs, png, title=f"{config.task}: PROMA vs GRPO vs REINFORCE ({config.steps} "
                   f"steps of {config.rollout.prompts_per_step * config.rollout.group_size} "
                   f"sequences, lr {config.optim.lr:g})")
  print("\n" + report.results_table(summaries))
  print(f"\nwrote {png} and {os.path.join(args.workdir, 'summary.csv')} "
        f"({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
  main()
