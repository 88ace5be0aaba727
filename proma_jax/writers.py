"""Experiment-logging sinks besides metrics.jsonl: TensorBoard event files and Weights & Biases.

Every sink is a `MetricWriter`: `write(step, metrics)` once per step with the same flat dict of
floats that goes to metrics.jsonl ("reward/mean", "kl/step", "val/accuracy", ...), then `close()`.
`make_writers` builds the sinks a run's `config.logging` asks for and returns them as one
`MultiWriter`, which keeps training going when a sink fails.

  config.logging.tensorboard    bool, default True: event files under <workdir>/tensorboard/
                                (`tensorboard --logdir <workdir>/tensorboard`).
  config.logging.wandb_project  str or None, default None: a W&B project to log to as well.
  config.logging.wandb_entity   str or None, default None: the W&B user or team (None: the
                                account's default).
  config.logging.wandb_mode     "online" (default), "offline" (no network: the run is kept under
                                <workdir>/wandb/ and uploaded later with `wandb sync`) or
                                "disabled" (no W&B, and the wandb package is not imported).

Resuming. A run resumed from the checkpoint at step `start` keeps the records of steps <= start
and recomputes the later ones (metrics.jsonl is cut back the same way). Each run (fresh or
resumed) opens a new event file in <workdir>/tensorboard/ whose first events are a purge marker
(the `file_version` and `SessionLog.START` events that tensorboardX's `purge_step` writes) at
step start + 1, or 0 when nothing was restored. TensorBoard's Python loader (`--load_fast=false`)
then hides every event the killed attempt logged past `start`; its Rust loader ignores the marker
but drops a tag's points at and after a step logged again, so a tag is right again once the
resumed run logs it. The W&B sink continues the same W&B run: its id is kept in
<workdir>/wandb_id.txt and passed with resume="allow".

In a multi-process run, only process 0 should build and write the sinks.

Usage:

  validate_logging_config(c.logging)  # before compiling anything
  with make_writers(c.logging, workdir, start_step=start, run_name=name,
                    config_dict=config) as writers:
    for step in ...:
      writers.write(step, metrics)
"""

from __future__ import annotations

import logging
import os
import struct
import time
import uuid
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
from tensorboardX import event_file_writer
from tensorboardX import record_writer
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2

log = logging.getLogger(__name__)

# config.logging's fields and their defaults; a field missing from the config takes its default.
LOGGING_DEFAULTS = {
    "tensorboard": True,
    "wandb_project": None,
    "wandb_entity": None,
    "wandb_mode": "online",
}
WANDB_MODES = ("online", "offline", "disabled")
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id.txt"


