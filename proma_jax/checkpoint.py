"""Synchronous orbax checkpoints of a training-state pytree, with fallback past corrupt steps.

A checkpoint at step `s` lives in `<directory>/<s>/` and holds three orbax items:

  state   the leaves of the state pytree, flattened in `jax.tree.leaves` order and stored as a
          dict {"000000": leaf_0, "000001": leaf_1, ...};
  layout  JSON: per leaf, its key path, shape, dtype and a checksum of its values;
  meta    JSON: whatever the caller passes (data position, config hash, ...).

jax.Array leaves are handed to orbax as they are: each process writes the shards its devices hold
(a replicated array once), and restoring reads each leaf straight onto the template leaf's
sharding, which may belong to another mesh shape than the one that saved it. No process ever
holds a whole sharded leaf in host memory. Their checksum ("sum32") is computed on the devices,
on the global array: the sum mod 2^32 of every element's bits times an odd weight of its flat
index. Integer sums do not depend on how the array is split, so the check is the same on any
mesh, and any single changed element changes it (it is a corruption check, not a cryptographic
hash). Other leaves (NumPy arrays, Python scalars, typed PRNG keys, stored as their uint32 key
data) go through host memory and are checked by the CRC-32 of their bytes ("crc32"), as every
leaf of older checkpoints is.

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
import jax.numpy as jnp
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
  if isinstance(template_leaf, jax.Array):  # onto the template's devices and sharding
    return jax.device_put(array, template_leaf.sharding)
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


_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _on_devices(leaf: Any) -> bool:
  """Whether `leaf` is saved from and restored onto devices (and checked by `_sum32`): a
  jax.Array of whole 1-, 2- or 4-byte elements that is not a PRNG key and, in a multi-process
  run, spans the processes (orbax refuses to write an array local to one process's devices)."""
  return (isinstance(leaf, jax.Array) and not _is_typed_key(leaf)
          and np.dtype(leaf.dtype).itemsize in _UNSIGNED
          and jax.dtypes.itemsize_bits(leaf.dtype) == 8 * np.dtype(leaf.dtype).itemsize
          and (jax.process_count() == 1 or not leaf.is_fully_addressable))


def _sum32(x: jax.Array) -> jax.Array:
  """sum_i bits(x_i) * w_i mod 2^32 over the flat index i, with odd weights w_i: a uint32 that
  any single changed element changes, computed shard-locally plus one integer all-reduce."""
  bits = (x.astype(jnp.uint32) if x.dtype == jnp.bool_ else
          jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32))
  index, stride = jnp.zeros(x.shape, jnp.uint32), 1
  for dim in reversed(range(x.ndim)):  # the flat index, built from per-axis iotas (partitionable)
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * jnp.uint32(stride)
    stride = (stride * x.shape[dim]) % 2**32
  weight = (index * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)) | jnp.uint32(1)
  return jnp.sum(bits * weight, dtype=jnp.uint32)


@jax.jit
def _device_checksums(leaves: list[jax.Array]) -> list[jax.Array]:
  return [_sum32(x) for x in leaves]


