"""The paper's comparison: tasks x batch shapes x arms x learning rates x seeds (CPU scale, and
SmolLM2-135M-Instruct on a GPU in time-bounded slices).

  python experiments/sweep.py --plan paper --out runs/paper --summaries results/paper/runs \\
      --commit_every 900                                # the paper-shape grid, resumable, in the background
  python experiments/sweep.py --out runs/sweep --shapes base --arms reinforce,grpo,proma \\
      --lrs 1e-4,3e-4 --seeds 0,1 --steps 60            # one grid from the flags
  python experiments/report_paper.py results/paper/runs --out results/paper
  python experiments/sweep.py --plan smollm2_lr --out runs/smollm2_paper \\
      --summaries results/smollm2_paper/runs --write_lr results/smollm2_paper/lr.json
  python experiments/sweep.py --plan smollm2 --out runs/smollm2_paper \\
      --summaries results/smollm2_paper/runs --time_budget 450    # one slice, on a GPU
                                                  # (experiments/gpu_smollm2_paper.sh runs both)

A run is one (task, shape, arm, lr, seed). An arm is an algorithm plus config overrides (ARMS: e.g.
`proma_rb0.5` is PROMA with the author's relative_bound 0.5, `grpo_2ep` GRPO with 2 PPO epochs so
that its clipping acts); a shape sets the rollout batch and how it is cut (SHAPES: `paper` is 64
prompts x 8 samples = 512 sequences, 2 minibatches of 256 = 32 microbatches of 8). Every run of a
task starts from the same warm start, sees the same prompts and sampling keys per (seed, step), and
records in its run directory `overrides.json`, the exact config overrides it ran with.

Learning rates from a probe: a plan's grid may name an `lr_file` instead of `lrs` (`smollm2`
reads results/smollm2_paper/lr.json). `--write_lr PATH`, once every run of the sweep is
summarised, chooses one learning rate from those runs by `choose_lr` (the largest learning rate
at which every probed arm learned and kept its validation accuracy) and writes it with the
evidence to PATH; `--lr_file` reads another file, and `--lrs` / `--seeds` given with --plan
replace the plan's own. A plan may also fix the RL steps of its runs (PLAN_STEPS, unless --steps
is given) and config overrides (PLAN_OVERRIDES, before --override's).

Resuming: a run is finished when its summary (`--summaries/<task>/<shape>/<arm>/lr<lr>_seed<seed>
.json`, small: per-step curves and validation points) exists, so a sweep resumes from summaries
committed to the repository even on a fresh machine without `runs/`; a run interrupted mid-way
resumes from its last checkpoint in `--out` when that is still there. `--commit_every S` commits
new summaries to git every S seconds (and at the end).

Slices: `--time_budget S` starts no run after S seconds, nor one expected to end after S seconds
(expected: the longest summarised run of its task, shape and arm, compilation included; a group
never run before is scaled from another arm's by ARM_COST; a run that does not fit waits for the
next call, which starts with it, while cheaper ones use the time left), and `--max_runs N` starts
at most N runs; the sweep then waits for the runs it started and exits, and the next call
resumes. So one call bounded by the clock (a GPU lease) finishes whole runs and loses none
mid-way.

Errors a user can fix (an unknown task, arm or shape, an --override that is not field=JSON or names
no config field, an unreadable summary, a full disk or an unwritable --out in the sweep or in a
run) stop the sweep with one line `error: ...` naming the option, field, file or path; any other
failure of a run is printed with its traceback.

Scheduling: `--workers` processes, each fed one run at a time from one queue, so no worker idles
while runs are left. The queue is seed-major (every cell's seed 0, then seed 1, ...; the costliest
arms first within a seed), so a sweep stopped part-way has paired seeds in every cell rather than
all seeds of a few arms. A worker keeps the compiled step of every group (task, shape, arm) it
has run (lr and seed are run-time inputs, `trainer.trainer_for`), so each compiles once per worker.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SweepError(ValueError):
  """A sweep that cannot run as asked; the message names the option, config field or file."""


def _load_config_schema():
  """proma_jax/config.py alone: importing the proma_jax package would import JAX before the
  workers set their XLA_FLAGS."""
  spec = importlib.util.spec_from_file_location("proma_config", os.path.join(REPO, "proma_jax",
                                                                            "config.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ALGORITHMS = _load_config_schema().ALGORITHMS

# arm -> (algorithm, config overrides).
ARMS = {a: (a, {}) for a in ALGORITHMS}
ARMS["proma_rb0.5"] = ("proma", {"proma.relative_bound": 0.5})  # the author's GSM8K setting
ARMS["grpo_2ep"] = ("grpo", {"train.num_epochs": 2})  # 2 PPO epochs: the second is off-policy
# Measured on seed 0 of the paper grid: grpo_2ep clipped at most 3.9% of tokens (lr 1e-3), short
# of the 5% the comparison needs, so 4 PPO epochs as well (8 optimizer steps per rollout batch).
ARMS["grpo_4ep"] = ("grpo", {"train.num_epochs": 4})

# shape -> config overrides (the rollout batch and its minibatch / microbatch cut).
_PAPER = {"rollout.prompts_per_step": 64, "rollout.group_size": 8}
_SMALL = {"rollout.prompts_per_step": 8, "rollout.group_size": 8}
SHAPES = {
    "base": {},  # the config's own: 16 prompts x 4 = 64 sequences, 2 minibatches of 4 x 8
    "paper": dict(_PAPER, **{"train.num_microbatches": 32}),  # minibatch 256 = 32 x 8
    "mb256_4x64": dict(_PAPER, **{"train.num_microbatches": 4}),  # minibatch 256 = 4 x 64
    "mb32_4x8": dict(_SMALL, **{"train.num_microbatches": 4}),  # minibatch 32 = 4 x 8
    "mb32_32x1": dict(_SMALL, **{"train.num_microbatches": 32}),  # minibatch 32 = 32 x 1
}

# Named grids: each a list of sub-grids (every combination of its lists).
_LRS = [3e-5, 1e-4, 3e-4, 1e-3]
_SEEDS = [0, 1, 2, 3]
# The SmolLM2 plans (configs/smollm2_paper.py, 30 RL steps): the learning-rate probe first (grpo
# and proma, seed 0, lr 1e-6 to 3e-5), then the comparison at the probe's learning rate
# (--write_lr). The probe's runs at the chosen lr are the main plan's grpo and proma seed-0 runs
# (same overrides), so they are not run twice.
SMOLLM2_LR_FILE = "results/smollm2_paper/lr.json"
SMOLLM2_ARMS = ["reinforce", "grpo", "proma", "proma_intra", "proma_both", "grpo_4ep"]
PLANS = {
    "smollm2_lr": [
        dict(tasks=["smollm2_paper"], shapes=["paper"], arms=["grpo", "proma"],
             lrs=[1e-6, 3e-6, 1e-5, 3e-5], seeds=[0]),
    ],
    "smollm2": [
        dict(tasks=["smollm2_paper"], shapes=["paper"], arms=SMOLLM2_ARMS, lr_file=SMOLLM2_LR_FILE,
             seeds=_SEEDS),
    ],
    "paper": [
        dict(tasks=["reverse", "arith"], shapes=["paper"],
             arms=["reinforce", "grpo", "proma", "proma_intra", "proma_both", "proma_rb0.5",
                   "grpo_2ep", "grpo_4ep"], lrs=_LRS, seeds=_SEEDS),
        # Controls: minibatch size against the number of microbatches, at equal seeds.
        dict(tasks=["reverse"], shapes=["mb256_4x64", "mb32_4x8", "mb32_32x1"],
             arms=["grpo", "proma"], lrs=[1e-4, 3e-4], seeds=_SEEDS),
    ],
}
# RL steps per run of a plan, unless --steps is given (60 for a grid from the flags).
PLAN_STEPS = {"smollm2_lr": 30, "smollm2": 30}
# Config overrides of every run of a plan, before --override's. The SmolLM2 runs checkpoint once,
# at the end (1.6 GB of params and AdamW state each time): a GPU slice never resumes a run
# mid-way, its machine is gone by the next call.
PLAN_OVERRIDES = {"smollm2_lr": ["checkpoint.every=1000"], "smollm2": ["checkpoint.every=1000"]}
DEFAULT_STEPS = 60

# Relative cost of a step, for scheduling the slowest groups first.
ARM_COST = {"proma_both": 4, "proma_intra": 2.5, "proma": 1.2, "proma_rb0.5": 1.2, "grpo_2ep": 2,
            "grpo_4ep": 4}
# Per-step curves kept in a run's summary.
CURVE_KEYS = ("reward/mean", "kl/step", "kl/step_max", "kl/step_k3", "kl/init", "entropy",
              "pg/clipfrac", "grad/norm", "proma/reduction", "proma/intra_reduction",
              "response/length", "time/step_s")


def run_name(task: str, shape: str, arm: str, lr: float, seed: int) -> str:
  return os.path.join(task, shape, arm, f"lr{lr:g}_seed{seed}")


def run_overrides(shape: str, arm: str, lr: float, seed: int, steps: int,
                  extra: list[str]) -> dict:
  """Every config field the run sets over `configs/<task>.py:<algorithm>`, in order of precedence
  (later wins): run-time fields, the shape, the arm, then --override."""
  overrides = {"optim.lr": lr, "seed": seed, "steps": steps, "eval.every": max(1, steps // 6),
               "checkpoint.every": max(1, steps // 3)}
  overrides.update(SHAPES[shape])
  overrides.update(ARMS[arm][1])
  overrides.update(parse_override(item) for item in extra)
  return overrides


def parse_override(item: str) -> tuple[str, object]:
  """(field, value) of an --override `field=JSON value`; SweepError naming the item otherwise."""
  field, separator, text = item.partition("=")
  if not separator or not field:
    raise SweepError(f"--override {item!r}: expected field=JSON value, e.g. model.d_model=32")
  try:
    return field, json.loads(text)
  except ValueError as e:
    raise SweepError(f"--override {item!r}: the value is not JSON ({e}); a string needs JSON "
                     f"quotes, e.g. --override '{field}=\"text\"'") from None


def _check_summaries(cells: list, overrides: dict, summaries: str) -> None:
  """Raises SweepError naming the first summarised run whose recorded overrides differ from what
  this sweep would run (e.g. another --steps): it would otherwise count as done and be reported as
  if it were this sweep's. A summary that cannot be read as a JSON object is named the same way."""
  for cell in cells:
    path = os.path.join(summaries, run_name(*cell) + ".json")
    try:
      with open(path) as f:
        summary = json.load(f)
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError included
      raise SweepError(f"{path} cannot be read as JSON ({e}); remove it to rerun that "
                       "run") from None
    if not isinstance(summary, dict):
      raise SweepError(f"{path} holds a {type(summary).__name__}, not a run summary; remove it to "
                       "rerun that run")
    recorded = summary.get("overrides")
    wanted = json.loads(json.dumps(overrides[cell]))
    if recorded != wanted:
      raise SweepError(f"{path} was run with overrides {recorded}, but this sweep would run "
                       f"{wanted}; use another --summaries directory or remove that file")


