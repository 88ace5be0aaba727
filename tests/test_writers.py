"""Logging sinks: TensorBoard event files read back exactly, purge markers on resume, a failing
sink disabled without stopping the others, W&B through a fake module, config validation."""

import logging
import os
import sys
import types

import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from proma_jax import writers


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
  assert writers.read_scalars(str(tmp_path)) == expected


def test_each_write_is_on_disk_before_close(tmp_path):
  writer = writers.TensorBoardWriter(str(tmp_path), purge_step=None)
  writer.write(1, {"a": 1.0})
  writer.write(2, {"a": 2.0})
  assert writers.read_scalars(str(tmp_path)) == {"a": [(1, 1.0), (2, 2.0)]}
  writer.close()


def test_non_finite_and_non_numeric_values_are_skipped_with_one_warning_per_key(tmp_path, caplog):
  writer = writers.TensorBoardWriter(str(tmp_path), purge_step=None)
  with caplog.at_level(logging.WARNING, logger=writers.__name__):
    writer.write(1, {"a": float("nan"), "b": 1.0, "c": "text", "d": np.ones(2)})
    writer.write(2, {"a": float("inf"), "b": 2.0, "c": None})
    writer.write(3, {"a": -np.inf})  # nothing to write: no event at all
  writer.close()

  assert writers.read_scalars(str(tmp_path)) == {"b": [(1, 1.0), (2, 2.0)]}
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
  assert writers.read_scalars(str(tmp_path)) == {
      "loss": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (3, 30.0)]}


def test_read_events_stops_at_a_record_cut_short(tmp_path):
  writer = writers.TensorBoardWriter(str(tmp_path), purge_step=None)
  writer.write(1, {"a": 1.0})
  writer.write(2, {"a": 2.0})
  writer.close()
  (path,) = tmp_path.iterdir()
  path.write_bytes(path.read_bytes()[:-3])  # a kill in the middle of the last record
  assert writers.read_scalars(str(tmp_path)) == {"a": [(1, 1.0)]}


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


def _fake_wandb():
  """A stand-in for the wandb module that records init kwargs, log calls and finish."""
  fake = types.SimpleNamespace(inits=[], runs=[])

  def init(**kwargs):
    run = types.SimpleNamespace(logged=[], finished=False)
    run.log = lambda data, step: run.logged.append((step, data))
    run.finish = lambda: setattr(run, "finished", True)
    fake.inits.append(kwargs)
    fake.runs.append(run)
    return run

  fake.init = init
  return fake


def test_wandb_writer_keeps_one_run_id_per_workdir(tmp_path, monkeypatch):
  fake = _fake_wandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  workdir = str(tmp_path / "run")
  config = {"lr": 1e-6, "task": "arith"}
  first = writers.WandbWriter("proj", workdir=workdir, run_name="grpo", config=config,
                              mode="offline")
  first.write(1, {"reward/mean": 0.5})
  first.write(2, {"reward/mean": 0.6, "kl/step": 1e-5})
  first.close()
  first.close()  # a second close does nothing
  resumed = writers.WandbWriter("proj", workdir=workdir, run_name="grpo", config=config,
                                mode="offline", entity="team")
  resumed.close()

  assert fake.inits[0] == {"project": "proj", "entity": None, "name": "grpo", "dir": workdir,
                           "config": config, "mode": "offline", "id": first.run_id,
                           "resume": "allow"}
  assert fake.inits[1]["id"] == first.run_id and fake.inits[1]["entity"] == "team"
  with open(os.path.join(workdir, "wandb_id.txt")) as f:
    assert f.read().strip() == first.run_id
  assert fake.runs[0].logged == [(1, {"reward/mean": 0.5}),
                                 (2, {"reward/mean": 0.6, "kl/step": 1e-5})]
  assert fake.runs[0].finished and fake.runs[1].finished

  other = writers.WandbWriter("proj", workdir=str(tmp_path / "other"), run_name=None,
                              config={}, resume_id="abc123")
  assert other.run_id == "abc123" and fake.inits[2]["id"] == "abc123"
  assert fake.inits[2]["mode"] == "online"


def test_make_writers_adds_wandb_when_a_project_is_set(tmp_path, monkeypatch):
  fake = _fake_wandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  cfg = ml_collections.ConfigDict({"tensorboard": True, "wandb_project": "proj",
                                   "wandb_entity": "team", "wandb_mode": "offline"})
  with writers.make_writers(cfg, str(tmp_path), start_step=0, run_name="r",
                            config_dict={"seed": 0}) as sinks:
    assert [type(w) for w in sinks.writers] == [writers.TensorBoardWriter, writers.WandbWriter]
    sinks.write(1, {"a": 1.0})
  assert fake.runs[0].logged == [(1, {"a": 1.0})] and fake.runs[0].finished
  assert fake.inits[0]["entity"] == "team" and fake.inits[0]["config"] == {"seed": 0}
  assert writers.read_scalars(str(tmp_path / "tensorboard")) == {"a": [(1, 1.0)]}


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
