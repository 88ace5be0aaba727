"""Logging sinks: TensorBoard event files read back exactly, purge markers on resume, a failing
sink disabled without stopping the others, W&B offline runs read back by the real wandb package
(each metric at its step, the same run continued on resume, a training run end to end), config
validation."""

import json
import logging
import math
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from proma_jax import writers
from helpers import read_scalars, tiny_config


def test_tensorboard_round_trip_is_exact_at_float32(tmp_path):
  steps = {1: {"reward/mean": 0.1, "kl/step": 1e-7, "val/accuracy": 0.75},
           2: {"reward/mean": np.float32(0.2), "kl/step": np.float64(3.3e-5)},
           3: {"reward/mean": 1 / 3, "kl/step": np.asarray(2.5), "time/sample_s": 7}}
  writer = writers.TensorBoardWriter(str(tmp_path), purge_step=None)
  for step, metrics in steps.items():
    writer.write(step, metrics)
  writer.close()

  expected = {}
  for step, metrics in steps.items():
    for key, value in metrics.items():
      expected.setdefault(key, []).append((step, float(np.float32(value))))
  assert read_scalars(str(tmp_path)) == expected


def test_each_write_is_on_disk_before_close(tmp_path):
  writer = writers.TensorBoardWriter(str(tmp_path), purge_step=None)
  writer.write(1, {"a": 1.0})
  writer.write(2, {"a": 2.0})
  assert read_scalars(str(tmp_path)) == {"a": [(1, 1.0), (2, 2.0)]}
  writer.close()


def test_non_finite_and_non_numeric_values_are_skipped_with_one_warning_per_key(tmp_path, caplog):
  writer = writers.TensorBoardWriter(str(tmp_path), purge_step=None)
  with caplog.at_level(logging.WARNING, logger=writers.__name__):
    writer.write(1, {"a": float("nan"), "b": 1.0, "c": "text", "d": np.ones(2)})
    writer.write(2, {"a": float("inf"), "b": 2.0, "c": None})
    writer.write(3, {"a": -np.inf})  # nothing to write: no event at all
  writer.close()

  assert read_scalars(str(tmp_path)) == {"b": [(1, 1.0), (2, 2.0)]}
  warned = sorted(r.args[0] for r in caplog.records)
  assert warned == ["a", "c", "d"]
  summaries = [e for e in writers.read_events(str(tmp_path)) if e.WhichOneof("what") == "summary"]
  assert [e.step for e in summaries] == [1, 2]


def test_resumed_writer_starts_its_own_file_with_tensorboardx_purge_marker(tmp_path):
  first = writers.TensorBoardWriter(str(tmp_path), purge_step=None)
  for step in (1, 2, 3, 4):
    first.write(step, {"loss": float(step)})
  # Killed after step 4, resumed from the checkpoint at step 2: same directory, same second.
  second = writers.TensorBoardWriter(str(tmp_path), purge_step=3)
  second.write(3, {"loss": 30.0})
  second.close()
  first.close()

  files = sorted(os.listdir(tmp_path))
  assert len(files) == 2, files  # the second file did not overwrite the first
  events = writers.read_events(str(tmp_path))
  kinds = [(e.WhichOneof("what"), e.step) for e in events]
  assert kinds == [("file_version", 0)] + [("summary", s) for s in (1, 2, 3, 4)] + [
      ("file_version", 0), ("file_version", 3), ("session_log", 3), ("summary", 3)]
  assert events[6].file_version == "brain.Event:2"
  assert events[7].session_log.status == event_pb2.SessionLog.START
  # The raw events, purge not applied: step 3 twice, the recomputed value last.
  assert read_scalars(str(tmp_path)) == {
      "loss": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (3, 30.0)]}


def test_read_events_stops_at_a_record_cut_short(tmp_path):
  writer = writers.TensorBoardWriter(str(tmp_path), purge_step=None)
  writer.write(1, {"a": 1.0})
  writer.write(2, {"a": 2.0})
  writer.close()
  (path,) = tmp_path.iterdir()
  path.write_bytes(path.read_bytes()[:-3])  # a kill in the middle of the last record
  assert read_scalars(str(tmp_path)) == {"a": [(1, 1.0)]}


