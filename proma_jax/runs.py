"""A training run's directory read back: its config (run.json) and the parameters of a checkpoint.

`train.run` leaves in a workdir run.json ({"config": ..., "checkpoint_fingerprint": ...}) and
checkpoints/<step>/ (orbax, `checkpoint.Checkpointer`) holding {"params", "opt_state"}. The
commands that use a trained policy outside training (`proma_jax.export`, `proma_jax.evaluate`)
read the parameters alone: no optimizer is built and the optimizer state is not read.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from proma_jax.checkpoint import Checkpointer
from proma_jax.models import loading

_PARAMS = "['params']"
_KEY = re.compile(r"\['([^']*)'\]|\[(\d+)\]")


class RunError(ValueError):
  """A workdir that is not a readable training run, or lacks the asked-for checkpoint."""


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the run in `workdir` was started (or last resumed) with, from its run.json."""
  return ml_collections.ConfigDict(run_meta(workdir)["config"])


def run_meta(workdir: str) -> dict[str, Any]:
  """The run's run.json, read once and checked to hold a config (else RunError)."""
  path = os.path.join(workdir, "run.json")
  if not os.path.isfile(path):
    raise RunError(f"{workdir}: not a training run directory (no run.json)")
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
    _ = meta["config"]  # a run record holds its config
  except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
    raise RunError(f"{path}: unreadable run record ({type(e).__name__}: {e})") from None
  return meta


def _path(keystr: str) -> tuple:
  """The key tuple of a `jax.tree_util.keystr` path ("['layers'][3]['mlp']" -> ("layers", 3,
  "mlp"))."""
  return tuple(int(index) if index else name for name, index in _KEY.findall(keystr))


def read_params(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """(step, pure parameter dict of NumPy arrays) of the run's checkpoint at `step` (None: the
  latest). Raises RunError when there is no checkpoint, naming the steps there are."""
  directory = os.path.join(workdir, "checkpoints")
  checkpointer = Checkpointer(directory) if os.path.isdir(directory) else None
  steps = [] if checkpointer is None else checkpointer.all_steps()
  if not steps:
    raise RunError(f"{workdir}: no checkpoint under {directory}")
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise RunError(f"{workdir}: no checkpoint at step {step}; the steps there are {steps}")
  leaves = checkpointer.restore_leaves(step, _PARAMS)
  flat = {_path(key)[1:]: np.asarray(leaf) for key, leaf in leaves.items()}
  return step, traverse_util.unflatten_dict(flat)


def check_source(workdir: str) -> str:
  """The pretrained checkpoint spec the run started from, checked to hold the same files as when
  the run recorded them (a changed tokenizer or config would silently mislabel the export)."""
  meta = run_meta(workdir)
  spec = ml_collections.ConfigDict(meta["config"]).model.get("checkpoint")
  if not spec:
    raise RunError(f"{workdir}: this run trained the tiny character-level decoder "
                   "(config.model.checkpoint is None); only runs of a pretrained checkpoint "
                   "(Qwen3, Llama, SmolLM2) have a Hugging Face architecture to export")
  recorded = meta.get("checkpoint_fingerprint")
  if recorded is not None:
    now = loading.checkpoint_fingerprint(spec)
    changed = sorted(f for f in set(recorded) | set(now) if recorded.get(f) != now.get(f))
    if changed:
      raise RunError(f"{workdir}: the run's checkpoint {spec} no longer holds the files the run "
                     f"started from (changed: {changed})")
  return spec
