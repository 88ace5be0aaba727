"""Synchronous orbax checkpoints of a training-state pytree, with fallback past corrupt steps.

A checkpoint at step `s` lives in `<directory>/<s>/` and holds three orbax items:

  state   the leaves of the state pytree, flattened in `jax.tree.leaves` order and stored as a
          dict {"000000": leaf_0, "000001": leaf_1, ...} of NumPy arrays;
  layout  JSON: per leaf, its key path, shape, dtype and the CRC-32 of its bytes;
  meta    JSON: whatever the caller passes (data position, config hash, ...).

Restoring unflattens the stored leaves with the TEMPLATE's treedef and casts each leaf back to
the template leaf's kind (jax.Array, np.ndarray, Python scalar or typed PRNG key), so the result
has exactly the template's structure and dtypes, NamedTuple optimizer states included. Because
orbax only sees a flat dict of arrays, no pytree node type has to be registered with it.

`restore` walks the steps from newest to oldest and returns the first one that restores and
passes the layout checks; every step that fails is logged with the reason. A template whose
structure differs from a readable layout raises instead of falling back: that is a changed
model or optimizer, not a damaged file, and silently starting from scratch would be wrong.

Usage:

  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3)
  restored = ckpt.restore(state)
  if restored is not None:
    step, state, meta = restored
  ...
  ckpt.save(step, state, {"data_position": position})
  ckpt.close()
"""

from __future__ import annotations

import logging
import numbers
import os
import zlib
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

_STATE, _LAYOUT, _META = "state", "layout", "meta"
_MAX_REASON_CHARS = 400  # tensorstore errors embed whole JSON specs; keep the useful start


class IncompatibleCheckpointError(ValueError):
  """A readable checkpoint whose pytree structure, shapes or dtypes differ from the template."""


def _is_typed_key(leaf: Any) -> bool:
  return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_numpy(leaf: Any) -> np.ndarray:
  """A host NumPy copy of one leaf; typed PRNG keys are stored as their uint32 key data."""
  if _is_typed_key(leaf):
    leaf = jax.random.key_data(leaf)
  return np.asarray(jax.device_get(leaf))


def _from_numpy(array: np.ndarray, template_leaf: Any) -> Any:
  """`array` converted to the kind of `template_leaf` (the inverse of `_to_numpy`)."""
  if _is_typed_key(template_leaf):
    return jax.random.wrap_key_data(array, impl=jax.random.key_impl(template_leaf))
  if isinstance(template_leaf, jax.Array):
    return jax.numpy.asarray(array)
  if isinstance(template_leaf, np.ndarray):
    return array
  if isinstance(template_leaf, np.generic):
    return array[()]
  return type(template_leaf)(array.item())


def _stored_spec(leaf: Any) -> tuple[list[int], str]:
  """(shape, dtype) that `_to_numpy(leaf)` will have, without copying the leaf to the host."""
  if _is_typed_key(leaf):
    leaf = jax.eval_shape(jax.random.key_data, leaf)
  if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
    leaf = np.asarray(leaf)
  return list(leaf.shape), str(np.dtype(leaf.dtype))


def _checksum(array: np.ndarray) -> int:
  return zlib.crc32(np.ascontiguousarray(array).tobytes())


def _leaf_key(i: int) -> str:
  return f"{i:06d}"