def test_make_writers_marks_each_start_purging_past_the_restored_step(tmp_path):
  logdir = str(tmp_path / "tensorboard")

  def purge_markers():
    return [e.step for e in writers.read_events(logdir) if e.WhichOneof("what") == "session_log"]

  config = {"step": 1}
  with writers.make_writers(None, str(tmp_path), start_step=0, run_name="r",
                            config_dict=config) as sinks:
    assert [type(w) for w in sinks.writers] == [writers.TensorBoardWriter]
    sinks.write(0, {"val/accuracy": 0.5})
  assert purge_markers() == [0]  # a fresh run: the session start TensorBoard expects first
  writers.make_writers({}, str(tmp_path), start_step=5, run_name="r", config_dict=config).close()
  assert purge_markers() == [0, 6]  # resumed at 5: records of steps <= 5 stay
  writers.make_writers({}, str(tmp_path), start_step=0, run_name="r", config_dict=config).close()
  assert purge_markers() == [0, 6, 0]  # started over: everything earlier is hidden

  off = ml_collections.ConfigDict({"tensorboard": False, "wandb_project": "p",
                                   "wandb_mode": "disabled"})
  other = tmp_path / "other"
  assert writers.make_writers(off, str(other), start_step=0, run_name="r",
                              config_dict=config).writers == []
  assert not other.exists()


class _Recorder:

  def __init__(self, fail_at=None):
    self.fail_at, self.written, self.closed = fail_at, [], False

  def write(self, step, metrics):
    if step == self.fail_at:
      raise OSError("disk full")
    self.written.append((step, dict(metrics)))

  def close(self):
    self.closed = True


def test_multi_writer_disables_a_raising_sink_and_keeps_the_others(caplog):
  failing, healthy = _Recorder(fail_at=2), _Recorder()
  multi = writers.MultiWriter([failing, healthy])
  with caplog.at_level(logging.WARNING, logger=writers.__name__):
    for step in (1, 2, 3, 4):
      multi.write(step, {"a": float(step)})
  multi.close()

  assert failing.written == [(1, {"a": 1.0})]
  assert healthy.written == [(s, {"a": float(s)}) for s in (1, 2, 3, 4)]
  assert failing.closed and healthy.closed
  assert len(caplog.records) == 1 and "disk full" in caplog.text


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
  """The real wandb package in offline mode: no network, no account, and every file it writes
  (settings, cache, logs) under tmp_path/wandb_home, not under ~. Variables that a developer's
  shell may set and that would steer the run elsewhere are cleared."""
  import wandb  # pylint: disable=g-import-not-at-top
  for name in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME",
               "WANDB_NAME", "WANDB_BASE_URL"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  home = tmp_path / "wandb_home"
  for name in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR"):
    path = home / name.lower()
    path.mkdir(parents=True)
    monkeypatch.setenv(f"WANDB_{name}", str(path))
  return wandb


def _offline_runs(workdir):
  """{run directory: its records} of every offline run under <workdir>/wandb/, in start order.

  The records are read by the pinned wandb itself: `wandb leet inspect --json` prints each record
  of a run's .wandb transaction log as one JSON object, {"type": "run" | "history" | ...,
  <type>: the record's fields}.
  """
  runs = {}
  for run_dir in pathlib.Path(workdir, "wandb").glob("offline-run-*"):
    (log_file,) = run_dir.glob("run-*.wandb")
    printed = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                              str(log_file)], check=True, capture_output=True, text=True).stdout
    runs[run_dir] = [json.loads(line) for line in printed.splitlines() if line.strip()]
  # Directory names hold the start time only to the second (a clash gets a -1, -2, ... suffix);
  # the run record has it to the microsecond.
  return dict(sorted(runs.items(), key=lambda item: _start_time(item[1])))


def _run_record(records):
  (run,) = [r["run"] for r in records if r["type"] == "run"]
  return run


def _start_time(records):
  """The run record's start time ("2026-01-02T03:04:05.678Z", the fraction optional) as a
  sortable (seconds, fraction) pair."""
  seconds, _, fraction = _run_record(records)["start_time"].rstrip("Z").partition(".")
  return seconds, float("0." + (fraction or "0"))


def _comparable(value):
  """A logged value in a form `==` compares: NaN (never equal to itself) as the string "nan";
  W&B writes the non-finite floats as the strings "NaN", "Infinity" and "-Infinity"."""
  if isinstance(value, str):
    value = float(value)
  return "nan" if isinstance(value, float) and math.isnan(value) else value