class MetricWriter(Protocol):
  """A sink for the per-step metrics of a run."""

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Logs the metrics of `step`."""

  def close(self) -> None:
    """Flushes and releases the sink; no `write` after it."""


def _as_float(value: Any) -> float | None:
  """`value` as a Python float when it is one real number (a 0-d array included); else None."""
  if isinstance(value, (str, bytes)):
    return None
  try:
    array = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return None
  if array.shape != () or array.dtype.kind not in "biuf":
    return None
  return float(array)


class TensorBoardWriter:
  """Writes each step's numeric metrics as TensorBoard scalars, one event file per writer.

  Each `write` appends one event holding every finite numeric metric as a scalar under its key
  (TensorBoard groups keys by the part before the first "/") and fsyncs the file, so a kill loses
  nothing already written; a value that is not a real number, or is NaN or infinite, is skipped
  with one warning per key. Values are stored as float32.

  `purge_step` (not None) starts the file with tensorboardX's purge marker at that step.
  TensorBoard's Python loader takes a directory's first marker for the run's start and each later
  one for a restart, hiding the events logged before it with step >= its step (by a run that was
  killed and is now resumed); so give every writer of a directory a marker, at 0 for a fresh run,
  as `make_writers` does. The events are written synchronously, not through
  tensorboardX's `SummaryWriter`, whose `flush` does not wait for its background thread (a kill
  right after `flush` loses the last events) and whose file names collide (the later file
  overwrites the earlier one) when two writers open the same directory within one second.

  Args:
    logdir: the directory of the event files; created if missing.
    purge_step: the first step the purge marker hides, or None for no marker.
  """

  def __init__(self, logdir: str, purge_step: int | None):
    os.makedirs(logdir, exist_ok=True)
    # The nanosecond suffix keeps file names unique and in creation order within one second.
    self._events = event_file_writer.EventsWriter(os.path.join(logdir, "events"),
                                                  filename_suffix=f".{time.time_ns()}")
    if purge_step is not None:
      now = time.time()
      self._events.write_event(event_pb2.Event(wall_time=now, step=purge_step,
                                               file_version="brain.Event:2"))
      self._events.write_event(event_pb2.Event(
          wall_time=now, step=purge_step,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    self._events.flush()
    self._warned: set[str] = set()
    self._closed = False

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    values = []
    for key, value in metrics.items():
      number = _as_float(value)
      if number is None or not np.isfinite(number):
        if key not in self._warned:
          self._warned.add(key)
          log.warning("TensorBoard: skipping %s = %r at step %d (%s; warned once per key)", key,
                      value, step, "not a number" if number is None else "not finite")
        continue
      values.append(summary_pb2.Summary.Value(tag=key, simple_value=number))
    if values:
      self._events.write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                               summary=summary_pb2.Summary(value=values)))
      self._events.flush()

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._events.close()


class WandbWriter:
  """Logs each step's metrics to a Weights & Biases run, the same run across resumes.

  The run id is kept in <workdir>/wandb_id.txt (`resume_id` overrides and replaces it; without
  either a new id is drawn) and `wandb.init` gets resume="allow", so a resumed training run keeps
  logging to the W&B run it started. Online, W&B ignores a logged step below the run's latest
  step: after a resume, the recomputed steps the killed attempt had already logged keep the
  values it logged.

  Each writer starts and finishes a run of its own (`reinit="create_new"`): with wandb's default
  outside notebooks, `wandb.init` hands back any run still active in the process, so a second
  writer opened before the first was closed would log into the first one's run (another id, maybe
  another project) and its `close` would finish that run.

  `mode="offline"` needs no network or account: each attempt (the first and every resume) keeps
  its records in a directory of its own, <workdir>/wandb/offline-run-<start time>-<run id>, all
  with the same run id, uploaded later with `wandb sync <workdir>/wandb/offline-run-*`.
  `mode="disabled"` makes every call a no-op.

  Args:
    project: the W&B project.
    workdir: the run directory; W&B's files go to <workdir>/wandb/.
    run_name: the display name of the W&B run (None: W&B picks one).
    config: the run's config, recorded with the W&B run.
    mode: "online", "offline" or "disabled".
    entity: the W&B user or team (None: the account's default).
    resume_id: the id of the W&B run to continue (None: the one in wandb_id.txt, if any).

  Raises:
    ImportError: the optional `wandb` package is not installed.
  """

  def __init__(self, project: str, *, workdir: str, run_name: str | None,
               config: Mapping[str, Any], mode: str = "online", entity: str | None = None,
               resume_id: str | None = None):
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("logging to W&B (config.logging.wandb_project) needs the optional wandb "
                        "package: pip install wandb") from e
    os.makedirs(workdir, exist_ok=True)
    id_path = os.path.join(workdir, WANDB_ID_FILE)
    stored_id = _read_run_id(id_path)
    run_id = resume_id or stored_id or uuid.uuid4().hex[:12]
    if run_id != stored_id:
      tmp = id_path + ".tmp"
      with open(tmp, "w") as f:
        f.write(run_id + "\n")
      os.replace(tmp, id_path)
    self.run_id = run_id
    self._run = wandb.init(project=project, entity=entity, name=run_name, dir=workdir,
                           config=dict(config), mode=mode, id=run_id, resume="allow",
                           reinit="create_new")

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    self._run.log(dict(metrics), step=int(step))

  def close(self) -> None:
    if self._run is not None:
      run, self._run = self._run, None
      run.finish()


def _read_run_id(path: str) -> str | None:
  """The W&B run id stored at `path`, or None when there is none."""
  try:
    with open(path) as f:
      return f.read().strip() or None
  except FileNotFoundError:
    return None


class MultiWriter:
  """Forwards `write` and `close` to several sinks; a failing sink is disabled, never fatal.

  A sink whose `write` raises is logged (one warning, with the error) and gets no further writes;
  the others go on. An error in a sink's `close` is logged too. Usable as a context manager that
  closes the sinks on exit.
  """

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)
    self._failed: set[int] = set()

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    for i, writer in enumerate(self.writers):
      if i in self._failed:
        continue
      try:
        writer.write(step, metrics)
      except Exception:  # pylint: disable=broad-except
        self._failed.add(i)
        log.warning("%s failed at step %d and is disabled for the rest of the run",
                    type(writer).__name__, step, exc_info=True)

  def close(self) -> None:
    for writer in self.writers:
      try:
        writer.close()
      except Exception:  # pylint: disable=broad-except
        log.warning("%s failed to close", type(writer).__name__, exc_info=True)

  def __enter__(self) -> MultiWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _logging_fields(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
  """config.logging as a plain dict, LOGGING_DEFAULTS filling the missing fields."""
  fields = dict(LOGGING_DEFAULTS)
  if cfg is not None:
    fields.update(cfg.items())
  return fields


def validate_logging_config(cfg: Mapping[str, Any] | None) -> None:
  """Raises ValueError naming the first invalid field of config.logging (`config.logging.<f>`).

  Args:
    cfg: config.logging, an ml_collections.ConfigDict or a dict (None: all defaults); missing
      fields take LOGGING_DEFAULTS. Fields other than those are left alone.
  """
  fields = _logging_fields(cfg)

  def need(ok: bool, field: str, message: str):
    if not ok:
      raise ValueError(f"config.logging.{field}: {message}, got {fields[field]!r}")

  need(isinstance(fields["tensorboard"], bool), "tensorboard", "must be True or False")
  for field in ("wandb_project", "wandb_entity"):
    value = fields[field]
    need(value is None or (isinstance(value, str) and value.strip() != ""), field,
         "must be None or a non-empty string")
  need(fields["wandb_mode"] in WANDB_MODES, "wandb_mode", f"must be one of {WANDB_MODES}")


def make_writers(logging_config: Mapping[str, Any] | None, workdir: str, *, start_step: int,
                 run_name: str | None, config_dict: Mapping[str, Any]) -> MultiWriter:
  """The sinks config.logging asks for, as one MultiWriter.

  Args:
    logging_config: config.logging (see the module docstring); validated here first.
    workdir: the run directory.
    start_step: the step the run starts from: the restored checkpoint's step, 0 when nothing was
      restored. The TensorBoard file starts with a purge marker at start_step + 1 (at 0 when
      start_step is 0, as metrics.jsonl is emptied then), hiding what an earlier attempt logged
      in <workdir>/tensorboard/ past the records metrics.jsonl keeps.
    run_name: the W&B run's display name.
    config_dict: the run's config as a JSON-like dict, recorded with the W&B run.

  Returns:
    A MultiWriter over a TensorBoardWriter (config.logging.tensorboard) and a WandbWriter
    (config.logging.wandb_project set and wandb_mode not "disabled"); it may hold none.

  Raises:
    ValueError: an invalid config.logging field.
    ImportError: W&B is asked for and the wandb package is not installed.
  """
  validate_logging_config(logging_config)
  fields = _logging_fields(logging_config)
  writers: list[MetricWriter] = []
  if fields["tensorboard"]:
    # A fresh run's marker (step 0, hiding nothing) matters too: TensorBoard's Python loader takes
    # a run's first SessionLog.START for its start and only the later ones for restarts.
    purge_step = start_step + 1 if start_step > 0 else 0
    writers.append(TensorBoardWriter(os.path.join(workdir, TENSORBOARD_DIR), purge_step))
  if fields["wandb_project"] is not None and fields["wandb_mode"] != "disabled":
    writers.append(WandbWriter(fields["wandb_project"], workdir=workdir, run_name=run_name,
                               config=config_dict, mode=fields["wandb_mode"],
                               entity=fields["wandb_entity"]))
  return MultiWriter(writers)


def read_events(logdir: str) -> list[event_pb2.Event]:
  """Every event of the event files in `logdir` (not its subdirectories), raw, in file order.

  Files are read in name order (their creation order), each record by its TFRecord framing:
  8-byte little-endian length, 4-byte masked CRC-32C of the length, payload, 4-byte masked
  CRC-32C of the payload. A record cut short at the end of a file (a kill mid-write) ends that
  file silently; a CRC mismatch ends it with a warning. Purge markers are returned as they are,
  not applied. Checking the CRCs in Python costs about 0.3 s per MB.
  """
  events = []
  for name in sorted(n for n in os.listdir(logdir) if "tfevents" in n):
    path = os.path.join(logdir, name)
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack("<Q", header)
      (header_crc,) = struct.unpack_from("<I", data, pos + 8)
      payload = data[pos + 12:pos + 12 + length]
      if header_crc != record_writer.masked_crc32c(header):
        log.warning("%s: bad length checksum at byte %d; ignoring the rest of the file", path, pos)
        break
      if pos + 16 + length > len(data):
        break
      (payload_crc,) = struct.unpack_from("<I", data, pos + 12 + length)
      if payload_crc != record_writer.masked_crc32c(payload):
        log.warning("%s: bad record checksum at byte %d; ignoring the rest of the file", path, pos)
        break
      events.append(event_pb2.Event.FromString(payload))
      pos += 16 + length
  return events
