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

FSDP (`config.mesh.fsdp` > 1): `fsdp_mesh(data, fsdp)` is a 2-D ("data", "fsdp") mesh and
`param_specs` the ZeRO-3 placement rule (each large leaf of >= 2 dims sharded over "fsdp" along its
largest divisible dimension, small leaves replicated, per-path overrides); `place` puts a tree on
it. Params, the PROMA accumulator and the optimizer state keep that placement through the jitted
step, whose partitioning (and collectives) the compiler chooses. Sequences are sharded over both
axes where the microbatch divides (`shard_sequences`): each device computes
its own sequences with gathered parameters, as plain FSDP does. The PROMA variants then reshard
their per-sequence gradients like the parameters (`constrain_sequence_gradients`: one all-to-all
per leaf over "fsdp"), so that the statistics contract over each leaf's own axes shard by shard
(`projection.stacked_statistics`: partial sums and an all-reduce of n x n and n numbers) and the
combination sum_i c_i S_i is shard-local. Measured bytes per collective: experiments/README.md,
"FSDP: memory and collectives per fsdp shard count".

Multi-process: `initialize_distributed` calls `jax.distributed.initialize` (coordinator
host:port, process count and id) before any other JAX call. On CPU, JAX 0.10.2's default
cross-process collectives are gloo (`jax_cpu_collectives_implementation`), so nothing else is
needed. Each process computes the (replicated) rollout itself and feeds only the rows of its own
devices (`shard_sequences`, `jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MODES = ("exact", "local")
# Leaves smaller than this stay replicated under the FSDP rule (norm scales, biases): sharding them
# saves little memory and costs a collective each.
FSDP_MIN_SIZE = 2**14


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


def sequence_sharded(mesh: Mesh, axis: int = 0, num_rows: int | None = None) -> NamedSharding:
  """Sharded over "data" along `axis` (the sequence axis: 0 for a microbatch, 1 for microbatches
  stacked on a leading axis). On a ("data", "fsdp") mesh, when `num_rows` (the length of that
  axis) is given and a multiple of every device, over both axes: each device then computes its
  own sequences with the gathered parameters (ZeRO-3), not the same ones as its "fsdp" peers.
  Per-sequence gradients S_i are then whole on their sequence's device;
  `constrain_sequence_gradients` sends each block of them to the device holding that block of
  the parameter before the PROMA statistics (unconstrained, the compiler gathered whole S_i)."""
  return NamedSharding(mesh, _sequence_spec(axis, _sequence_axes(mesh, num_rows)))


def _sequence_axes(mesh: Mesh, num_rows: int | None) -> str | tuple[str, str]:
  if (FSDP_AXIS in mesh.axis_names and num_rows is not None
      and num_rows % (mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]) == 0):
    return (DATA_AXIS, FSDP_AXIS)
  return DATA_AXIS


def _sequence_spec(axis: int, axes: str | tuple[str, str] = DATA_AXIS) -> P:
  return P(*([None] * axis), axes)


def _device_put(tree: Any, shardings: Any) -> Any:
  """`jax.device_put` leaf by leaf, where an array held by this process's devices only (e.g.
  restored onto one device) goes to a sharding spanning several processes through host memory:
  each process then supplies its own shards, as from a NumPy array (JAX's CPU backend has no
  direct cross-host device transfer)."""
  def put(x, sharding):
    if (isinstance(x, jax.Array) and x.is_fully_addressable
        and not sharding.is_fully_addressable):
      x = np.asarray(x)
    return jax.device_put(x, sharding)
  return jax.tree.map(put, tree, shardings)


def _process_rows(sharding: NamedSharding, shape: tuple[int, ...], axis: int = 0) -> slice:
  """The contiguous rows (along `axis`) of a sequence-sharded array held by this process's
  devices."""
  n = shape[axis]
  # Distinct blocks: on a ("data", "fsdp") mesh the devices of one "data" row hold the same rows.
  rows = sorted({(index[axis].start or 0, n if index[axis].stop is None else index[axis].stop)
                 for index in sharding.addressable_devices_indices_map(shape).values()})
  start, stop = rows[0][0], max(r[1] for r in rows)
  held = sum(b - a for a, b in rows)
  if held != stop - start:
    raise ValueError(f"this process's devices hold rows {rows}, not one contiguous block")
  return slice(start, stop)


def shard_sequences(tree: Any, mesh: Mesh, axis: int = 0) -> Any:
  """Each leaf sequence-sharded along `axis` ((n_seq, ...) with axis 0; (M, n_seq, ...) stacked
  microbatches with axis 1) by `sequence_sharded`: over ("data", "fsdp") where the rows divide,
  else over "data"; every process feeds only its own rows.

  The leaves are the whole microbatch as this process knows it (host or replicated arrays); only
  the block of rows that lands on this process's devices is handed to
  `jax.make_array_from_process_local_data`.
  """
  def place(x):
    x = np.asarray(x)
    sharding = sequence_sharded(mesh, axis, x.shape[axis])
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



# ---------------------------------------------------------------------------------------------
# ("data", "fsdp") meshes: parameters, the PROMA accumulator and optimizer state sharded ZeRO-3
# style over "fsdp" (GSPMD partitions the program; see docs/algorithm.md for the math).


def fsdp_mesh(data: int, fsdp: int) -> Mesh:
  """A 2-D ("data", "fsdp") mesh over the first data * fsdp devices."""
  n, available = data * fsdp, jax.device_count()
  if n > available:
    raise ValueError(f"config.mesh: data {data} x fsdp {fsdp} = {n} devices requested but "
                     f"{available} are available (on CPU, set "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)")
  if jax.process_count() > 1 and n != available:
    raise ValueError(f"config.mesh: a {jax.process_count()}-process run must use all {available} "
                     f"devices, got data {data} x fsdp {fsdp} = {n}")
  return Mesh(np.array(jax.devices()[:n]).reshape(data, fsdp), (DATA_AXIS, FSDP_AXIS))


def make_mesh(config: ml_collections.ConfigDict) -> Mesh | None:
  """The run's mesh: `fsdp_mesh` of config.mesh.data x config.mesh.fsdp devices with fsdp > 1,
  else `data_mesh` of config.mesh.data > 1 devices, else None (one device, nothing placed)."""
  if config.mesh.fsdp > 1:
    return fsdp_mesh(config.mesh.data, config.mesh.fsdp)
  return data_mesh(config.mesh.data) if config.mesh.data > 1 else None


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE,
              layer_axis: bool = False) -> P:
  """The default placement of one leaf: a leaf of 2 or more dimensions and at least `min_size`
  elements is sharded over "fsdp" along its largest dimension that `fsdp` divides (the first of
  equal ones); every other leaf is replicated (P()). With `layer_axis` (a leaf of scanned layers,
  `models.stacked`), the leading layer axis is never sharded and each layer's slice is placed as
  that layer's own leaf would be: the scan then reads one layer's shards per step."""
  if layer_axis:
    return P(None, *fsdp_spec(shape[1:], fsdp, min_size))
  if len(shape) < 2 or math.prod(shape) < min_size or fsdp == 1:
    return P()
  order = sorted(range(len(shape)), key=lambda d: (-shape[d], d))
  for dim in order:
    if shape[dim] % fsdp == 0:
      return P(*(FSDP_AXIS if d == dim else None for d in range(len(shape))))
  return P()


def param_specs(tree: Any, fsdp: int, rules: Sequence[tuple[str, Any]] = (),
                min_size: int = FSDP_MIN_SIZE,
                layer_axis: Callable[[str], bool] | None = None) -> Any:
  """A PartitionSpec per leaf of `tree` (arrays or ShapeDtypeStructs): the first of `rules`
  (regex, spec) whose regex `re.search`es the leaf's path (`jax.tree_util.keystr`, e.g.
  "['layers_0']['mlp']['up']['kernel']") gives its spec (a PartitionSpec, or a tuple of axis
  names / None); else `fsdp_spec`, with the leading layer axis of the leaves whose path
  `layer_axis` accepts left unsharded (e.g. `models.stacked.is_stacked_name`). Raises ValueError naming the leaf when a spec does not fit it
  (more entries than dimensions, or a dimension the mesh axis size does not divide)."""
  compiled = [(re.compile(pattern), spec if isinstance(spec, P) else P(*spec))
              for pattern, spec in rules]

  def spec_of(path, leaf):
    name = jax.tree_util.keystr(path)
    shape = tuple(leaf.shape)
    spec = next((spec for pattern, spec in compiled if pattern.search(name)), None)
    if spec is None:
      return fsdp_spec(shape, fsdp, min_size,
                       layer_axis=layer_axis is not None and len(shape) > 0 and layer_axis(name))
    if len(spec) > len(shape):
      raise ValueError(f"sharding rule for {name}: {spec} has more entries than the leaf's "
                       f"{len(shape)} dimensions {shape}")
    for dim, axis in enumerate(spec):
      if axis == FSDP_AXIS and shape[dim] % fsdp:
        raise ValueError(f"sharding rule for {name}: dimension {dim} of {shape} is not divisible "
                         f"by the {fsdp} '{FSDP_AXIS}' shards")
    return spec

  return jax.tree_util.tree_map_with_path(spec_of, tree)


def shardings(mesh: Mesh, specs: Any) -> Any:
  """A NamedSharding on `mesh` per PartitionSpec of `specs` (a tree of them)."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, P))


def place(tree: Any, mesh: Mesh, specs: Any) -> Any:
  """`tree` placed on `mesh`, each leaf with its spec from `specs` (a tree of PartitionSpecs)."""
  return _device_put(tree, shardings(mesh, specs))


def constrain_sequence_gradients(seq_grads: Any, param_shardings: Any) -> Any:
  """Per-sequence gradient stacks (n_seq, *leaf) resharded like their leaf (inside jit): the leaf's
  own dimensions as `param_shardings` (NamedShardings like params) shard it, the sequence axis
  replicated (the exact Gram needs every pair of sequences on each shard, so with "data" > 1 the
  blocks of the other rows' S_i are gathered over "data", as in the data-parallel exact mode).
  Other entries (None, matrix-free factors) are returned as they are.

  With sequences over ("data", "fsdp") each device computes the S_i of its own sequences whole
  (the parameters gathered, as in ZeRO-3). Constrained, each block of S_i goes to the device that
  holds the same block of R: an all-to-all over "fsdp" in which each device sends (F - 1) / F of
  each of its k = n_seq / (data x fsdp) stacked leaves, k times the bytes of plain FSDP's
  gradient reduction, which it replaces (measured equal to plain's total at k = 1). The Gram
  <S_i, S_j> and <R, S_i> are then per-shard partial sums and one all-reduce of n x n and n
  numbers (`projection.stacked_statistics`), and sum_i c_i S_i and the gradient are shard-local.
  Unconstrained, the compiler was seen to all-gather whole S_i instead (n_seq x a leaf per
  device); experiments/README.md, "FSDP: memory and collectives per fsdp shard count".
  """
  shardings_def = jax.tree.structure(param_shardings)
  leaves = shardings_def.flatten_up_to(seq_grads)

  def constrain(s, sharding):
    if not isinstance(s, jax.Array):  # None, or matrix-free factors
      return s
    spec = P(None, *sharding.spec)
    return jax.lax.with_sharding_constraint(s, NamedSharding(sharding.mesh, spec))

  return shardings_def.unflatten(
      [constrain(s, sh) for s, sh in zip(leaves, jax.tree.leaves(param_shardings))])
