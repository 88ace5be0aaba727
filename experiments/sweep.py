"""The paper's comparison at CPU scale: tasks x batch shapes x arms x learning rates x seeds.

  python experiments/sweep.py --plan paper --out runs/paper --summaries results/paper/runs \\
      --commit_every 900                                # the paper-shape grid, resumable, in the background
  python experiments/sweep.py --out runs/sweep --shapes base --arms reinforce,grpo,proma \\
      --lrs 1e-4,3e-4 --seeds 0,1 --steps 60            # one grid from the flags
  python experiments/report_paper.py results/paper/runs --out results/paper

A run is one (task, shape, arm, lr, seed). An arm is an algorithm plus config overrides (ARMS: e.g.
`proma_rb0.5` is PROMA with the author's relative_bound 0.5, `grpo_2ep` GRPO with 2 PPO epochs so
that its clipping acts); a shape sets the rollout batch and how it is cut (SHAPES: `paper` is 64
prompts x 8 samples = 512 sequences, 2 minibatches of 256 = 32 microbatches of 8). Every run of a
task starts from the same warm start, sees the same prompts and sampling keys per (seed, step), and
records in its run directory `overrides.json`, the exact config overrides it ran with.

Resuming: a run is finished when its summary (`--summaries/<task>/<shape>/<arm>/lr<lr>_seed<seed>
.json`, small: per-step curves and validation points) exists, so a sweep resumes from summaries
committed to the repository even on a fresh machine without `runs/`; a run interrupted mid-way
resumes from its last checkpoint in `--out` when that is still there. `--commit_every S` commits
new summaries to git every S seconds (and at the end).

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
PLANS = {
    "paper": [
        dict(tasks=["reverse", "arith"], shapes=["paper"],
             arms=["reinforce", "grpo", "proma", "proma_intra", "proma_both", "proma_rb0.5",
                   "grpo_2ep", "grpo_4ep"], lrs=_LRS, seeds=_SEEDS),
        # Controls: minibatch size against the number of microbatches, at equal seeds.
        dict(tasks=["reverse"], shapes=["mb256_4x64", "mb32_4x8", "mb32_32x1"],
             arms=["grpo", "proma"], lrs=[1e-4, 3e-4], seeds=_SEEDS),
    ],
}

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


def plan_cells(args) -> list[tuple]:
  """The (task, shape, arm, lr, seed) cells of --plan or of the grid flags, in plan order;
  SweepError naming the option for an unknown task, arm or shape or a malformed number."""
  grids = PLANS[args.plan] if args.plan else [dict(
      tasks=args.tasks.split(","), shapes=args.shapes.split(","), arms=args.arms.split(","),
      lrs=_numbers("--lrs", args.lrs, float), seeds=_numbers("--seeds", args.seeds, int))]
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
                      help="a named grid (overrides --tasks/--shapes/--arms/--lrs/--seeds)")
  parser.add_argument("--tasks", default="reverse,arith")
  parser.add_argument("--shapes", default="base", help=f"of {sorted(SHAPES)}")
  parser.add_argument("--arms", "--algorithms", default=",".join(ALGORITHMS),
                      help=f"of {sorted(ARMS)}")
  parser.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=int, default=60)
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
  for option, value in (("--steps", args.steps), ("--workers", args.workers)):
    if value < 1:
      raise SweepError(f"{option} {value}: must be at least 1")
  summaries = args.summaries or os.path.join(args.out, "summaries")
  cells = plan_cells(args)
  overrides = {cell: run_overrides(cell[1], cell[2], cell[3], cell[4], args.steps, args.override)
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
    # Warm starts first, in this process, so workers never race to create the same one.
    from absl import logging

    from proma_jax import sft
    logging.set_verbosity(logging.WARNING)
    for task in sorted({cell[0] for cell in pending}):
      cell = next(c for c in cells if c[0] == task)
      sft.load_or_train(make_config(task, ARMS[cell[2]][0], overrides[cell]))

  import tqdm
  # SIGTERM unwinds like Ctrl-C: the workers are told to stop (each checkpoints its run).
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  start = last_commit = time.perf_counter()
  bar = tqdm.tqdm(total=total, initial=total - left, desc="sweep runs", file=sys.stdout)
  ctx = mp.get_context("spawn")
  outbox = ctx.Queue()
  workers, inboxes, current = [], [], {}
  try:
    for i in range(min(args.workers, left)):
      inboxes.append(ctx.Queue())
      workers.append(ctx.Process(target=_worker, args=(i, inboxes[i], outbox, args.out, summaries),
                                 daemon=True))
      workers[i].start()
      job = pending.pop(0)
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
      current.pop(worker_id)
      if not pending:
        inboxes[worker_id].put(None)
      else:
        job = current[worker_id] = pending.pop(0)
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
  print(f"sweep: {sum(map(done, cells))}/{total} runs done in {time.perf_counter() - start:.0f} s "
        f"-> {summaries}")


if __name__ == "__main__":
  main()
