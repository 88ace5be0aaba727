"""The command-line entry points (train, sft, report, experiments/sweep.py): flags only, and the
errors a user can fix (an invalid config or option, a broken checkpoint or file, a full or
read-only disk, a path through a regular file) as one line naming the field, option, file or path,
with no traceback (an unexpected exception keeps its traceback)."""

import errno
import json
import os
import queue
import subprocess
import sys

import pytest

from proma_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))


# Each command line is a subprocess (~8 s): train in the fast tier, sft in the slow one.
@pytest.mark.parametrize("module", ["proma_jax.train",
                                    pytest.param("proma_jax.sft", marks=pytest.mark.slow)])
def test_stray_positional_arguments_are_refused(module, tmp_path):
  """An unquoted workdir with a space leaves a stray word: refused, not silently ignored."""
  args = ["--config=configs/reverse.py:grpo", "extra"]
  if module == "proma_jax.train":
    args.append(f"--workdir={tmp_path}/my")
  proc = run(module, *args)
  assert proc.returncode != 0
  assert "unexpected positional argument(s) ['extra']" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not os.listdir(tmp_path)


def test_config_errors_are_one_line_naming_the_field(tmp_path):
  proc = run("proma_jax.train", "--config=configs/reverse.py:grpo", f"--workdir={tmp_path}/run",
             "--config.train.num_microbatches=0")
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.train.num_microbatches:"), last


@pytest.mark.parametrize("module", ["proma_jax.train",
                                    pytest.param("proma_jax.sft", marks=pytest.mark.slow)])
def test_a_malformed_data_file_is_one_line_naming_the_file_and_line(module, tmp_path):
  """A task whose data cannot be used (`tasks.DataError`) is reported, not a traceback."""
  data = tmp_path / "my.jsonl"
  data.write_text('{"prompt": "2+2", "answer": "4"}\n{"prompt": "3+3", "answer": 6}\n')
  args = ["--config=configs/jsonl.py:proma", f"--config.task_kwargs.train_path={data}"]
  if module == "proma_jax.train":
    args.append(f"--workdir={tmp_path}/run")
  proc = run(module, *args)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert f"{data}, line 2: 'answer' must be a string" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_a_broken_checkpoint_is_one_line_naming_the_file(tmp_path):
  """A pretrained run whose checkpoint directory has a garbled config.json."""
  directory = tmp_path / "ckpt"
  directory.mkdir()
  (directory / "config.json").write_text("{not json")
  proc = run("proma_jax.train", "--config=configs/smollm2_arith.py:grpo",
             f"--workdir={tmp_path}/run", f"--config.model.checkpoint={directory}")
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "config.json: unreadable config" in last, last


def _file(tmp_path):
  """A regular file: a path under it fails with ENOTDIR, as when a user's --out or --workdir
  names a file by mistake (root ignores permission bits, so a read-only directory cannot be
  simulated by its mode here)."""
  path = tmp_path / "results.csv"
  path.write_text("a file, not a directory\n")
  return path


def _one_line_error(proc, path):
  """The command failed with exit 1 and one `error: ...` line naming `path`, no traceback."""
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], lines
  return lines[0]


@pytest.mark.parametrize("error, path", [
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "/results/run"), "/results/run"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/results/summary.csv"),
     "/results/summary.csv"),
    (OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), "/results.csv/run"), "/results.csv/run"),
    (OSError(errno.EISDIR, os.strerror(errno.EISDIR), "/results/run.json"), "/results/run.json"),
])
def test_disk_and_path_errors_become_one_line_naming_the_path(error, path):
  """A read-only or full disk, and a path through a file or to a directory, are the user's to fix:
  one line naming the path, exit status 1."""
  with pytest.raises(SystemExit) as exit_info:
    with cli.expected_errors_as_messages():
      raise error
  message = str(exit_info.value.code)
  assert message.startswith(f"error: {error.strerror}: {path}") and "\n" not in message, message