def _device_entries(leaves: list[jax.Array]) -> list[int]:
  """The `_sum32` of each leaf, as Python ints (one compiled call for all of them)."""
  return [int(np.asarray(c)) for c in _device_checksums(leaves)] if leaves else []


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
    on_devices = [_on_devices(leaf) for _, leaf in paths_and_leaves]
    arrays = [leaf if device else _to_numpy(leaf)
              for device, (_, leaf) in zip(on_devices, paths_and_leaves)]
    sums = iter(_device_entries([a for a, device in zip(arrays, on_devices) if device]))
    layout = {"leaves": [
        {"path": jax.tree_util.keystr(path), "shape": list(a.shape), "dtype": str(np.dtype(a.dtype)),
         **({"sum32": next(sums)} if device else {"crc32": _checksum(a)})}
        for (path, _), a, device in zip(paths_and_leaves, arrays, on_devices)]}
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
      # In a multi-process run each process reads its own shards, so a damaged file may fail on
      # some processes only: they agree (`_all_ok`) before the collective checksum and before
      # returning, so that all fall back together instead of diverging.
      error = None
      try:
        layout = self._restore_item(step, _LAYOUT, ocp.args.JsonRestore())
        found = [[e["path"], e["shape"], e["dtype"]] for e in layout["leaves"]]
        if found != expected:
          raise IncompatibleCheckpointError(
              f"checkpoint at step {step} in {self.directory} holds a different state structure "
              f"than the template (first difference: {_first_difference(found, expected)}); "
              "restore with the matching model/optimizer configuration or use a new directory.")
        entries = layout["leaves"]
        stored = self._restore_item(step, _STATE, ocp.args.StandardRestore(
            {_leaf_key(i): _restore_target(entry, template)
             for i, (entry, template) in enumerate(zip(entries, template_leaves))}))
        arrays = [stored[_leaf_key(i)] for i in range(len(template_leaves))]
        arrays = [a if "sum32" in entry else np.asarray(a) for a, entry in zip(arrays, entries)]
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        error = e
      ok = _all_ok(error is None)
      if ok:
        try:
          _verify(arrays, entries)
          meta = self._restore_item(step, _META, ocp.args.JsonRestore())
        except Exception as e:  # pylint: disable=broad-except
          error = e
        ok = _all_ok(error is None)
      if not ok:
        error = error or RuntimeError("another process could not read this checkpoint")
        reason = str(error).splitlines()[0][:_MAX_REASON_CHARS] if str(error) else ""
        log.warning("Checkpoint at step %d in %s is unreadable (%s: %s); trying an older one.",
                    step, self.directory, type(error).__name__, reason)
        continue
      state = jax.tree.unflatten(treedef, [
          a if _onto_devices(entry, t) else _from_numpy(np.asarray(a), t)
          for a, t, entry in zip(arrays, template_leaves, entries)])
      return step, state, dict(meta)
    return None

  def restore_leaves(self, step: int, prefix: str) -> dict[str, np.ndarray]:
    """{key path: host array} of the leaves of checkpoint `step` whose `jax.tree_util.keystr` path
    starts with `prefix` (e.g. "['params']"), read without the rest of the state, so a reader
    that needs only the parameters needs no optimizer or template. Each leaf is checked against
    its recorded checksum.

    Raises:
      FileNotFoundError: there is no checkpoint at `step` (the message lists the steps there are).
      ValueError: no leaf matches `prefix`, or a leaf fails its checksum.
    """
    steps = self.all_steps()
    if step not in steps:
      raise FileNotFoundError(f"{self.directory}: no checkpoint at step {step}; the steps there "
                              f"are {steps or 'none'}")
    entries = self._restore_item(step, _LAYOUT, ocp.args.JsonRestore())["leaves"]
    chosen = {_leaf_key(i): e for i, e in enumerate(entries) if e["path"].startswith(prefix)}
    if not chosen:
      raise ValueError(f"{self.directory}: checkpoint at step {step} has no leaf under {prefix}")
    stored = self._restore_item(step, _STATE, ocp.args.PyTreeRestore(
        item={k: np.zeros(e["shape"], e["dtype"]) for k, e in chosen.items()},
        restore_args={k: ocp.RestoreArgs(restore_type=np.ndarray) for k in chosen},
        partial_restore=True))
    arrays = [np.asarray(stored[k]) for k in chosen]
    _verify(arrays, list(chosen.values()))
    return {e["path"]: a for e, a in zip(chosen.values(), arrays)}

  def close(self) -> None:
    """Waits for pending work and releases the orbax manager."""
    self._manager.close()

  def _restore_item(self, step: int, name: str, item_args: Any) -> Any:
    restored = self._manager.restore(step, args=ocp.args.Composite(**{name: item_args}))
    if restored[name] is None:
      raise FileNotFoundError(f"item {name!r} is missing")
    return restored[name]


def _all_ok(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective in a multi-process run)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _onto_devices(entry: dict[str, Any], template_leaf: Any) -> bool:
  """Whether a stored leaf is restored straight onto the template leaf's sharding: it was saved
  from devices and the template is such an array too (not, e.g., a typed PRNG key)."""
  return "sum32" in entry and _on_devices(template_leaf)


def _restore_target(entry: dict[str, Any], template_leaf: Any) -> Any:
  """What orbax restores one stored leaf into: a leaf saved from devices goes straight onto the
  template leaf's sharding (any mesh); everything else into host memory."""
  if _onto_devices(entry, template_leaf):
    return jax.ShapeDtypeStruct(tuple(entry["shape"]), np.dtype(entry["dtype"]),
                                sharding=template_leaf.sharding)
  return np.zeros(entry["shape"], entry["dtype"])


def _verify(arrays: list[Any], entries: list[dict[str, Any]]) -> None:
  """Raises ValueError naming the first leaf whose shape, dtype or checksum differs from its
  layout entry."""
  on_devices = [i for i, entry in enumerate(entries) if "sum32" in entry]
  sums = dict(zip(on_devices, _device_entries([jnp.asarray(arrays[i]) for i in on_devices])))
  for i, (array, entry) in enumerate(zip(arrays, entries)):
    found = [list(array.shape), str(np.dtype(array.dtype)),
             sums[i] if i in sums else _checksum(array)]
    expected = [entry["shape"], entry["dtype"], entry["sum32" if i in sums else "crc32"]]
    if found != expected:
      raise ValueError(f"leaf {entry['path']} does not match its recorded checksum")


def _first_difference(found: list[list[Any]], expected: list[list[Any]]) -> str:
  """A short description of where two (path, shape, dtype) leaf lists first differ."""
  for f, e in zip(found, expected):
    if f != e:
      return f"stored {f} vs template {e}"
  return f"{len(found)} stored leaves vs {len(expected)} in the template"
