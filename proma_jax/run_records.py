"""The records of a run in its workdir, and the checks that keep one workdir one experiment.

  run.json        the config (and checkpoint fingerprint) a run started from (`write_run_json`):
                  a resumed run must match it except in RESUMABLE_FIELDS (`check_resume_config`,
                  `check_checkpoint_fingerprint`), else ConfigChangedError names every change
  metrics.jsonl   cut back to the restored checkpoint's step on resume (`truncate_metrics`)
  .lock           held by the one run using the workdir (`workdir_lock`, WorkdirLockedError)

Files are replaced atomically (`write_atomically`): a reader sees the old file or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from typing import Any

from absl import logging

from proma_jax.config import is_finite_number

# Config fields that may differ between a run and its resumption without --allow_config_change:
# they say how long to run, where to cache, how often to checkpoint or evaluate, and how this
# process reaches the others, none of what a step computes. A field listed here covers its subfields.
RESUMABLE_FIELDS = ("steps", "checkpoint.every", "checkpoint.max_to_keep", "eval.every",
                    "sft.checkpoint_dir", "distributed.coordinator", "distributed.process_id",
                    "logging", "mesh.data", "mesh.fsdp", "mesh.fsdp_min_size",
                    # fused or not, the same result to float rounding (tests/test_fused.py); runs
                    # started before the field existed resume with it
                    "proma.fused",
                    # the same parameters in another layout; checkpoints restore in either
                    "model.scan_layers")
# ...but in local data-parallel mode the number of devices changes what a step computes.
_LOCAL_MODE_FIELDS = ("mesh.data",)
# Fields that config files gained after runs were recorded without them, with the value their
# absence meant (the task factory's default): a run recorded without one resumes under a config
# that has it at that value; any other value is a change.
_ADDED_AT_DEFAULT = {"task_kwargs.too_long": "error", "task_kwargs.hf_dataset": None}


class ConfigChangedError(ValueError):
  """The workdir holds a run whose config differs from the new one in a field that matters."""


class WorkdirLockedError(RuntimeError):
  """Another process holds the workdir's lock: a run is already using it."""


_ABSENT = "<absent>"