def make_config(task: str, algorithm: str, overrides: dict):
  """configs/<task>.py:<algorithm> with `overrides` ({dotted field: value}) set.

  An override of a field the config does not have, or of a value its field cannot take, raises
  SweepError naming the field (instead of adding a field that nothing reads).
  """
  configs = os.path.join(REPO, "configs")
  if configs not in sys.path:
    sys.path.insert(0, configs)
  c = __import__(task).get_config(algorithm)
  c.sft.checkpoint_dir = os.path.join(REPO, c.sft.checkpoint_dir)
  for field, value in overrides.items():
    *parents, leaf = field.split(".")
    node = c
    try:
      for parent in parents:
        node = node[parent]
      if leaf not in node:
        raise KeyError(leaf)
    except (KeyError, TypeError, AttributeError):
      raise SweepError(f"config.{field}: no such field in configs/{task}.py (from --override or "
                       "the arm or shape)") from None
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise SweepError(f"config.{field}: cannot be set to {value!r} ({e})") from None
  return c


def _round(x, digits: int = 5):
  return None if x is None else float(f"{x:.{digits}g}")


def summarize(directory: str, meta: dict) -> dict:
  """The small record of a finished run: `meta`, validation points and per-step curves."""
  by_step = {}
  with open(os.path.join(directory, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      by_step[record["step"]] = record  # the last record of a step wins
  steps = sorted(s for s in by_step if s > 0)
  val = {str(s): by_step[s]["val/accuracy"] for s in sorted(by_step) if "val/accuracy" in by_step[s]}
  val_id = {str(s): by_step[s]["val_id/accuracy"] for s in sorted(by_step)
            if "val_id/accuracy" in by_step[s]}
  curves = {k: [_round(by_step[s].get(k)) for s in steps] for k in CURVE_KEYS
            if any(k in by_step[s] for s in steps)}
  return dict(meta, steps_done=len(steps), val=val, val_id=val_id, curves=curves)


def _write_json(path: str, data: dict) -> None:
  """Writes `data` to `path` atomically; an OSError names the file even where the write or close
  that failed (a full disk) names none."""
  from proma_jax import cli  # not at the top: the workers import JAX after setting XLA_FLAGS
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with cli.naming_path_in_os_errors(tmp):
    with open(tmp, "w") as f:
      json.dump(data, f, separators=(",", ":"))
  os.replace(tmp, path)


def _worker(worker_id: int, inbox, outbox, out: str, summaries: str):
  """Runs the runs it is sent, one at a time, until it is sent None.

  Sends (worker_id, run name, message, traceback) after each run: both None when it finished; for
  an error the user can fix (`cli.expected_error_message`: a full disk, an unwritable --out, an
  invalid config, ...) the one-line message; for any other exception its traceback.
  """
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
  from absl import logging

  from proma_jax import cli, train
  logging.set_verbosity(logging.WARNING)
  while (job := inbox.get()) is not None:
    (task, shape, arm, lr, seed), overrides = job
    name = run_name(task, shape, arm, lr, seed)
    directory = os.path.join(out, name)
    try:
      os.makedirs(directory, exist_ok=True)
      _write_json(os.path.join(directory, "overrides.json"), overrides)
      start = time.perf_counter()
      train.run(make_config(task, ARMS[arm][0], overrides), directory, progress=False)
      meta = {"task": task, "shape": shape, "arm": arm, "algorithm": ARMS[arm][0], "lr": lr,
              "seed": seed, "overrides": overrides,
              "wall_s": round(time.perf_counter() - start, 1)}
      _write_json(os.path.join(summaries, name + ".json"), summarize(directory, meta))
      outbox.put((worker_id, name, None, None))
    except Exception as e:  # noqa: BLE001 -- reported by the parent, which stops the sweep
      message = cli.expected_error_message(e, SweepError, train.ConfigChangedError,
                                           train.WorkdirLockedError)
      if message is not None:
        outbox.put((worker_id, name, message, None))
      else:
        import traceback
        outbox.put((worker_id, name, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _numbers(option: str, text: str, kind: type) -> list:
  """The comma-separated numbers of option `option`; SweepError naming it otherwise."""
  try:
    return [kind(x) for x in text.split(",")]
  except ValueError:
    example = "1e-4,3e-4" if kind is float else "0,1,2"
    raise SweepError(f"{option} {text!r}: expected comma-separated {kind.__name__} values, e.g. "
                     f"{example}") from None


def read_lr_file(path: str) -> float:
  """The learning rate recorded in `path` by --write_lr; SweepError naming the file otherwise."""
  try:
    with open(path) as f:
      record = json.load(f)
    lr = record["lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
      raise ValueError(f"'lr' is {lr!r}, not a positive number")
    return float(lr)
  except FileNotFoundError:
    raise SweepError(f"{path}: no learning rate chosen yet (no such file); run the probe first "
                     f"(experiments/sweep.py --plan smollm2_lr ... --write_lr {path}) or give "
                     "--lrs") from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise SweepError(f"{path} does not record a learning rate ({type(e).__name__}: {e}); "
                     "rewrite it with --write_lr or give --lrs") from None


def plan_grids(args) -> list[dict]:
  """The sub-grids of --plan (--lrs / --seeds, when given, replace the plan's; a grid's lr_file,
  or --lr_file, is read) or the one grid of the flags."""
  lrs = _numbers("--lrs", args.lrs, float) if args.lrs is not None else None
  seeds = _numbers("--seeds", args.seeds, int) if args.seeds is not None else None
  if not args.plan:
    return [dict(tasks=args.tasks.split(","), shapes=args.shapes.split(","),
                 arms=args.arms.split(","), lrs=lrs or [1e-4, 3e-4, 1e-3, 3e-3],
                 seeds=seeds or [0, 1, 2])]
  grids = []
  for grid in PLANS[args.plan]:
    grid = dict(grid)
    if lrs is not None:
      grid["lrs"] = lrs
    elif "lr_file" in grid:
      path = args.lr_file or os.path.join(REPO, grid["lr_file"])
      grid["lrs"] = [read_lr_file(path)]
    if seeds is not None:
      grid["seeds"] = seeds
    grids.append(grid)
  return grids


def plan_cells(args) -> list[tuple]:
  """The (task, shape, arm, lr, seed) cells of --plan or of the grid flags, in plan order;
  SweepError naming the option for an unknown task, arm or shape or a malformed number."""
  grids = plan_grids(args)
  cells = []
  for grid in grids:
    for cell in itertools.product(grid["tasks"], grid["shapes"], grid["arms"], grid["lrs"],
                                  grid["seeds"]):
      if cell not in cells:
        cells.append(cell)
  unknown = sorted({c[2] for c in cells} - set(ARMS)) + sorted({c[1] for c in cells} - set(SHAPES))
  if unknown:
    raise SweepError(f"unknown arm or shape {unknown}; arms: {sorted(ARMS)}, shapes: "
                     f"{sorted(SHAPES)}")
  unknown = sorted(task for task in {c[0] for c in cells}
                   if not os.path.isfile(os.path.join(REPO, "configs", f"{task}.py")))
  if unknown:
    raise SweepError(f"--tasks: unknown task(s) {unknown}; each names a config "
                     f"{os.path.join(REPO, 'configs', '<task>.py')}")
  return cells


def _cost(cell: tuple) -> float:
  task, shape, arm, lr, seed = cell
  overrides = SHAPES[shape]
  sequences = (overrides.get("rollout.prompts_per_step", 16) * overrides.get("rollout.group_size", 4))
  return ARM_COST.get(arm, 1) * sequences


def queue_order(cells: list[tuple]) -> list[tuple]:
  """Seed-major: all of seed s before any of seed s + 1; within a seed, the costliest runs first
  (so the cheap ones fill the end), ties in plan order."""
  return sorted(cells, key=lambda cell: (cell[4], -_cost(cell)))


# choose_lr: a probed (arm, lr) counts as stable when its last validation accuracy is no more
# than this below its step-0 accuracy (0.02: 5 of the 256 val problems of configs/smollm2_paper.py)
# and its mean reward over the last REWARD_WINDOW steps is above its first step's.
VAL_TOLERANCE = 0.02
REWARD_WINDOW = 5


def _load_summary(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def choose_lr(summaries: list[dict]) -> dict:
  """The learning rate of a probe: the largest at which every probed arm is stable, else the
  smallest probed (flagged `none_stable`), with the evidence.

  Per (arm, lr), over its seeds: val_0 and val_last, the mean over seeds of the first and last
  validation accuracy; reward_first, the mean of the first step's reward/mean; reward_last, the
  mean of the last REWARD_WINDOW steps' reward/mean. Stable: val_last >= val_0 - VAL_TOLERANCE
  and reward_last > reward_first (it learned without losing validation accuracy). The largest
  such lr moves the policy most while no arm degrades, so the arms' per-step KL and accuracy can
  differ; the smallest lrs hardly move any arm.
  """
  import numpy as np  # not at the top: the workers import JAX after setting XLA_FLAGS
  by_cell: dict[tuple, list[dict]] = {}
  for s in summaries:
    by_cell.setdefault((s["arm"], float(s["lr"])), []).append(s)
  if not by_cell:
    raise SweepError("--write_lr: no run summaries to choose a learning rate from")
  rows = []
  for (arm, lr), runs in sorted(by_cell.items()):
    val = [sorted((int(k), v) for k, v in (r.get("val") or {}).items() if v is not None)
           for r in runs]
    rewards = [[x for x in (r.get("curves") or {}).get("reward/mean", []) if x is not None]
               for r in runs]
    if not all(val) or not all(rewards):
      raise SweepError(f"--write_lr: the {arm} run at lr {lr:g} has no validation points or "
                       "reward curve")
    row = dict(arm=arm, lr=lr, seeds=sorted(r["seed"] for r in runs),
               val_0=float(np.mean([v[0][1] for v in val])),
               val_last=float(np.mean([v[-1][1] for v in val])),
               reward_first=float(np.mean([r[0] for r in rewards])),
               reward_last=float(np.mean([np.mean(r[-REWARD_WINDOW:]) for r in rewards])))
    row["stable"] = bool(row["val_last"] >= row["val_0"] - VAL_TOLERANCE
                         and row["reward_last"] > row["reward_first"])
    rows.append(row)
  lrs = sorted({row["lr"] for row in rows})
  arms = sorted({row["arm"] for row in rows})
  stable = [lr for lr in lrs
            if all(any(r["lr"] == lr and r["arm"] == arm and r["stable"] for r in rows)
                   for arm in arms)]
  return dict(lr=max(stable) if stable else min(lrs), none_stable=not stable, stable_lrs=stable,
              rule=(f"the largest lr at which every probed arm ({', '.join(arms)}) has last val >= "
                    f"step-0 val - {VAL_TOLERANCE} and mean reward/mean over its last "
                    f"{REWARD_WINDOW} steps > its first step's (seed means); if none, the "
                    "smallest lr"),
              probe=rows)


def write_lr(path: str, cells: list[tuple], summaries: str) -> None:
  """Chooses the learning rate from the summaries of `cells` (`choose_lr`) and writes it to
  `path`; an existing file that records another learning rate is not replaced (SweepError: runs
  may already have used it)."""
  choice = choose_lr([_load_summary(os.path.join(summaries, run_name(*c) + ".json"))
                      for c in cells])
  if os.path.exists(path):
    previous = read_lr_file(path)
    if previous != choice["lr"]:
      raise SweepError(f"--write_lr {path}: it records lr {previous:g}, but these runs choose "
                       f"{choice['lr']:g}; remove the file to replace it")
  _write_json(path, choice)
  flag = " (no probed lr was stable for every arm: the smallest)" if choice["none_stable"] else ""
  print(f"sweep: lr {choice['lr']:g} chosen{flag} -> {path}", flush=True)


def wall_estimates(summaries: str) -> dict[tuple, float]:
  """(task, shape, arm) -> the longest wall_s of its summarised runs under `summaries`."""
  walls: dict[tuple, float] = {}
  for directory, _, files in os.walk(summaries):
    for name in files:
      if not name.endswith(".json"):
        continue
      try:
        s = _load_summary(os.path.join(directory, name))
        key, wall = (s["task"], s["shape"], s["arm"]), float(s["wall_s"])
      except (OSError, ValueError, KeyError, TypeError):
        continue
      walls[key] = max(wall, walls.get(key, 0.0))
  return walls


def expected_wall(cell: tuple, walls: dict[tuple, float]) -> float | None:
  """The expected wall time of a run: its group's longest summarised run, else another arm's of
  the same task and shape scaled by ARM_COST (the largest such estimate), else None."""
  task, shape, arm = cell[:3]
  if (task, shape, arm) in walls:
    return walls[(task, shape, arm)]
  scaled = [wall * ARM_COST.get(arm, 1) / ARM_COST.get(other, 1)
            for (t, sh, other), wall in walls.items() if (t, sh) == (task, shape)]
  return max(scaled) if scaled else None


def commit_summaries(summaries: str, message: str) -> bool:
  """Commits the summaries directory to git (new or changed files only); False if nothing to
  commit or git refused (e.g. another commit held the index lock: the next call retries)."""
  try:
    subprocess.run(["git", "add", "--", summaries], cwd=REPO, check=True, capture_output=True)
    staged = subprocess.run(["git", "diff", "--cached", "--quiet", "--", summaries], cwd=REPO)
    if staged.returncode == 0:
      return False
    subprocess.run(["git", "commit", "-q", "-m", message, "--", summaries], cwd=REPO, check=True,
                   capture_output=True)
    return True
  except (subprocess.CalledProcessError, OSError) as e:
    print(f"sweep: git commit of {summaries} failed ({e}); will retry", flush=True)
    return False


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--out", default="runs/sweep", help="run directories (checkpoints, metrics)")
  parser.add_argument("--summaries", default=None,
                      help="where finished runs' summaries go (default OUT/summaries)")
  parser.add_argument("--plan", default=None, choices=sorted(PLANS),
                      help="a named grid (overrides --tasks/--shapes/--arms; --lrs and --seeds, "
                           "when given, replace its own)")
  parser.add_argument("--tasks", default="reverse,arith")
  parser.add_argument("--shapes", default="base", help=f"of {sorted(SHAPES)}")
  parser.add_argument("--arms", "--algorithms", default=",".join(ALGORITHMS),
                      help=f"of {sorted(ARMS)}")
  parser.add_argument("--lrs", default=None, help="default 1e-4,3e-4,1e-3,3e-3 (or the plan's)")
  parser.add_argument("--seeds", default=None, help="default 0,1,2 (or the plan's)")
  parser.add_argument("--lr_file", default=None,
                      help="the learning-rate file of a plan whose grid names one (default: the "
                           "plan's, e.g. results/smollm2_paper/lr.json)")
  parser.add_argument("--write_lr", default=None, metavar="PATH",
                      help="once every run is summarised, choose the learning rate from them "
                           "(choose_lr) and write it to PATH")
  parser.add_argument("--steps", type=int, default=None,
                      help=f"RL steps per run (default: the plan's {PLAN_STEPS}, else "
                           f"{DEFAULT_STEPS})")
  parser.add_argument("--time_budget", type=float, default=0,
                      help="seconds: start no run that would end after this (0: no limit)")
  parser.add_argument("--max_runs", type=int, default=0,
                      help="start at most this many runs (0: no limit)")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--override", action="append", default=[],
                      help="config field=JSON value applied to every run, e.g. model.d_model=32")
  parser.add_argument("--commit_every", type=float, default=0,
                      help="seconds between git commits of new summaries (0: never)")
  args = parser.parse_args(argv)
  from proma_jax import cli  # not at the top: the workers import JAX after setting XLA_FLAGS
  with cli.expected_errors_as_messages(SweepError):
    _sweep(args)


def _sweep(args) -> None:
  """Runs the sweep of the parsed command line `args` (see `main`)."""
  if args.steps is None:
    args.steps = PLAN_STEPS.get(args.plan, DEFAULT_STEPS)
  for option, value in (("--steps", args.steps), ("--workers", args.workers)):
    if value < 1:
      raise SweepError(f"{option} {value}: must be at least 1")
  for option, value in (("--time_budget", args.time_budget), ("--max_runs", args.max_runs)):
    if value < 0:
      raise SweepError(f"{option} {value}: must be >= 0 (0: no limit)")
  summaries = args.summaries or os.path.join(args.out, "summaries")
  cells = plan_cells(args)
  extra = PLAN_OVERRIDES.get(args.plan, []) + args.override
  overrides = {cell: run_overrides(cell[1], cell[2], cell[3], cell[4], args.steps, extra)
               for cell in cells}
  from proma_jax.config import validate_config
  for cell in cells:  # every run's config is valid (ConfigError naming the field) before any runs
    validate_config(make_config(cell[0], ARMS[cell[2]][0], overrides[cell]))
  done = lambda cell: os.path.exists(os.path.join(summaries, run_name(*cell) + ".json"))  # noqa: E731
  _check_summaries([cell for cell in cells if done(cell)], overrides, summaries)
  pending = queue_order([cell for cell in cells if not done(cell)])
  total, left = len(cells), len(pending)
  print(f"sweep: {total} runs, {total - left} already summarised in {summaries}, {left} to run",
        flush=True)

  if left:
    # Warm starts first, in this process, so workers never race to create the same one. A
    # pretrained checkpoint has none (and is not loaded here).
    from absl import logging

    from proma_jax import sft
    logging.set_verbosity(logging.WARNING)
    for task in sorted({cell[0] for cell in pending}):
      cell = next(c for c in cells if c[0] == task)
      config = make_config(task, ARMS[cell[2]][0], overrides[cell])
      if not config.model.checkpoint:
        sft.load_or_train(config)

  import tqdm
  # SIGTERM unwinds like Ctrl-C: the workers are told to stop (each checkpoints its run).
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  start = last_commit = time.perf_counter()
  walls = wall_estimates(summaries) if args.time_budget else {}
  started = 0

  def next_job():
    """The first pending run, in queue order, that the budget lets start (popped), or None. A run
    that would not fit waits for the next call, which starts with it (the queue is seed-major),
    while cheaper ones, of later seeds too, use the rest of this call's time."""
    nonlocal started
    if not pending or (args.max_runs and started >= args.max_runs):
      return None
    elapsed = time.perf_counter() - start
    for i, job in enumerate(pending):
      if args.time_budget:
        expected = expected_wall(job, walls)
        if elapsed >= args.time_budget or (expected and elapsed + expected > args.time_budget):
          continue
      started += 1
      return pending.pop(i)
    return None

  bar = tqdm.tqdm(total=total, initial=total - left, desc="sweep runs", file=sys.stdout)
  ctx = mp.get_context("spawn")
  outbox = ctx.Queue()
  workers, inboxes, current = [], [], {}
  try:
    for i in range(min(args.workers, left)):
      job = next_job()
      if job is None:
        break
      inboxes.append(ctx.Queue())
      workers.append(ctx.Process(target=_worker, args=(i, inboxes[i], outbox, args.out, summaries),
                                 daemon=True))
      workers[i].start()
      current[i] = job
      inboxes[i].put((job, overrides[job]))
    while current:
      try:
        worker_id, name, message, failure = outbox.get(timeout=10)
      except queue.Empty:
        dead = [i for i, w in enumerate(workers) if not w.is_alive() and i in current]
        if dead:
          raise SweepError(f"sweep worker {dead} died (killed?); rerun to resume")
        continue
      if message:
        raise SweepError(f"run {name}: {message}")
      if failure:
        raise SystemExit(f"sweep: run {name} failed:\n{failure}")
      bar.update(1)
      bar.write(f"done {name}")
      group = current.pop(worker_id)[:3]
      if args.time_budget:
        wall = _load_summary(os.path.join(summaries, name + ".json")).get("wall_s", 0.0)
        walls[group] = max(wall, walls.get(group, 0.0))
      job = next_job()
      if job is None:
        inboxes[worker_id].put(None)
      else:
        current[worker_id] = job
        inboxes[worker_id].put((job, overrides[job]))
      if args.commit_every and time.perf_counter() - last_commit > args.commit_every:
        if commit_summaries(summaries, f"sweep ({args.plan or 'flags'}): run summaries, "
                                       f"{bar.n}/{total} done"):
          last_commit = time.perf_counter()
  finally:
    # Ctrl-C has reached the workers already (one process group); a second signal would abort
    # their checkpoint. Otherwise they are told once, and waited for while they checkpoint.
    interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt)
    for w in workers:
      if w.is_alive() and not interrupted:
        w.terminate()
    for w in workers:
      w.join(timeout=300)
    bar.close()
    if args.commit_every:
      commit_summaries(summaries, f"sweep ({args.plan or 'flags'}): run summaries, "
                                  f"{sum(map(done, cells))}/{total} done")
  finished = sum(map(done, cells))
  print(f"sweep: {finished}/{total} runs done in {time.perf_counter() - start:.0f} s "
        f"-> {summaries}")
  if finished < total:
    print(f"sweep: stopped with {total - finished} run(s) left (--time_budget / --max_runs); rerun "
          "the same command to resume", flush=True)
  elif args.write_lr:
    write_lr(args.write_lr, cells, summaries)


if __name__ == "__main__":
  main()
