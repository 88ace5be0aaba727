"""Data-parallel placement on a ("data",) device mesh, and the multi-process start.

Everything here is JAX's own machinery (Mesh, NamedSharding, shard_map, jax.distributed); this
module only names the two layouts PROMA training uses and places arrays in them.

  replicated          params, optimizer state, scalars: NamedSharding(mesh, P())
  sequence-sharded    per-sequence / per-token arrays of a microbatch: NamedSharding(mesh, P("data")),
                      sharded over their leading (sequence) axis

Two data-parallel modes (`config.mesh.mode`, see `proma_jax.transforms` for the math):

  exact   `jax.jit` of the microbatch function with sequence-sharded inputs and replicated params.
          The program is the single-device one; the compiler partitions it and inserts the
          collectives (all-gathers / all-reduces of per-sequence statistics, Gram matrices and
          gradients), so the projection is the one a single device computes for the microbatch.
  local   `jax.shard_map` over "data": each device computes its shard's gradient and statistics and
          projects against its own sequences only; the changes of R are summed by one psum of a
          parameter-sized tree per microbatch (`axis_name` of the PROMA transforms).

Multi-process: `initialize_distributed` calls `jax.distributed.initialize` (coordinator
host:port, process count and id) before any other JAX call. On CPU, JAX 0.10.2's default
cross-process collectives are gloo (`jax_cpu_collectives_implementation`), so nothing else is
needed. Each process computes the (replicated) rollout itself and feeds only the rows of its own
devices (`shard_sequences`, `jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
MODES = ("exact", "local")


def initialize_distributed(num_processes: int, process_id: int, coordinator: str) -> None:
  """`jax.distributed.initialize` for a run of `num_processes` > 1 processes (no-op for 1).

  Must run before any other JAX computation in the process. Idempotent within a process.
  """
  if num_processes <= 1 or jax.distributed.is_initialized():
    return
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def data_mesh(num_devices: int) -> Mesh:
  """A 1-D ("data",) mesh over the first `num_devices` devices (all of them when multi-process)."""
  available = jax.device_count()
  if num_devices > available:
    raise ValueError(f"config.mesh.data: {num_devices} devices requested but {available} are "
                     "available (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N "
                     "before JAX starts)")
  if jax.process_count() > 1 and num_devices != available:
    raise ValueError(f"config.mesh.data: a {jax.process_count()}-process run must use all "
                     f"{available} devices, got {num_devices}")
  return Mesh(np.array(jax.devices()[:num_devices]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sequence_sharded(mesh: Mesh, axis: int = 0) -> NamedSharding:
  """Sharded over "data" along `axis` (the sequence axis: 0 for a microbatch, 1 for microbatches
  stacked on a leading axis)."""
  return NamedSharding(mesh, _sequence_spec(axis))


def _sequence_spec(axis: int) -> P:
  return P(*([None] * axis), DATA_AXIS)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every leaf replicated on every device of the mesh (each process supplies its own copy,
  which must be the same on all processes)."""
  return jax.device_put(tree, replicated(mesh))


def _process_rows(sharding: NamedSharding, shape: tuple[int, ...], axis: int = 0) -> slice:
  """The contiguous rows (along `axis`) of a sequence-sharded array held by this process's
  devices."""
  n = shape[axis]
  rows = [index[axis] for index in sharding.addressable_devices_indices_map(shape).values()]
  start, stop = min(r.start or 0 for r in rows), max(n if r.stop is None else r.stop for r in rows)
  held = sum((n if r.stop is None else r.stop) - (r.start or 0) for r in rows)
  if held != stop - start:
    raise ValueError(f"this process's devices hold rows {rows}, not one contiguous block")
  return slice(start, stop)


def shard_sequences(tree: Any, mesh: Mesh, axis: int = 0) -> Any:
  """Each leaf sequence-sharded over "data" along `axis` ((n_seq, ...) with axis 0; (M, n_seq,
  ...) stacked microbatches with axis 1); every process feeds only its own rows.

  The leaves are the whole microbatch as this process knows it (host or replicated arrays); only
  the block of rows that lands on this process's devices is handed to
  `jax.make_array_from_process_local_data`.
  """
  sharding = sequence_sharded(mesh, axis)

  def place(x):
    x = np.asarray(x)
    rows = (slice(None),) * axis + (_process_rows(sharding, x.shape, axis),)
    return jax.make_array_from_process_local_data(sharding, x[rows], x.shape)

  return jax.tree.map(place, tree)


def data_parallel(update_fn: Callable, mesh: Mesh, mode: str, sequence_axis: int = 0) -> Callable:
  """The jitted `(params, opt_state, microbatch, num_tokens) -> (params, opt_state, metrics)` on
  the mesh: params, opt_state, num_tokens and all outputs replicated, the microbatch sharded along
  `sequence_axis` (1 for microbatches stacked on a leading axis); params and opt_state donated.

  mode "exact": `update_fn` is the single-device function; jit partitions it.
  mode "local": `update_fn` runs per device under `jax.shard_map` on its own rows and must do its
  own collectives over `DATA_AXIS` (PROMA transforms built with `axis_name=DATA_AXIS`, and a psum
  of its metrics) so that everything it returns is the same on every device.
  """
  if mode not in MODES:
    raise ValueError(f"config.mesh.mode: unknown {mode!r}; expected one of {MODES}")
  rep, data = replicated(mesh), sequence_sharded(mesh, sequence_axis)
  if mode == "exact":
    return jax.jit(update_fn, in_shardings=(rep, rep, data, rep), out_shardings=rep,
                   donate_argnums=(0, 1))
  # check_vma=False: the factor capture differentiates with plain (unannotated) cotangents, which
  # the varying-manual-axes type check rejects inside shard_map. Replication of the outputs is what
  # the transforms' own psum guarantees (and tests/test_distributed.py checks with check_vma=True).
  return jax.jit(jax.shard_map(update_fn, mesh=mesh,
                               in_specs=(P(), P(), _sequence_spec(sequence_axis), P()),
                               out_specs=P(), check_vma=False), donate_argnums=(0, 1))

