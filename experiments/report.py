"""Summary and figures of a sweep (experiments/sweep.py).

  python experiments/report.py runs/sweep --out results

Writes OUT/summary.csv (one row per run: task, algorithm, lr, seed, best and last validation
accuracy, mean and max kl/step, final kl/init, final entropy, wall time), and per task
OUT/val_vs_lr_<task>.png (best and last validation accuracy against learning rate, mean and
min-max over seeds) and OUT/curves_<task>.png (kl/step, kl/init and entropy over training, one
column per algorithm, one line per learning rate, mean over seeds). Prints a per-(task, algorithm,
lr) table of seed means.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from proma_jax import report  # noqa: E402
from proma_jax.config import ALGORITHMS as ALGORITHM_ORDER  # noqa: E402

COLORS = dict(zip(ALGORITHM_ORDER, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
CURVES = (("kl/step", "per-step KL", True), ("kl/init", "KL to initial policy", False),
          ("entropy", "entropy (nats/token)", False))


def find_runs(root: str) -> list[str]:
  return sorted(d for d, _, files in os.walk(root) if "run.json" in files and "metrics.jsonl" in files)


def _rank(algorithm: str) -> int:
  return ALGORITHM_ORDER.index(algorithm) if algorithm in ALGORITHM_ORDER else len(ALGORITHM_ORDER)


def _ordered(algorithms):
  return sorted(algorithms, key=_rank)


def plot_val_vs_lr(summaries: list[dict], task: str, path: str) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
  for ax, (field, title) in zip(axes, (("val_best", "best"), ("val_after", "last"))):
    by_alg = defaultdict(lambda: defaultdict(list))
    for s in summaries:
      if s["task"] == task and s[field] is not None:
        by_alg[s["algorithm"]][s["lr"]].append(s[field])
    for alg in _ordered(by_alg):
      lrs = sorted(by_alg[alg])
      vals = [np.asarray(by_alg[alg][lr]) for lr in lrs]
      mean = np.array([v.mean() for v in vals])
      ax.plot(lrs, mean, "o-", color=COLORS.get(alg), label=alg)
      ax.fill_between(lrs, [v.min() for v in vals], [v.max() for v in vals], color=COLORS.get(alg),
                      alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_title(f"{task}: {title} validation accuracy (mean, min-max over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("greedy accuracy")
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_curves(runs: list[dict], task: str, path: str) -> None:
  task_runs = [r for r in runs if r["meta"].get("task") == task]
  algorithms = _ordered({r["meta"]["algorithm"] for r in task_runs})
  lrs = sorted({r["meta"]["lr"] for r in task_runs})
  cmap = plt.get_cmap("viridis")
  fig, axes = plt.subplots(len(CURVES), len(algorithms), figsize=(3.2 * len(algorithms), 7.5),
                           sharey="row", squeeze=False)
  for j, alg in enumerate(algorithms):
    for i, (key, label, log) in enumerate(CURVES):
      ax = axes[i, j]
      for k, lr in enumerate(lrs):
        series = [report.metric_series(r, key) for r in task_runs
                  if r["meta"]["algorithm"] == alg and r["meta"]["lr"] == lr]
        series = [s for s in series if s[0]]
        if not series:
          continue
        n = min(len(s[0]) for s in series)
        steps = series[0][0][:n]
        mean = np.mean([s[1][:n] for s in series], axis=0)
        if log:
          mean = np.maximum(mean, 1e-6)
        ax.plot(steps, mean, color=cmap(k / max(1, len(lrs) - 1)), label=f"lr {lr:g}", lw=1.2)
      if log:
        ax.set_yscale("log")
      if i == 0:
        ax.set_title(alg)
      if j == 0:
        ax.set_ylabel(label)
      if i == len(CURVES) - 1:
        ax.set_xlabel("RL step")
      ax.grid(alpha=0.3)
  axes[0, -1].legend(fontsize=7)
  fig.suptitle(f"{task}: training curves, mean over seeds (kl/step floored at 1e-6 for the log scale)",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=60)
  plt.close(fig)


def seed_mean_table(summaries: list[dict]) -> str:
  cells = defaultdict(list)
  for s in summaries:
    cells[(s["task"], s["algorithm"], s["lr"])].append(s)
  fields = ("val_before", "val_best", "val_after", "kl_step_mean", "kl_step_max", "kl_init_final",
            "entropy_final")
  header = f"{'task':8} {'algorithm':12} {'lr':>7} {'n':>2} " + " ".join(f"{f:>13}" for f in fields)
  lines = [header, "-" * len(header)]
  for (task, alg, lr) in sorted(cells, key=lambda k: (k[0], _rank(k[1]), k[2])):
    rows = cells[(task, alg, lr)]
    means = []
    for f in fields:
      vals = [r[f] for r in rows if r[f] is not None]
      means.append(f"{np.mean(vals):13.4g}" if vals else f"{'-':>13}")
    lines.append(f"{task:8} {alg:12} {lr:7.0e} {len(rows):2d} " + " ".join(means))
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("root")
  parser.add_argument("--out", default="results")
  args = parser.parse_args(argv)
  runs = [report.load_run(d) for d in find_runs(args.root)]
  if not runs:
    raise SystemExit(f"no run directories (with run.json and metrics.jsonl) under {args.root}")
  summaries = [report.summarize_run(r) for r in runs]
  os.makedirs(args.out, exist_ok=True)
  report.write_summary_csv(summaries, os.path.join(args.out, "summary.csv"))
  for task in sorted({s["task"] for s in summaries}):
    plot_val_vs_lr(summaries, task, os.path.join(args.out, f"val_vs_lr_{task}.png"))
    plot_curves(runs, task, os.path.join(args.out, f"curves_{task}.png"))
  print(seed_mean_table(summaries))
  print(f"\n{len(runs)} runs -> {args.out}/summary.csv and figures")


if __name__ == "__main__":
  main()
