"""Report of the paper sweep (experiments/sweep.py --plan paper) from its run summaries.

  python experiments/report_paper.py results/paper/runs --out results/paper

Reads every `<task>/<shape>/<arm>/lr<lr>_seed<seed>.json` summary under ROOT (a sweep still
running is fine: what is there is reported, with the counts) and writes to OUT:

  runs.csv             one row per run (KL, entropy, reward and validation statistics, wall time)
  kl_ratios.csv        paired per-step KL ratios: per (task, shape, lr), arm / grpo (and proma /
                       reinforce) of kl_step_mean, per seed, geometric mean over seeds with a 95%
                       percentile bootstrap interval over seeds (10,000 resamples, fixed seed)
  frontier_<task>.png  matched-KL frontiers (shape paper): best / last val and val_id against the
                       seed-mean kl_step_mean, one line per arm through its learning rates
  curves_<task>.png    kl/step, entropy, kl/init and val over training (shape paper), one column
                       per learning rate, one line per arm, seed means
  report.md            the tables, also printed: run counts, KL ratios, the minibatch-size
                       controls, learning-rate robustness, GRPO clipping, seed means
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import warnings
from collections import defaultdict

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ARM_ORDER = ("reinforce", "grpo", "grpo_2ep", "grpo_4ep", "proma", "proma_rb0.5", "proma_intra",
             "proma_both")
COLORS = dict(zip(ARM_ORDER, ("tab:gray", "tab:orange", "tab:brown", "tab:olive", "tab:blue",
                              "tab:cyan", "tab:green", "tab:purple")))
SHAPE_ORDER = ("paper", "mb256_4x64", "mb32_4x8", "mb32_32x1", "base")
# shape -> (minibatch size in sequences, microbatches per minibatch, sequences per microbatch):
# experiments/sweep.py SHAPES and the config's own (base: 16 x 4 = 64 sequences, 2 minibatches).
SHAPE_CUT = {"paper": (256, 32, 8), "mb256_4x64": (256, 4, 64), "mb32_4x8": (32, 4, 8),
             "mb32_32x1": (32, 32, 1), "base": (32, 4, 8)}
CONTROL_SHAPES = ("paper", "mb256_4x64", "mb32_4x8", "mb32_32x1")
REFERENCE = "grpo"
N_BOOT = 10_000
BOOT_SEED = 0
CLIP_ACTS = 0.05  # seed-mean pg/clipfrac from which GRPO's clipping counts as acting
CURVE_ROWS = (("kl/step", "per-step KL", True), ("entropy", "entropy (nats/token)", False),
              ("kl/init", "KL to initial policy", False))
RUN_FIELDS = ("task", "shape", "arm", "algorithm", "lr", "seed", "steps_done", "kl_step_mean",
              "kl_step_max", "kl_init_last", "entropy_last", "clipfrac_mean", "reward_first",
              "reward_last", "val_0", "val_best", "val_last", "val_id_0", "val_id_best",
              "val_id_last", "wall_s")


# --- loading and per-run statistics -------------------------------------------------------------

def load_summaries(root: str) -> list[dict]:
  """Every run summary (`*.json`) under root; files that do not parse (a write cut short) are
  skipped with a note."""
  summaries = []
  for directory, _, files in sorted(os.walk(root)):
    for name in sorted(files):
      if not name.endswith(".json"):
        continue
      path = os.path.join(directory, name)
      try:
        with open(path) as f:
          s = json.load(f)
      except (OSError, ValueError) as e:
        print(f"report_paper: skipping {path}: {e}")
        continue
      if all(k in s for k in ("task", "shape", "arm", "lr", "seed")):
        summaries.append(s)
  return summaries


def _values(curve) -> np.ndarray:
  """The non-null values of a curve, as floats."""
  return np.array([v for v in (curve or []) if v is not None and math.isfinite(v)], dtype=float)


def _points(points: dict) -> list[tuple[int, float]]:
  """Validation points {"step": value} as (step, value) in step order, nulls dropped."""
  return sorted((int(k), float(v)) for k, v in (points or {}).items() if v is not None)


def run_row(s: dict) -> dict:
  """One run's statistics: kl_step_mean / kl_step_max are the mean / max over steps of kl/step,
  kl_init_last the last kl/init, entropy_last the mean of the last 3 steps' entropy, clipfrac_mean
  the mean of pg/clipfrac, reward_first / reward_last the first / last step's reward/mean; val_best
  is the max over the validation points, step 0 (the warm start) included."""
  curves = s.get("curves") or {}
  kl, kl_init, entropy, clip, reward = (_values(curves.get(k)) for k in (
      "kl/step", "kl/init", "entropy", "pg/clipfrac", "reward/mean"))
  row = {k: s.get(k) for k in ("task", "shape", "arm", "algorithm", "lr", "seed", "steps_done",
                              "wall_s")}
  row.update(
      kl_step_mean=float(kl.mean()) if kl.size else None,
      kl_step_max=float(kl.max()) if kl.size else None,
      kl_init_last=float(kl_init[-1]) if kl_init.size else None,
      entropy_last=float(entropy[-3:].mean()) if entropy.size else None,
      clipfrac_mean=float(clip.mean()) if clip.size else None,
      reward_first=float(reward[0]) if reward.size else None,
      reward_last=float(reward[-1]) if reward.size else None)
  for name in ("val", "val_id"):
    points = _points(s.get(name))
    values = [v for _, v in points]
    row[f"{name}_0"] = dict(points).get(0)
    row[f"{name}_best"] = max(values) if values else None
    row[f"{name}_last"] = values[-1] if values else None
  return row


def write_runs_csv(rows: list[dict], path: str) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=RUN_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for r in sorted(rows, key=_row_key):
      writer.writerow({k: "" if r.get(k) is None else r[k] for k in RUN_FIELDS})


# --- ordering and formatting --------------------------------------------------------------------

def _rank(value, order) -> tuple:
  return (order.index(value), "") if value in order else (len(order), str(value))


def _row_key(r: dict) -> tuple:
  return (r["task"], _rank(r["shape"], SHAPE_ORDER), _rank(r["arm"], ARM_ORDER), r["lr"], r["seed"])


def _ordered_arms(arms) -> list[str]:
  return sorted(set(arms), key=lambda a: _rank(a, ARM_ORDER))


def _color(arm: str):
  if arm in COLORS:
    return COLORS[arm]
  extra = ("tab:red", "tab:olive", "tab:pink", "black")
  return extra[sum(map(ord, arm)) % len(extra)]


def _fmt(x, digits: int = 3) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def md_table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _mean(values) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def _sem(values) -> float:
  """Standard error of the mean over seeds (0 for a single seed)."""
  values = [v for v in values if v is not None]
  return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def cells(rows: list[dict], keys=("task", "shape", "arm", "lr")) -> dict[tuple, list[dict]]:
  out = defaultdict(list)
  for r in rows:
    out[tuple(r[k] for k in keys)].append(r)
  return out


# --- paired KL ratios with a bootstrap over seeds -----------------------------------------------

def bootstrap_log_means(logs, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> np.ndarray:
  """Means of `logs` over n_boot resamples of its entries (seeds) with replacement."""
  logs = np.asarray(logs, dtype=float)
  rng = np.random.default_rng(seed)
  return logs[rng.integers(0, logs.size, size=(n_boot, logs.size))].mean(axis=1)


def geo_mean_ci(ratios, level: float = 0.95, n_boot: int = N_BOOT,
                seed: int = BOOT_SEED) -> tuple[float, float, float]:
  """Geometric mean of per-seed ratios and its percentile bootstrap interval over seeds."""
  logs = np.log(np.asarray(ratios, dtype=float))
  means = bootstrap_log_means(logs, n_boot, seed)
  tail = 100 * (1 - level) / 2
  lo, hi = np.percentile(means, [tail, 100 - tail])
  return float(np.exp(logs.mean())), float(np.exp(lo)), float(np.exp(hi))


def paired_ratios(cell_rows: list[dict], arm: str, reference: str) -> dict[int, float]:
  """seed -> kl_step_mean(arm) / kl_step_mean(reference) over the seeds both arms ran (with a
  positive KL) in one (task, shape, lr) cell."""
  by_arm = defaultdict(dict)
  for r in cell_rows:
    if r["kl_step_mean"] is not None and r["kl_step_mean"] > 0:
      by_arm[r["arm"]][r["seed"]] = r["kl_step_mean"]
  a, b = by_arm.get(arm, {}), by_arm.get(reference, {})
  return {seed: a[seed] / b[seed] for seed in sorted(set(a) & set(b))}


def kl_ratio_rows(rows: list[dict]) -> list[dict]:
  """Per (task, shape, lr): every arm against grpo, and proma against reinforce, where both arms
  have runs; cells with fewer than 2 paired seeds get no ratio (n<2)."""
  out = []
  by_cell = cells(rows, ("task", "shape", "lr"))
  for task, shape, lr in sorted(by_cell, key=lambda k: (k[0], _rank(k[1], SHAPE_ORDER), k[2])):
    cell_rows = by_cell[(task, shape, lr)]
    arms = _ordered_arms(r["arm"] for r in cell_rows)
    pairs = [(a, REFERENCE) for a in arms if a != REFERENCE and REFERENCE in arms]
    if "proma" in arms and "reinforce" in arms:
      pairs.append(("proma", "reinforce"))
    for arm, reference in pairs:
      ratios = paired_ratios(cell_rows, arm, reference)
      row = dict(task=task, shape=shape, lr=lr, arm=arm, reference=reference, n=len(ratios),
                 seeds=" ".join(map(str, ratios)), ratio=None, ci_lo=None, ci_hi=None)
      if len(ratios) >= 2:
        row["ratio"], row["ci_lo"], row["ci_hi"] = geo_mean_ci(list(ratios.values()))
      out.append(row)
  return out


def write_kl_ratios_csv(ratio_rows: list[dict], path: str) -> None:
  fields = ("task", "shape", "lr", "arm", "reference", "n", "seeds", "ratio", "ci_lo", "ci_hi")
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for r in ratio_rows:
      writer.writerow({k: "" if r[k] is None else r[k] for k in fields})


def _ratio_cell(r: dict | None) -> str:
  if r is None:
    return "-"
  if r["ratio"] is None:
    return f"n<2 (n={r['n']})"
  return f"{r['ratio']:.3f} [{r['ci_lo']:.3f}, {r['ci_hi']:.3f}] n={r['n']}"


def kl_ratio_table(ratio_rows: list[dict]) -> str:
  if not ratio_rows:
    return "No (task, shape, lr) cell has both an arm and its reference yet."
  table = [[r["task"], r["shape"], f"{r['lr']:g}", f"{r['arm']} / {r['reference']}", r["n"],
            "n<2" if r["ratio"] is None else f"{r['ratio']:.3f}",
            "-" if r["ratio"] is None else f"[{r['ci_lo']:.3f}, {r['ci_hi']:.3f}]"]
           for r in ratio_rows]
  return md_table(["task", "shape", "lr", "arm / reference", "n seeds", "geo-mean ratio",
                   "95% CI"], table)


def controls_table(ratio_rows: list[dict], task: str = "reverse") -> str:
  """proma / grpo per shape side by side, at the learning rates the control shapes ran."""
  controls = [s for s in CONTROL_SHAPES if s != "paper"]
  lrs = sorted({r["lr"] for r in ratio_rows if r["task"] == task and r["shape"] in controls
                and r["arm"] == "proma" and r["reference"] == REFERENCE})
  if not lrs:
    return f"No {task} control runs (shapes {', '.join(controls)}) with proma and grpo yet."
  found = {(r["shape"], r["lr"]): r for r in ratio_rows
           if r["task"] == task and r["arm"] == "proma" and r["reference"] == REFERENCE}
  header = ["lr"] + [f"{s}: minibatch {SHAPE_CUT[s][0]} = {SHAPE_CUT[s][1]} x {SHAPE_CUT[s][2]}"
                     for s in CONTROL_SHAPES]
  rows = [[f"{lr:g}"] + [_ratio_cell(found.get((s, lr))) for s in CONTROL_SHAPES] for lr in lrs]
  return md_table(header, rows)


# --- seed-mean tables ---------------------------------------------------------------------------

def counts_table(rows: list[dict]) -> str:
  by_cell = cells(rows, ("task", "shape", "arm"))
  table = []
  for key in sorted(by_cell, key=lambda k: (k[0], _rank(k[1], SHAPE_ORDER), _rank(k[2], ARM_ORDER))):
    runs = by_cell[key]
    per_lr = defaultdict(int)
    for r in runs:
      per_lr[r["lr"]] += 1
    table.append(list(key) + [len(runs), ", ".join(f"{lr:g}: {n}" for lr, n in sorted(per_lr.items()))])
  return md_table(["task", "shape", "arm", "runs", "seeds per lr"], table)


SEED_MEAN_FIELDS = (("kl_step_mean", "kl/step mean"), ("val_best", "best val"),
                    ("val_last", "last val"), ("val_id_best", "best val_id"),
                    ("val_id_last", "last val_id"), ("entropy_last", "entropy last"),
                    ("kl_init_last", "kl/init last"))


def seed_mean_table(rows: list[dict]) -> str:
  by_cell = cells(rows)
  table = []
  for key in sorted(by_cell, key=lambda k: (k[0], _rank(k[1], SHAPE_ORDER), _rank(k[2], ARM_ORDER),
                                           k[3])):
    runs = by_cell[key]
    table.append([key[0], key[1], key[2], f"{key[3]:g}", len(runs)]
                 + [_fmt(_mean(r[f] for r in runs)) for f, _ in SEED_MEAN_FIELDS])
  return md_table(["task", "shape", "arm", "lr", "n"] + [label for _, label in SEED_MEAN_FIELDS],
                  table)


def lr_robustness_rows(rows: list[dict]) -> list[dict]:
  """Per (task, shape, arm): the largest lr whose seed-mean last val is >= the seed-mean warm-start
  val (val at step 0), and the smallest lr whose seed-mean last val is below half of it."""
  out = []
  by_arm = cells(rows, ("task", "shape", "arm"))
  for key in sorted(by_arm, key=lambda k: (k[0], _rank(k[1], SHAPE_ORDER), _rank(k[2], ARM_ORDER))):
    by_lr = cells(by_arm[key], ("lr",))
    warm = _mean(r["val_0"] for r in by_arm[key])
    last = {lr: _mean(r["val_last"] for r in by_lr[(lr,)]) for (lr,) in by_lr}
    last = {lr: v for lr, v in sorted(last.items()) if v is not None}
    if warm is None or not last:
      continue
    holds = [lr for lr, v in last.items() if v >= warm - 1e-9]  # accuracies: k / n, rounding
    collapses = [lr for lr, v in last.items() if v < warm / 2]
    out.append(dict(task=key[0], shape=key[1], arm=key[2], warm=warm, last=last,
                    holds=max(holds) if holds else None,
                    collapse=min(collapses) if collapses else None))
  return out


def lr_robustness_table(robust: list[dict]) -> str:
  table = [[r["task"], r["shape"], r["arm"], f"{r['warm']:.3f}",
            ", ".join(f"{lr:g}: {v:.3f}" for lr, v in r["last"].items()),
            "none" if r["holds"] is None else f"{r['holds']:g}",
            "none" if r["collapse"] is None else f"{r['collapse']:g}"] for r in robust]
  return md_table(["task", "shape", "arm", "warm-start val", "last val per lr (seed mean)",
                   "largest lr with last val >= warm start", "smallest lr collapsing (< warm / 2)"],
                  table)


def clipping_table(rows: list[dict]) -> str:
  arms = ("grpo", "grpo_2ep", "grpo_4ep")
  by_cell = cells([r for r in rows if r["arm"] in arms], ("task", "shape", "lr"))
  if not by_cell:
    return "No grpo, grpo_2ep or grpo_4ep runs yet."
  table = []
  for key in sorted(by_cell, key=lambda k: (k[0], _rank(k[1], SHAPE_ORDER), k[2])):
    row = [key[0], key[1], f"{key[2]:g}"]
    for arm in arms:
      runs = [r for r in by_cell[key] if r["arm"] == arm]
      clip = _mean(r["clipfrac_mean"] for r in runs)
      row.append("-" if clip is None else
                 f"{clip:.4f}{' (acts)' if clip >= CLIP_ACTS else ''} n={len(runs)}")
    table.append(row)
  return md_table(["task", "shape", "lr", "grpo clipfrac", "grpo_2ep clipfrac",
                   "grpo_4ep clipfrac"], table)


# --- figures ------------------------------------------------------------------------------------

FRONTIER_PANELS = (("val_best", "best val (OOD)", "val_0"), ("val_last", "last val (OOD)", "val_0"),
                   ("val_id_best", "best val_id", "val_id_0"),
                   ("val_id_last", "last val_id", "val_id_0"))


def plot_frontier(rows: list[dict], task: str, path: str, shape: str = "paper") -> None:
  runs = [r for r in rows if r["task"] == task and r["shape"] == shape]
  lrs = sorted({r["lr"] for r in runs})
  size = {lr: 4 + 3 * i for i, lr in enumerate(lrs)}
  by_cell = cells(runs, ("arm", "lr"))
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  for ax, (field, label, warm_field) in zip(axes.flat, FRONTIER_PANELS):
    for arm in _ordered_arms(r["arm"] for r in runs):
      points = []
      for lr in lrs:
        cell = [r for r in by_cell.get((arm, lr), []) if r["kl_step_mean"] and r[field] is not None]
        if cell:
          kl = [r["kl_step_mean"] for r in cell]
          y = [r[field] for r in cell]
          points.append((np.mean(kl), _sem(kl), np.mean(y), _sem(y), lr))
      if not points:
        continue
      x, xe, y, ye, point_lrs = (np.array(v) for v in zip(*points))
      ax.plot(x, y, "-", color=_color(arm), lw=1.2, label=arm)
      ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="none", ecolor=_color(arm), alpha=0.5, lw=0.8)
      for xi, yi, lr in zip(x, y, point_lrs):
        ax.plot(xi, yi, "o", color=_color(arm), ms=size[lr], alpha=0.8)
    warm = _mean(r[warm_field] for r in runs)
    if warm is not None:
      ax.axhline(warm, color="black", ls="--", lw=0.8, label="warm start")
    ax.set_xscale("log")
    ax.set_xlabel("kl/step, mean over steps (seed mean)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7, loc="best")
  handles = [plt.Line2D([], [], marker="o", ls="", color="gray", ms=size[lr], label=f"lr {lr:g}")
             for lr in lrs]
  if handles:
    axes[0, 1].legend(handles=handles, fontsize=7, loc="best", title="marker size", title_fontsize=7)
  fig.suptitle(f"{task} ({shape} shape): accuracy against per-step KL, one point per lr; "
               "error bars: standard error over seeds", fontsize=10)
  fig.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.93, hspace=0.25, wspace=0.2)
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _mean_curve(series: list[np.ndarray]) -> np.ndarray:
  """Step-wise mean over seeds of the first n steps all series have, nulls (nan) skipped."""
  n = min(len(s) for s in series)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # a step null in every seed: nan
    return np.nanmean(np.stack([s[:n] for s in series]), axis=0)


def plot_curves(summaries: list[dict], task: str, path: str, shape: str = "paper") -> None:
  runs = [s for s in summaries if s["task"] == task and s["shape"] == shape]
  lrs = sorted({s["lr"] for s in runs})
  arms = _ordered_arms(s["arm"] for s in runs)
  n_rows = len(CURVE_ROWS) + 1
  fig, axes = plt.subplots(n_rows, max(1, len(lrs)), figsize=(3.4 * max(1, len(lrs)), 9.5),
                           sharey="row", squeeze=False)
  for j, lr in enumerate(lrs):
    for arm in arms:
      cell = [s for s in runs if s["arm"] == arm and s["lr"] == lr]
      for i, (key, _, log) in enumerate(CURVE_ROWS):
        series = [np.array([np.nan if v is None else v for v in s["curves"][key]], dtype=float)
                  for s in cell if (s.get("curves") or {}).get(key)]
        if not series:
          continue
        mean = _mean_curve(series)
        if log:
          mean = np.maximum(mean, 1e-6)
        axes[i, j].plot(np.arange(1, len(mean) + 1), mean, color=_color(arm), lw=1.1, label=arm)
      by_step = defaultdict(list)
      for s in cell:
        for step, v in _points(s.get("val")):
          by_step[step].append(v)
      if by_step:
        steps = sorted(by_step)
        axes[-1, j].plot(steps, [np.mean(by_step[k]) for k in steps], "o-", ms=3,
                         color=_color(arm), lw=1.1, label=arm)
    axes[0, j].set_title(f"lr {lr:g}")
    axes[-1, j].set_xlabel("RL step")
  for i, (_, label, log) in enumerate(CURVE_ROWS):
    axes[i, 0].set_ylabel(label)
    if log:
      for ax in axes[i]:
        ax.set_yscale("log")
  axes[-1, 0].set_ylabel("val accuracy (OOD)")
  for ax in axes.flat:
    ax.grid(alpha=0.3)
  axes[0, -1].legend(fontsize=7)
  fig.suptitle(f"{task} ({shape} shape): training curves, seed means (kl/step floored at 1e-6)",
               fontsize=10)
  fig.subplots_adjust(left=0.08, right=0.98, bottom=0.06, top=0.93, hspace=0.2, wspace=0.08)
  fig.savefig(path, dpi=70)
  plt.close(fig)


# --- the report ---------------------------------------------------------------------------------

def build_report(rows: list[dict], ratio_rows: list[dict]) -> str:
  tasks = sorted({r["task"] for r in rows})
  sections = [
      "# Paper sweep report",
      f"{len(rows)} runs: " + ", ".join(
          f"{t} {sum(r['task'] == t for r in rows)}" for t in tasks) + ".",
      "## Runs per task / shape / arm\n\n" + counts_table(rows),
      "## Paired per-step KL ratios\n\nPer (task, shape, lr, seed): kl_step_mean(arm) / "
      "kl_step_mean(reference), the mean over RL steps of kl/step; geometric mean over the seeds "
      f"both arms ran, 95% percentile bootstrap interval over seeds ({N_BOOT} resamples, numpy "
      f"seed {BOOT_SEED}). n<2: fewer than 2 paired seeds, no ratio.\n\n"
      + kl_ratio_table(ratio_rows),
      "## Controls: minibatch size against the number of microbatches (reverse)\n\n"
      "proma / grpo paired KL ratio (geometric mean [95% CI] n seeds) per shape. The four shapes "
      "cross minibatch size (256, 32) with microbatch count (32, 4): paper vs mb256_4x64 and "
      "mb32_32x1 vs mb32_4x8 change only the microbatch count; paper vs mb32_32x1 and mb256_4x64 "
      "vs mb32_4x8 change the minibatch size (and with it the rollout batch: 512 sequences per "
      "step against 64).\n\n" + controls_table(ratio_rows),
      "## Learning-rate robustness\n\nPer (task, shape, arm), from seed-mean last val accuracy "
      "(OOD) against the seed-mean warm-start val (step 0).\n\n"
      + lr_robustness_table(lr_robustness_rows(rows)),
      f"## GRPO clipping check\n\nSeed mean of the mean over steps of pg/clipfrac; (acts): >= "
      f"{CLIP_ACTS}.\n\n" + clipping_table(rows),
      "## Seed means per (task, shape, arm, lr)\n\n" + seed_mean_table(rows),
  ]
  return "\n\n".join(sections) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("root", help="the summaries directory of the sweep (--summaries)")
  parser.add_argument("--out", default="results/paper")
  args = parser.parse_args(argv)
  summaries = load_summaries(args.root)
  if not summaries:
    raise SystemExit(f"no run summaries (<task>/<shape>/<arm>/lr<lr>_seed<seed>.json) under "
                     f"{args.root}")
  rows = [run_row(s) for s in summaries]
  os.makedirs(args.out, exist_ok=True)
  write_runs_csv(rows, os.path.join(args.out, "runs.csv"))
  ratio_rows = kl_ratio_rows(rows)
  write_kl_ratios_csv(ratio_rows, os.path.join(args.out, "kl_ratios.csv"))
  figures = []
  for task in sorted({r["task"] for r in rows if r["shape"] == "paper"}):
    for name, plot, data in (("frontier", plot_frontier, rows), ("curves", plot_curves, summaries)):
      path = os.path.join(args.out, f"{name}_{task}.png")
      plot(data, task, path)
      figures.append(path)
  text = build_report(rows, ratio_rows)
  with open(os.path.join(args.out, "report.md"), "w") as f:
    f.write(text)
  print(text)
  print(f"{len(rows)} runs -> {args.out}/runs.csv, kl_ratios.csv, report.md"
        + (", " + ", ".join(os.path.basename(p) for p in figures) if figures else ""))


if __name__ == "__main__":
  main()
