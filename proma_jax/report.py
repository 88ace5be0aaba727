"""Results of finished runs: per-run summaries, a text table, a CSV and a figure of the curves.

A run directory holds
  run.json       {"algorithm", "task", "lr", "seed", ...}: what was run;
  metrics.jsonl  one JSON object per RL step with at least "step", and usually "reward/mean",
                 "kl/step", "kl/init", "entropy", "time/step_s", plus "val/accuracy" (the val
                 split) and "val_id/accuracy" (held-out draws of the train distribution) on
                 validation steps (step 0 holds the validation before training).
A resumed run appends the steps it repeats, so the LAST record of a step wins. A line that is not
valid JSON, or not an object with an integer "step", is skipped with a warning; so is (by `main`)
a directory without a readable run.json.

Command line:

  python -m proma_jax.report RUN_DIR [RUN_DIR ...] --out DIR

prints the results table and writes DIR/summary.csv and DIR/curves.png. An --out that cannot be
written (a full disk, a read-only or forbidden directory, a path through a regular file) exits
with one line `error: ...` naming the path.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
from typing import Any, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from proma_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

log = logging.getLogger(__name__)

Run = dict[str, Any]
Summary = dict[str, Any]

SUMMARY_FIELDS = (
    "run", "task", "algorithm", "lr", "seed",
    "val_before", "val_after", "val_best", "val_id_before", "val_id_after", "val_id_best",
    "kl_step_mean", "kl_step_max", "kl_init_final", "entropy_final",
    "reward_first", "reward_last", "steps", "wall_s",
)

# (metric key, panel title, y-axis label) of each panel of `plot_runs`.
CURVE_PANELS = (
    ("kl/step", "Per-step KL(pi_old || pi_new)", "kl/step"),
    ("val/accuracy", "Validation accuracy, val split (greedy)", "accuracy"),
    ("val_id/accuracy", "Held-out train-distribution accuracy (greedy)", "accuracy"),
    ("reward/mean", "Mean training reward", "reward"),
    ("entropy", "Policy entropy", "nats / token"),
    ("kl/init", "KL to the initial policy", "kl/init"),
)


def load_run(run_dir: str | os.PathLike) -> Run:
  """{"dir", "meta", "records"} of one run; records sorted by step, the last record of a step wins.

  A line of metrics.jsonl that is not UTF-8 or not valid JSON (e.g. cut short by a kill), or not a
  JSON object with an integer "step", is skipped with a warning. Raises ValueError if run.json is
  missing or is not a JSON object, or if metrics.jsonl exists but cannot be read (a directory, a
  forbidden file): `main` skips such a directory with a warning naming the file.
  """
  run_dir = os.fspath(run_dir)
  meta_path = os.path.join(run_dir, "run.json")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"{meta_path} does not exist: not a run directory") from None
  except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError included
    raise ValueError(f"{meta_path} cannot be read as JSON ({e})") from None
  if not isinstance(meta, dict):
    raise ValueError(f"{meta_path} holds a {type(meta).__name__}, not a JSON object")
  metrics_path = os.path.join(run_dir, "metrics.jsonl")
  try:
    by_step = _records_by_step(metrics_path) if os.path.exists(metrics_path) else {}
  except OSError as e:  # a directory, a forbidden file, an I/O error
    raise ValueError(f"{metrics_path} cannot be read ({e})") from None
  return {"dir": run_dir, "meta": meta, "records": [by_step[s] for s in sorted(by_step)]}


def _records_by_step(metrics_path: str) -> dict[int, dict[str, Any]]:
  """The records of a metrics.jsonl file by step (the last record of a step wins); see
  `load_run` for the lines skipped with a warning."""
  by_step: dict[int, dict[str, Any]] = {}
  with open(metrics_path, "rb") as f:  # decoded line by line: one bad byte costs one line
    for line_number, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        log.warning("%s:%d is not UTF-8 (%s); skipping it.", metrics_path, line_number, e)
        continue
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        log.warning("%s:%d is not valid JSON (%s); skipping it.", metrics_path, line_number, e)
        continue
      step = record.get("step") if isinstance(record, dict) else None
      if isinstance(step, float) and step.is_integer():
        step = int(step)
      if isinstance(step, bool) or not isinstance(step, int):
        log.warning("%s:%d has no integer \"step\" (got %r); skipping it.", metrics_path,
                    line_number, step)
        continue
      record["step"] = step
      by_step[step] = record
  return by_step


def metric_series(run: Run, key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the records of `run` that hold `key`, in step order. A value that is not a
  number (a string, a list, a bool) is skipped with a warning naming the run and the step."""
  pairs = []
  for r in run["records"]:
    value = r.get(key)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      log.warning("%s: step %d has a non-numeric %r value %r; skipping it.", run["dir"],
                  r["step"], key, value)
      continue
    pairs.append((r["step"], float(value)))
  return [s for s, _ in pairs], [v for _, v in pairs]