def _history(records):
  """{step: {key: value}} of a run's history rows, W&B's own keys (_step, _runtime, ...) left out.

  Checks that each row's `_step` is the step it was logged at and that no step has two rows.
  """
  history = {}
  for record in records:
    if record["type"] != "history":
      continue
    row = record["history"]
    step = int(row["step"]["num"])
    assert row["item"]["_step"] == step and step not in history, row
    history[step] = {k: _comparable(v) for k, v in row["item"].items() if not k.startswith("_")}
  return history


def _logged(steps):
  return {step: {k: _comparable(v) for k, v in metrics.items()} for step, metrics in steps.items()}


def test_wandb_offline_run_logs_every_metric_at_its_step(wandb_offline, tmp_path):
  workdir = tmp_path / "run"
  config = {"lr": 1e-6, "task": "arith", "model": {"d_model": 32}}
  # Values as train.py logs them (the floats of metrics.jsonl), non-finite and whole ones included.
  steps = {0: {"val/accuracy": 0.25, "val_id/accuracy": 0.5},
           1: {"reward/mean": 1 / 3, "kl/step": 1e-7, "grad/norm": float("nan"),
               "response/length_max": 9},
           2: {"reward/mean": 0.6, "kl/step": float("inf"), "kl/init": -float("inf")},
           5: {"reward/mean": 0.1, "val/accuracy": 0.75}}
  writer = writers.WandbWriter("proj", workdir=str(workdir), run_name="grpo", config=config,
                               mode="offline")
  for step, metrics in steps.items():
    writer.write(step, metrics)
  writer.close()
  writer.close()  # a second close does nothing

  with open(workdir / "wandb_id.txt") as f:
    assert f.read().strip() == writer.run_id
  ((run_dir, records),) = _offline_runs(workdir).items()
  assert run_dir.name.startswith("offline-run-") and run_dir.name.endswith(writer.run_id)
  run = _run_record(records)
  assert run["run_id"] == writer.run_id
  assert run["project"] == "proj" and run["display_name"] == "grpo"
  assert {k: v for k, v in run["config"]["update"].items() if k != "_wandb"} == config
  assert _history(records) == _logged(steps)
  assert records[-1]["type"] == "exit" and records[-1]["exit"]["exit_code"] == 0  # finished


def test_resumed_wandb_writer_continues_the_same_run(wandb_offline, tmp_path):
  workdir = tmp_path / "run"
  first = writers.WandbWriter("proj", workdir=str(workdir), run_name="grpo", config={},
                              mode="offline")
  for step in (1, 2, 3):
    first.write(step, {"reward/mean": float(step)})
  first.close()
  # Killed after step 3, resumed from the checkpoint at step 2: step 3 is recomputed.
  resumed = writers.WandbWriter("proj", workdir=str(workdir), run_name="grpo", config={},
                                mode="offline", entity="team")
  for step in (3, 4):
    resumed.write(step, {"reward/mean": 10.0 * step})
  resumed.close()
  # resume_id names the run to continue and replaces the stored id.
  other = writers.WandbWriter("proj", workdir=str(workdir), run_name="grpo", config={},
                              mode="offline", resume_id="abc123")
  other.close()

  assert resumed.run_id == first.run_id and other.run_id == "abc123"
  with open(workdir / "wandb_id.txt") as f:
    assert f.read().strip() == "abc123"
  runs = list(_offline_runs(workdir).values())
  assert len(runs) == 3  # each attempt keeps its own offline run directory
  assert [_run_record(r)["run_id"] for r in runs] == [first.run_id, first.run_id, "abc123"]
  assert _run_record(runs[1])["entity"] == "team"
  assert _history(runs[0]) == {s: {"reward/mean": float(s)} for s in (1, 2, 3)}
  assert _history(runs[1]) == {s: {"reward/mean": 10.0 * s} for s in (3, 4)}
  assert _history(runs[2]) == {}