class Checkpointer:
  """Keeps the newest `max_to_keep` checkpoints of a state pytree under `directory`.

  Saves are synchronous: `save` returns only once the step directory is complete on disk, so a
  signal handler may call `save` and exit immediately.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3):
    if (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, numbers.Integral)
        or max_to_keep < 1):
      # orbax reads 0 as "keep nothing" and None as "keep everything": neither is asked for here.
      raise ValueError(f"max_to_keep must be an integer >= 1, got {max_to_keep!r}")
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(_STATE, _LAYOUT, _META)
    )

  def all_steps(self) -> list[int]:
    """The steps with a finalised checkpoint directory, ascending (corrupt ones included)."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest step with a finalised checkpoint directory, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None) -> None:
    """Writes `state` (a pytree of arrays) and the JSON-able `meta` as the checkpoint of `step`.

    Checkpoints at steps >= `step` are deleted first: they belong to a run that was abandoned
    by resuming from an earlier step (after a corrupt newest checkpoint), and keeping them would
    make them "latest" again on the next restore.
    """
    step = int(step)
    for stale in [s for s in self.all_steps() if s >= step]:
      log.warning("Deleting checkpoint at step %d in %s: it is not older than the step being "
                  "saved (%d).", stale, self.directory, step)
      self._manager.delete(stale)
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    arrays = [_to_numpy(leaf) for _, leaf in paths_and_leaves]
    layout = {"leaves": [
        {"path": jax.tree_util.keystr(path), "shape": list(a.shape), "dtype": str(a.dtype),
         "crc32": _checksum(a)} for (path, _), a in zip(paths_and_leaves, arrays)]}
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave({_leaf_key(i): a for i, a in enumerate(arrays)}),
        _LAYOUT: ocp.args.JsonSave(layout),
        _META: ocp.args.JsonSave(dict(meta or {})),
    })
    if not self._manager.save(step, args=args, force=True):
      raise RuntimeError(f"orbax declined to save step {step} in {self.directory}")
    self._manager.wait_until_finished()

  def restore(self, template_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest restorable checkpoint, or None if there is none.

    `template_state` supplies the pytree structure and the kind of each leaf. A checkpoint that
    fails to restore (missing, truncated or garbled files, checksum mismatch) is logged as a
    warning naming its step and the reason, and the next older one is tried.

    Raises:
      IncompatibleCheckpointError: a readable checkpoint was written for a different structure.
    """
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(template_state)
    template_leaves = [leaf for _, leaf in paths_and_leaves]
    expected = [[jax.tree_util.keystr(path), *_stored_spec(leaf)]
                for path, leaf in paths_and_leaves]
    for step in reversed(self.all_steps()):
      try:
        layout = self._restore_item(step, _LAYOUT, ocp.args.JsonRestore())
        found = [[e["path"], e["shape"], e["dtype"]] for e in layout["leaves"]]
        if found != expected:
          raise IncompatibleCheckpointError(
              f"checkpoint at step {step} in {self.directory} holds a different state structure "
              f"than the template (first difference: {_first_difference(found, expected)}); "
              "restore with the matching model/optimizer configuration or use a new directory.")
        stored = self._restore_item(step, _STATE, ocp.args.StandardRestore(
            {_leaf_key(i): np.zeros(entry["shape"], entry["dtype"])
             for i, entry in enumerate(layout["leaves"])}))
        arrays = [np.asarray(stored[_leaf_key(i)]) for i in range(len(template_leaves))]
        for array, entry in zip(arrays, layout["leaves"]):
          if [list(array.shape), str(array.dtype), _checksum(array)] != [
              entry["shape"], entry["dtype"], entry["crc32"]]:
            raise ValueError(f"leaf {entry['path']} does not match its recorded checksum")
        meta = self._restore_item(step, _META, ocp.args.JsonRestore())
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        reason = str(e).splitlines()[0][:_MAX_REASON_CHARS] if str(e) else ""
        log.warning("Checkpoint at step %d in %s is unreadable (%s: %s); trying an older one.",
                    step, self.directory, type(e).__name__, reason)
        continue
      state = jax.tree.unflatten(
          treedef, [_from_numpy(a, t) for a, t in zip(arrays, template_leaves)])
      return step, state, dict(meta)
    return None

  def close(self) -> None:
    """Waits for pending work and releases the orbax manager."""
    self._manager.close()

  def _restore_item(self, step: int, name: str, item_args: Any) -> Any:
    restored = self._manager.restore(step, args=ocp.args.Composite(**{name: item_args}))
    if restored[name] is None:
      raise FileNotFoundError(f"item {name!r} is missing")
    return restored[name]


def _first_difference(found: list[list[Any]], expected: list[list[Any]]) -> str:
  """A short description of where two (path, shape, dtype) leaf lists first differ."""
  for f, e in zip(found, expected):
    if f != e:
      return f"stored {f} vs template {e}"
  return f"{len(found)} stored leaves vs {len(expected)} in the template"