def _first(values: Sequence[float]) -> float | None:
  return values[0] if values else None


def _last(values: Sequence[float]) -> float | None:
  return values[-1] if values else None


def _mean(values: Sequence[float]) -> float | None:
  return math.fsum(values) / len(values) if values else None


def _max(values: Sequence[float]) -> float | None:
  """max(values), or NaN if any value is NaN (a diverged run must not look well-behaved)."""
  if not values:
    return None
  return math.nan if any(math.isnan(v) for v in values) else max(values)


def summarize_run(run: Run) -> Summary:
  """One row of results: what was run and the headline numbers of its curves.

  val_before / val_after / val_best are the first / last / best `val/accuracy` (val_id_*: of
  `val_id/accuracy`, the in-distribution held-out set); kl_step_mean and
  kl_step_max are over all RL steps; *_final and reward_last are the last logged values; steps
  counts the RL steps (records with `reward/mean`); wall_s sums `time/step_s`. A quantity the run
  never logged is None.
  """
  meta = run["meta"]
  val = metric_series(run, "val/accuracy")[1]
  val_id = metric_series(run, "val_id/accuracy")[1]
  kl_step = metric_series(run, "kl/step")[1]
  reward = metric_series(run, "reward/mean")[1]
  return {
      "run": os.path.basename(os.path.normpath(run["dir"])),
      "task": meta.get("task"),
      "algorithm": meta.get("algorithm"),
      "lr": meta.get("lr"),
      "seed": meta.get("seed"),
      "val_before": _first(val),
      "val_after": _last(val),
      "val_best": _max(val),
      "val_id_before": _first(val_id),
      "val_id_after": _last(val_id),
      "val_id_best": _max(val_id),
      "kl_step_mean": _mean(kl_step),
      "kl_step_max": _max(kl_step),
      "kl_init_final": _last(metric_series(run, "kl/init")[1]),
      "entropy_final": _last(metric_series(run, "entropy")[1]),
      "reward_first": _first(reward),
      "reward_last": _last(reward),
      "steps": len(reward),
      "wall_s": math.fsum(metric_series(run, "time/step_s")[1]),
  }