def config_changes(old: dict, new: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
  """{dotted field: (old, new)} for every leaf of two JSON configs that differs (or is missing)."""
  changes = {}
  for key in sorted(set(old) | set(new), key=str):
    a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
    if isinstance(a, dict) and isinstance(b, dict):
      changes.update(config_changes(a, b, f"{prefix}{key}."))
    elif a != b or type(a) is not type(b) and not (is_finite_number(a) and is_finite_number(b)):
      changes[f"{prefix}{key}"] = (a, b)
  return changes


def check_checkpoint_fingerprint(workdir: str, previous: dict, fingerprint: dict | None,
                                 allow_config_change: bool) -> dict[str, tuple[Any, Any]]:
  """{"model.checkpoint (files)": (old, new)} when the files at `model.checkpoint` differ from
  those the run in `workdir` started from (`loading.checkpoint_fingerprint`, kept in run.json),
  else {}. Raises ConfigChangedError naming the changed files unless `allow_config_change`: the
  path may be the same while the model is not, and kl/init would then be measured against it.
  Runs recorded before fingerprints existed resume as before."""
  old = previous.get("checkpoint_fingerprint")
  if old is None or fingerprint is None or old == fingerprint:
    return {}
  changed = sorted(name for name in set(old) | set(fingerprint)
                   if old.get(name) != fingerprint.get(name))
  if not allow_config_change:
    raise ConfigChangedError(
        f"{os.path.join(workdir, 'run.json')}: the files of model.checkpoint differ from those this "
        f"run started from ({', '.join(changed)}); resume with the original checkpoint, start a "
        "new --workdir, or pass --allow_config_change (run(..., allow_config_change=True))")
  return {"model.checkpoint (files)": (old, fingerprint)}


def _is_resumable(field: str) -> bool:
  return any(field == f or field.startswith(f + ".") for f in RESUMABLE_FIELDS)


def check_resume_config(workdir: str, config: dict, allow_config_change: bool) -> tuple[dict, dict]:
  """(the previous run.json or {}, its overridden changes {field: (old, new)}).

  Raises ConfigChangedError naming every differing field other than RESUMABLE_FIELDS, unless
  `allow_config_change`.
  """
  path = os.path.join(workdir, "run.json")
  if not os.path.exists(path):
    return {}, {}
  hint = ("continue with the stored config, start a new --workdir, or pass --allow_config_change "
          "(run(..., allow_config_change=True)) to continue this run under the new config")
  try:
    with open(path) as f:
      previous = json.load(f)
    stored = previous["config"]
    if not isinstance(stored, dict):
      raise TypeError(f"'config' is a {type(stored).__name__}")
  except (OSError, ValueError, KeyError, TypeError) as e:
    if not allow_config_change:
      raise ConfigChangedError(
          f"{path} holds no readable config ({type(e).__name__}: {e}), so this run cannot be "
          f"checked against it; {hint}") from None
    logging.warning("%s holds no readable config (%s); continuing under the new config", path, e)
    return {}, {"<run.json>": ("unreadable", "replaced")}
  local = "local" in (stored.get("mesh", {}).get("mode"), config.get("mesh", {}).get("mode"))
  changes = {field: change for field, change in config_changes(stored, config).items()
             if (not _is_resumable(field) or (local and field in _LOCAL_MODE_FIELDS)) and
             not (field in _ADDED_AT_DEFAULT and change == (_ABSENT, _ADDED_AT_DEFAULT[field]))}
  if changes and not allow_config_change:
    lines = "\n".join(f"  config.{field}: {json.dumps(old, default=str)} -> "
                      f"{json.dumps(new, default=str)}" for field, (old, new) in changes.items())
    raise ConfigChangedError(
        f"{workdir} holds a run with a different config (run.json); resuming it would mix two "
        f"experiments in one record. Differing fields (stored -> new):\n{lines}\nFix: {hint}. "
        f"Fields that may change on resume: {', '.join(RESUMABLE_FIELDS)}.")
  if changes:
    print(f"{workdir}: continuing under a changed config (--allow_config_change): "
          + ", ".join(f"config.{f}" for f in changes))
  return previous, changes


def write_atomically(path: str, data: bytes) -> None:
  """Writes `path` through a temporary file and os.replace: readers see the old or the new file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_run_json(workdir: str, meta: dict, previous: dict, changes: dict[str, tuple[Any, Any]],
                   start: int, fingerprint: dict | None) -> None:
  """Writes `<workdir>/run.json`: `meta` (what the run is, its config), the config changes of
  the previous run.json with this start's `changes` appended ("config_changes", where any), and
  the checkpoint's file fingerprint (`check_checkpoint_fingerprint`)."""
  history = list(previous.get("config_changes", []))
  if changes:
    history.append({"step": start, "changes": {f: list(v) for f, v in changes.items()}})
  if history:
    meta["config_changes"] = history
  if fingerprint is not None:
    meta["checkpoint_fingerprint"] = fingerprint
  write_atomically(os.path.join(workdir, "run.json"), json.dumps(meta, indent=1).encode())


def truncate_metrics(path: str, step: int | None) -> int:
  """Cuts `metrics.jsonl` back to the records of a restored checkpoint; returns lines dropped.

  Keeps, in order and byte for byte, the complete lines (newline-terminated) holding a JSON
  record whose "step" is <= `step` (the step-0 validation record included); drops any line past
  the checkpoint (logged before a crash, and about to be recomputed), a partial last line, and
  anything unreadable. `step=None` (nothing restored: the run starts over) empties the file.
  """
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")  # the last element is b"" or a line cut short
  kept = []
  for line in lines[:-1]:
    try:
      record = json.loads(line)
      keep = step is not None and record["step"] <= step
    except (ValueError, KeyError, TypeError):
      keep = False
    if keep:
      kept.append(line + b"\n")
  dropped = len(lines) - 1 - len(kept) + (lines[-1] != b"")
  if dropped:
    write_atomically(path, b"".join(kept))
  return dropped


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds an exclusive fcntl lock on `<workdir>/.lock` (which names the holder) for the block.

  Raises WorkdirLockedError at once, naming the holder's pid, when another process holds it.
  The kernel releases the lock when the holder exits, however it exits (SIGKILL included).
  """
  path = os.path.join(workdir, ".lock")
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 256, 0).decode(errors="replace").split()
      who = f"pid {holder[0]} on host {holder[1]}" if len(holder) >= 2 else "a process"
      raise WorkdirLockedError(
          f"{workdir} is in use by another run ({who}, holding {path}); wait for it to finish "
          "or stop it, or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)
  finally:
    os.close(fd)  # releases the lock