def test_wandb_writers_open_together_keep_their_own_runs(wandb_offline, tmp_path):
  """wandb.init's default hands back a run still active in the process; each writer must not."""
  a = writers.WandbWriter("proj", workdir=str(tmp_path / "a"), run_name="a", config={},
                          mode="offline")
  b = writers.WandbWriter("proj", workdir=str(tmp_path / "b"), run_name="b", config={},
                          mode="offline")
  b.write(1, {"x": 2.0})
  b.close()
  a.write(1, {"x": 1.0})
  a.close()

  assert a.run_id != b.run_id
  for name, writer, value in (("a", a, 1.0), ("b", b, 2.0)):
    ((_, records),) = _offline_runs(tmp_path / name).items()
    assert _run_record(records)["run_id"] == writer.run_id
    assert _history(records) == {1: {"x": value}}


def test_make_writers_adds_wandb_when_a_project_is_set(wandb_offline, tmp_path):
  cfg = ml_collections.ConfigDict({"tensorboard": True, "wandb_project": "proj",
                                   "wandb_entity": "team", "wandb_mode": "offline"})
  with writers.make_writers(cfg, str(tmp_path), start_step=0, run_name="r",
                            config_dict={"seed": 0}) as sinks:
    assert [type(w) for w in sinks.writers] == [writers.TensorBoardWriter, writers.WandbWriter]
    sinks.write(1, {"a": 1.0})
  ((_, records),) = _offline_runs(tmp_path).items()
  run = _run_record(records)
  assert run["project"] == "proj" and run["entity"] == "team" and run["display_name"] == "r"
  assert run["config"]["update"]["seed"] == 0
  assert _history(records) == {1: {"a": 1.0}}
  assert read_scalars(str(tmp_path / "tensorboard")) == {"a": [(1, 1.0)]}


@pytest.mark.slow
def test_training_logs_to_wandb_what_it_writes_to_metrics_jsonl(wandb_offline, tmp_path):
  """One RL step of the smallest config through proma_jax.train with an offline W&B run."""
  from proma_jax import train  # pylint: disable=g-import-not-at-top
  c = tiny_config("grpo", tmp_path / "warm", steps=1)
  c.sft.steps = 0  # no warm start to train: only the logging is under test
  c.rollout.update(prompts_per_step=2, group_size=2)
  c.train.update(num_minibatches=1, num_microbatches=1)
  c.eval.update(every=1, num_examples=2)
  c.logging.update(wandb_project="proj", wandb_mode="offline")
  workdir = tmp_path / "run"
  train.run(c, str(workdir), progress=False)

  with open(workdir / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  expected = {r.pop("step"): r for r in lines}
  assert sorted(expected) == [0, 1] and "reward/mean" in expected[1]
  ((_, records),) = _offline_runs(workdir).items()
  run = _run_record(records)
  assert run["project"] == "proj" and run["display_name"] == "run"
  with open(workdir / "wandb_id.txt") as f:
    assert run["run_id"] == f.read().strip()
  assert _history(records) == _logged(expected)


def test_missing_wandb_raises_import_error_naming_the_fix(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)
  with pytest.raises(ImportError, match=r"logging\.wandb_project.*pip install wandb"):
    writers.WandbWriter("proj", workdir=str(tmp_path), run_name="r", config={})
  with pytest.raises(ImportError, match="pip install wandb"):
    writers.make_writers({"wandb_project": "proj"}, str(tmp_path), start_step=0, run_name="r",
                         config_dict={})


@pytest.mark.parametrize("field, value", [
    ("tensorboard", 1),
    ("tensorboard", "yes"),
    ("wandb_project", ""),
    ("wandb_project", 3),
    ("wandb_entity", "  "),
    ("wandb_mode", "on"),
    ("wandb_mode", None),
])
def test_validate_logging_config_names_the_bad_field(field, value, tmp_path):
  cfg = ml_collections.ConfigDict({**writers.LOGGING_DEFAULTS, field: value})
  with pytest.raises(ValueError, match=rf"^config\.logging\.{field}: "):
    writers.validate_logging_config(cfg)
  with pytest.raises(ValueError, match=rf"^config\.logging\.{field}: "):
    writers.make_writers({field: value}, str(tmp_path), start_step=0, run_name="r",
                         config_dict={})


def test_validate_logging_config_accepts_defaults_and_partial_configs():
  writers.validate_logging_config(None)
  writers.validate_logging_config({})
  writers.validate_logging_config(ml_collections.ConfigDict(dict(writers.LOGGING_DEFAULTS)))
  for mode in writers.WANDB_MODES:
    writers.validate_logging_config({"wandb_project": "p", "wandb_entity": "e",
                                     "wandb_mode": mode, "tensorboard": False})