def _fmt(value: Any, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def results_table(summaries: Iterable[Summary]) -> str:
  """A fixed-width text table with one row per run (None shows as "-")."""
  columns = (  # (header, cell of a summary)
      ("task", lambda s: str(s["task"])),
      ("algorithm", lambda s: str(s["algorithm"])),
      ("lr", lambda s: _fmt(s["lr"], ".1e")),
      ("seed", lambda s: str(s["seed"])),
      ("val before -> after", lambda s: f"{_fmt(s['val_before'], '.3f')} -> "
                                        f"{_fmt(s['val_after'], '.3f')}"),
      ("val best", lambda s: _fmt(s["val_best"], ".3f")),
      ("val_id before -> after", lambda s: f"{_fmt(s['val_id_before'], '.3f')} -> "
                                           f"{_fmt(s['val_id_after'], '.3f')}"),
      ("kl/step mean", lambda s: _fmt(s["kl_step_mean"], ".2e")),
      ("kl/step max", lambda s: _fmt(s["kl_step_max"], ".2e")),
      ("kl/init final", lambda s: _fmt(s["kl_init_final"], ".2e")),
      ("entropy final", lambda s: _fmt(s["entropy_final"], ".3f")),
      ("reward first -> last", lambda s: f"{_fmt(s['reward_first'], '.3f')} -> "
                                         f"{_fmt(s['reward_last'], '.3f')}"),
      ("steps", lambda s: str(s["steps"])),
      ("wall s", lambda s: _fmt(s["wall_s"], ".1f")),
  )
  rows = [[header for header, _ in columns]]
  rows += [[cell(s) for _, cell in columns] for s in summaries]
  widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
  lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in
                     enumerate(zip(row, widths))).rstrip() for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def write_summary_csv(summaries: Iterable[Summary], path: str | os.PathLike) -> None:
  """Writes one CSV row per summary with the columns SUMMARY_FIELDS (None as an empty cell)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for summary in summaries:
      writer.writerow({k: "" if summary.get(k) is None else summary[k] for k in SUMMARY_FIELDS})


def run_labels(runs: Sequence[Run]) -> list[str]:
  """The algorithm of each run, plus task, lr and seed where those differ between the runs."""
  metas = [run["meta"] for run in runs]
  varying = [k for k in ("task", "lr", "seed") if len({repr(m.get(k)) for m in metas}) > 1]
  return [" ".join([str(m.get("algorithm"))] + [f"{k}={m.get(k)}" for k in varying])
          for m in metas]


def plot_runs(runs: Sequence[Run], path_png: str | os.PathLike,
              title: str = "RL fine-tuning curves") -> None:
  """Writes a PNG with one panel per CURVE_PANELS metric and one line per run.

  `kl/step` uses a log y-axis when all its values are positive; sparse series (validation) are
  drawn with markers. The last grid cell holds the legend.
  """
  labels = run_labels(runs)
  colours = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
  fig, axes = plt.subplots(2, 4, figsize=(17, 7), dpi=100)
  for ax, (key, panel_title, ylabel) in zip(axes.flat, CURVE_PANELS):
    all_values = []
    for i, (run, label) in enumerate(zip(runs, labels)):
      steps, values = metric_series(run, key)
      all_values += values
      sparse = len(values) < 0.5 * max(len(run["records"]), 1)  # e.g. validation steps only
      ax.plot(steps, values, label=label, color=colours(i % colours.N), linewidth=1.4,
              marker="o" if sparse else None, markersize=3)
    if key == "kl/step" and all_values and min(all_values) > 0:
      ax.set_yscale("log")
    if not all_values:
      ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(panel_title, fontsize=10)
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  for ax in axes.flat[len(CURVE_PANELS) + 1:]:
    ax.axis("off")
  legend_ax = axes.flat[len(CURVE_PANELS)]
  legend_ax.axis("off")
  handles, legend_labels = axes.flat[0].get_legend_handles_labels()
  legend_ax.legend(handles, legend_labels, loc="center", fontsize=9, frameon=False,
                   ncol=1 if len(runs) <= 12 else 2)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path_png)), exist_ok=True)
  fig.savefig(path_png)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
  """The command line. A run directory that cannot be read is skipped with a warning; none left,
  or an --out that is a file, is a usage error (exit 2). An --out that cannot be written (a full
  disk, a read-only or forbidden directory, a path through a regular file) exits 1 with one line
  `error: <reason>: <path> (<type>)`; any other exception keeps its traceback."""
  parser = argparse.ArgumentParser(
      prog="python -m proma_jax.report",
      description="Summarise run directories: print a table, write summary.csv and curves.png.")
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
  parser.add_argument("--out", required=True, metavar="DIR", help="where to write the outputs")
  parser.add_argument("--title", default="RL fine-tuning curves", help="title of curves.png")
  args = parser.parse_args(argv)
  runs = []
  for run_dir in args.run_dirs:
    try:
      runs.append(load_run(run_dir))
    except ValueError as e:
      log.warning("skipping %s: %s", run_dir, e)
  if not runs:
    parser.error("none of the given directories is a run directory (each needs a run.json)")
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    parser.error(f"argument --out: {args.out} is a file, not a directory")
  summaries = [summarize_run(run) for run in runs]
  csv_path, png_path = os.path.join(args.out, "summary.csv"), os.path.join(args.out, "curves.png")
  with cli.expected_errors_as_messages():
    os.makedirs(args.out, exist_ok=True)
    with cli.naming_path_in_os_errors(csv_path):
      write_summary_csv(summaries, csv_path)
    with cli.naming_path_in_os_errors(png_path):
      plot_runs(runs, png_path, title=args.title)
  print(results_table(summaries))
  print(f"\nwrote {args.out}/summary.csv and {args.out}/curves.png")


if __name__ == "__main__":
  main()