def test_unexpected_errors_keep_their_traceback():
  """A missing file the code assumed, or any other exception, propagates unchanged."""
  for error in (FileNotFoundError(errno.ENOENT, "No such file or directory", "x"),
                RuntimeError("bug")):
    with pytest.raises(type(error)):
      with cli.expected_errors_as_messages():
        raise error


def test_naming_path_in_os_errors_names_the_file_a_failed_write_does_not():
  """A write or close that hits a full disk raises an OSError without a file name: the path is
  added; an error that names its own file is left as it is."""
  with pytest.raises(OSError) as error:
    with cli.naming_path_in_os_errors("/results/summary.csv"):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  assert (error.value.errno, error.value.filename) == (errno.ENOSPC, "/results/summary.csv")
  with pytest.raises(OSError) as error:
    with cli.naming_path_in_os_errors("/results/summary.csv"):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/results")
  assert error.value.filename == "/results"


def test_a_workdir_under_a_file_is_one_line_naming_the_path(tmp_path):
  """`--workdir` below a regular file (NotADirectoryError) is the user's path to fix."""
  workdir = _file(tmp_path) / "run"
  proc = run("proma_jax.train", "--config=configs/reverse.py:grpo", f"--workdir={workdir}")
  assert "Not a directory" in _one_line_error(proc, workdir)


def _run_dir(tmp_path, name="run"):
  directory = tmp_path / name
  directory.mkdir()
  (directory / "run.json").write_text(json.dumps({"algorithm": "grpo", "task": "reverse"}))
  (directory / "metrics.jsonl").write_text(
      "".join(json.dumps({"step": s, "reward/mean": 0.5, "kl/step": 1e-3}) + "\n"
              for s in (1, 2)))
  return directory


@pytest.mark.slow  # two report subprocesses; the in-process report errors below stay fast
def test_report_out_under_a_file_is_one_line_naming_the_path(tmp_path):
  """`python -m proma_jax.report RUN --out FILE/results`: one line naming the path, exit 1; an
  --out that is itself a file is a usage error naming it."""
  out = _file(tmp_path) / "results"
  proc = run("proma_jax.report", str(_run_dir(tmp_path)), "--out", str(out))
  assert "Not a directory" in _one_line_error(proc, out)
  proc = run("proma_jax.report", str(tmp_path / "run"), "--out", str(out.parent))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert f"--out: {out.parent} is a file, not a directory" in proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("writer, name, code", [("write_summary_csv", "summary.csv", errno.ENOSPC),
                                                ("plot_runs", "curves.png", errno.ENOSPC),
                                                ("write_summary_csv", "summary.csv", errno.EROFS)])
def test_report_full_or_read_only_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, writer,
                                                                   name, code):
  """A write that fails on a full disk (its OSError names no file) or a read-only file system
  exits with one line naming the file that could not be written, not a traceback."""
  from proma_jax import report

  def fail(*args, **kwargs):
    raise OSError(code, os.strerror(code))  # as file.write / close raise it: no file name

  monkeypatch.setattr(report, writer, fail)
  out = tmp_path / "results"
  with pytest.raises(SystemExit) as exit_info:
    report.main([str(_run_dir(tmp_path)), "--out", str(out)])
  message = str(exit_info.value.code)
  assert message == f"error: {os.strerror(code)}: {out / name} (OSError)"


def _sweep_module():
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  import sweep  # pylint: disable=g-import-not-at-top
  return sweep


def _summarised_sweep(tmp_path, *extra):
  """Sweep arguments whose one run (reverse, grpo, lr 1e-4, seed 0, 2 steps, `extra` overrides)
  is already summarised: a sweep that accepted them would have nothing to run."""
  sweep = _sweep_module()
  summaries = tmp_path / "summaries"
  path = summaries / (sweep.run_name("reverse", "base", "grpo", 1e-4, 0) + ".json")
  path.parent.mkdir(parents=True)
  items = [x for pair in extra for x in pair]
  overrides = sweep.run_overrides("base", "grpo", 1e-4, 0, 2, [v for _, v in extra])
  path.write_text(json.dumps({"overrides": overrides}))
  return ["--tasks", "reverse", "--arms", "grpo", "--lrs", "1e-4", "--seeds", "0", "--steps",
          "2", "--out", str(tmp_path / "runs"), "--summaries", str(summaries), *items]


@pytest.mark.parametrize("args, expected", [
    (["--override", "model.d_model"], "--override 'model.d_model': expected field=JSON value"),
    (["--override", "sft.checkpoint_dir=warm"], "--override 'sft.checkpoint_dir=warm': the value "
                                                "is not JSON"),
    (["--lrs", "1e-4,fast"], "--lrs '1e-4,fast': expected comma-separated float values"),
    (["--seeds", "0,one"], "--seeds '0,one': expected comma-separated int values"),
    (["--tasks", "reverse,nope"], "--tasks: unknown task(s) ['nope']"),
    (["--workers", "0"], "--workers 0: must be at least 1"),
])
def test_sweep_option_errors_are_one_line_naming_the_option(tmp_path, args, expected):
  """A malformed option stops experiments/sweep.py before anything runs: one line `error: ...`
  naming the option (a sweep with every run summarised would otherwise just report it done)."""
  sweep = _sweep_module()
  with pytest.raises(SystemExit) as exit_info:
    sweep.main(_summarised_sweep(tmp_path) + args)
  message = str(exit_info.value.code)
  assert message.startswith(f"error: {expected}") and "\n" not in message, message
  assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, expected", [
    ("model.d_modle=32", "config.model.d_modle: no such field in configs/reverse.py"),
    ("train.num_microbatches=0", "config.train.num_microbatches: must be an integer >= 1"),
])
def test_sweep_config_errors_are_one_line_naming_the_field(tmp_path, override, expected):
  """An --override of a field no config has (it used to be added, silently unread) or of an
  invalid value is refused by name before any warm start or run, not in a worker's traceback."""
  sweep = _sweep_module()
  with pytest.raises(SystemExit) as exit_info:
    sweep.main(_summarised_sweep(tmp_path, ("--override", override)))
  message = str(exit_info.value.code)
  assert message.startswith(f"error: {expected}") and "\n" not in message, message


def test_sweep_unreadable_summary_is_one_line_naming_the_file(tmp_path):
  """A summary cut short (a full disk, a kill mid-write by an older version) names its file."""
  sweep = _sweep_module()
  args = _summarised_sweep(tmp_path)
  path = next((tmp_path / "summaries").rglob("*.json"))
  path.write_text('{"overrides": ')
  with pytest.raises(SystemExit) as exit_info:
    sweep.main(args)
  message = str(exit_info.value.code)
  assert message.startswith(f"error: {path} cannot be read as JSON") and "\n" not in message


@pytest.mark.parametrize("failure", ["out_under_a_file", "full_disk"])
def test_sweep_worker_reports_disk_and_path_errors_as_one_line(tmp_path, monkeypatch, failure):
  """A run that cannot write its directory (--out below a file) or its files (a full disk) is
  reported by its worker as one line naming the path, which the sweep prints as
  `error: run <name>: ...`, instead of the worker's traceback."""
  sweep = _sweep_module()
  out = _file(tmp_path) / "runs" if failure == "out_under_a_file" else tmp_path / "runs"
  if failure == "full_disk":
    def full(*args, **kwargs):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(sweep.json, "dump", full)
  cell = ("reverse", "base", "grpo", 1e-4, 0)
  inbox, outbox = queue.Queue(), queue.Queue()
  inbox.put((cell, sweep.run_overrides(*cell[1:], 2, [])))
  inbox.put(None)
  sweep._worker(0, inbox, outbox, str(out), str(tmp_path / "summaries"))
  worker_id, name, message, failure_text = outbox.get_nowait()
  assert (worker_id, name, failure_text) == (0, sweep.run_name(*cell), None)
  path = out if failure == "out_under_a_file" else out / name / "overrides.json.tmp"
  reason = os.strerror(errno.ENOTDIR if failure == "out_under_a_file" else errno.ENOSPC)
  assert message.startswith(f"{reason}: {path}") and "\n" not in message, message
