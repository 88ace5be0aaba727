"""PROMA on device meshes: on a ("data",) mesh exact mode is the single-device result and local
mode its own per-device definition; on a ("data", "fsdp") mesh every transform and every
algorithm's optimizer step equal one device's, sharded checkpoints restore onto other meshes, and
2 processes x 4 devices train as 1 device.

Every mesh check runs in a subprocess (`python tests/test_distributed.py <case>`) with
XLA_FLAGS=--xla_force_host_platform_device_count=4 (8 for the FSDP cases), so this pytest process
keeps its single device.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
NUM_DEVICES = 4


def _run_case(case: str, *args: str, devices: int = NUM_DEVICES, timeout: int = 1800) -> str:
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                                  f"--xla_force_host_platform_device_count={devices}")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), case, *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  return proc.stdout


# ---------------------------------------------------------------------------------------------
# Transform level (run in a 4-device subprocess).


def _microbatches(key, num, n_seq):
  import jax
  from helpers import correlated_microbatch
  return [correlated_microbatch(k, n_seq) for k in jax.random.split(key, num)]


def _per_device_grads(seq, adv_key, n_seq):
  """Each device's own M^(d) = -sum_{i in d} A_i S_i (random A_i), stacked (D, *leaf)."""
  import jax
  import jax.numpy as jnp
  adv = jax.random.normal(adv_key, (n_seq,))
  per_device = {k: None if s is None else -jnp.einsum(
      "di,di...->d...", adv.reshape(NUM_DEVICES, -1), s.reshape(NUM_DEVICES, -1, *s.shape[1:]))
      for k, s in seq.items()}
  per_device["frozen"] = jax.random.normal(adv_key, (NUM_DEVICES, 3))
  return per_device


def case_exact_transforms():
  """Sharded jit of tx.update (sequences / tokens over "data") equals one device, for the
  accumulation, intra and both variants; the compiled program does communicate."""
  import chex
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import PartitionSpec as P

  import proma_jax
  from proma_jax import mesh as mesh_lib
  from helpers import params_like

  assert jax.device_count() == NUM_DEVICES
  mesh = mesh_lib.data_mesh(NUM_DEVICES)
  num, n_seq, n_tok = 3, 8, 32
  keys = jax.random.split(jax.random.PRNGKey(30), num)
  batches = []
  for key, (grads, seq) in zip(keys, _microbatches(jax.random.PRNGKey(31), num, n_seq)):
    ka, kg = jax.random.split(key)
    factors = {"kernel": proma_jax.DenseFactors(jax.random.normal(ka, (n_tok, 6)),
                                                 jax.random.normal(kg, (n_tok, 5))),
               "bias": None, "frozen": None}
    batches.append((grads, seq, factors))
  variants = {
      "accumulation": (proma_jax.proma_accumulation(optax.identity(), num, relative_bound=0.5),
                       ("seq_grads",)),
      "intra": (proma_jax.proma_intra(optax.identity(), num, rank=3), ("factors",)),
      "both": (proma_jax.proma_both(optax.identity(), num, rank=3), ("seq_grads", "factors")),
  }
  for name, (tx, extra_names) in variants.items():
    update = jax.jit(lambda g, st, p, extra, tx=tx: tx.update(g, st, p, **extra))
    single_state = sharded_state = tx.init(params_like())
    sharded_state = jax.device_put(sharded_state, mesh_lib.replicated(mesh))
    params = jax.device_put(params_like(), mesh_lib.replicated(mesh))
    for j, (grads, seq, factors) in enumerate(batches):
      extra = {k: v for k, v in (("seq_grads", seq), ("factors", factors)) if k in extra_names}
      single, single_state = update(grads, single_state, params_like(), extra)
      sharded_extra = jax.device_put(extra, mesh_lib.sequence_sharded(mesh))
      assert all(x.sharding.spec == P("data") for x in jax.tree.leaves(sharded_extra))
      args = (jax.device_put(grads, mesh_lib.replicated(mesh)), sharded_state, params,
              sharded_extra)
      if j == 0:  # the partitioned program exchanges statistics between the devices
        hlo = update.lower(*args).compile().as_text()
        assert "all-reduce" in hlo or "all-gather" in hlo, name
      sharded, sharded_state = update(*args)
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(single))
    assert scale > 0
    chex.assert_trees_all_close(sharded, single, atol=1e-5 * scale, rtol=1e-5)
    chex.assert_trees_all_close(sharded_state.intra_reduction, single_state.intra_reduction,
                                atol=1e-5)
    np.testing.assert_allclose(sharded_state.reduction, single_state.reduction, rtol=1e-5)
    print(name, "exact == single device")


def _local_update(tx, mesh, extra_name):
  """jit(shard_map(tx.update)): each device its own (1, *leaf) grads slice and extra shard."""
  import jax
  from jax.sharding import PartitionSpec as P

  def per_device(grads_1x, state, params, extra):
    grads = jax.tree.map(lambda x: x[0], grads_1x)
    return tx.update(grads, state, params, **{extra_name: extra})

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P(), P(), P("data")),
                               out_specs=P()))


def case_local_accumulation():
  """Local mode: R <- R + sum_d (M^(d) - shrinkage * P^(d)(R)), P^(d) onto device d's own
  sequences, equals a float64 loop over the 4 shards; with mutually orthogonal device spans it
  equals the exact (whole-microbatch) projection."""
  import chex
  import jax
  import jax.numpy as jnp
  import optax

  import proma_jax
  from proma_jax import mesh as mesh_lib
  from helpers import np_accumulate, np_project, params_like

  mesh = mesh_lib.data_mesh(NUM_DEVICES)
  num, n_seq = 3, 8
  batches = _microbatches(jax.random.PRNGKey(40), num, n_seq)
  per_device = [_per_device_grads(seq, k, n_seq)
                for (_, seq), k in zip(batches, jax.random.split(jax.random.PRNGKey(41), num))]
  for relative_bound, solver in ((None, "exact"), (0.5, "gram_schmidt")):
    tx = proma_jax.proma_accumulation(optax.identity(), num, relative_bound=relative_bound,
                                      solver=solver, axis_name=mesh_lib.DATA_AXIS)
    update = _local_update(tx, mesh, "seq_grads")
    state = tx.init(params_like())
    for (_, seq), grads in zip(batches, per_device):
      updates, state = update(grads, state, params_like(), seq)

    r = {k: np.zeros(np.shape(v)) for k, v in params_like().items()}
    for j, ((_, seq), grads) in enumerate(zip(batches, per_device)):
      for k, r_k in r.items():
        changes = []  # every device's change is computed against the same R
        for d in range(NUM_DEVICES):
          m_d = np.asarray(grads[k][d], np.float64)
          if j == 0 or seq[k] is None:
            changes.append(m_d)
            continue
          s_d = np.asarray(seq[k]).reshape(NUM_DEVICES, -1, *r_k.shape)[d]
          projected = np_project(r_k, s_d, m_d, shrinkage=1.0, ridge=1e-2,
                                 relative_bound=relative_bound, solver=solver)
          changes.append(projected.reshape(r_k.shape) - r_k)
        r[k] = r_k + sum(changes)
    scale = max(np.abs(v).max() for v in r.values())
    chex.assert_trees_all_close(updates, r, atol=2e-5 * scale, rtol=1e-4)
    assert float(state.reduction) > 0
    # Correlated sequences across devices: local is not the whole-microbatch projection.
    whole = np_accumulate([{k: np.sum(g[k], axis=0) for k in g} for g in per_device],
                          [seq for _, seq in batches], relative_bound=relative_bound, solver=solver)
    assert not np.allclose(r["kernel"], whole["kernel"], rtol=1e-2, atol=1e-2 * scale)
    print("local accumulation", relative_bound, solver, "== per-device definition")

  # Device d's sequences live on their own block of coordinates: the spans are orthogonal.
  n_local, size = n_seq // NUM_DEVICES, 6 * 5
  block = size // NUM_DEVICES
  keys = jax.random.split(jax.random.PRNGKey(42), 2 * num)
  exact_tx = proma_jax.proma_accumulation(optax.identity(), num)
  local_tx = proma_jax.proma_accumulation(optax.identity(), num, axis_name=mesh_lib.DATA_AXIS)
  update = _local_update(local_tx, mesh, "seq_grads")
  p = {"kernel": jnp.zeros((6, 5))}
  exact_state, local_state = exact_tx.init(p), local_tx.init(p)
  for j in range(num):
    s = jnp.zeros((n_seq, size))
    values = jax.random.normal(keys[2 * j], (n_seq, block))
    for d in range(NUM_DEVICES):
      rows = slice(d * n_local, (d + 1) * n_local)
      s = s.at[rows, d * block:(d + 1) * block].set(values[rows])
    s = s.reshape(n_seq, 6, 5)
    adv = jax.random.normal(keys[2 * j + 1], (n_seq,))
    m_d = -jnp.einsum("di,di...->d...", adv.reshape(NUM_DEVICES, -1),
                      s.reshape(NUM_DEVICES, n_local, 6, 5))
    exact, exact_state = jax.jit(exact_tx.update)({"kernel": m_d.sum(0)}, exact_state, p,
                                                  seq_grads={"kernel": s})
    local, local_state = update({"kernel": m_d}, local_state, p, {"kernel": s})
  chex.assert_trees_all_close(local, exact, atol=1e-5)
  print("local == exact on orthogonal device spans")


def case_local_intra():
  """Local intra (the paper's data-parallel variant): each device removes Qa Qa^T M^(d) Qg Qg^T
  with its own factors, then the devices' results are summed; against exact-rank factors in NumPy."""
  import chex
  import jax
  import optax

  import proma_jax
  from proma_jax import mesh as mesh_lib

  mesh = mesh_lib.data_mesh(NUM_DEVICES)
  n_local, d_in, d_out, k, shrinkage = 8, 6, 5, 2, 0.8
  keys = jax.random.split(jax.random.PRNGKey(50), 5 * NUM_DEVICES)
  va = [jax.random.normal(keys[5 * d], (k, d_in)) for d in range(NUM_DEVICES)]
  vg = [jax.random.normal(keys[5 * d + 1], (k, d_out)) for d in range(NUM_DEVICES)]
  a = np.concatenate([jax.random.normal(keys[5 * d + 2], (n_local, k)) @ va[d]
                      for d in range(NUM_DEVICES)])
  g = np.concatenate([jax.random.normal(keys[5 * d + 3], (n_local, k)) @ vg[d]
                      for d in range(NUM_DEVICES)])
  m = np.stack([jax.random.normal(keys[5 * d + 4], (d_in, d_out)) for d in range(NUM_DEVICES)])
  bias = np.arange(NUM_DEVICES * d_out, dtype=np.float32).reshape(NUM_DEVICES, d_out)
  tx = proma_jax.proma_intra(optax.identity(), 1, rank=k, shrinkage=shrinkage,
                             axis_name=mesh_lib.DATA_AXIS)
  params = {"kernel": np.zeros((d_in, d_out), np.float32), "bias": np.zeros(d_out, np.float32)}
  factors = {"kernel": proma_jax.DenseFactors(a, g), "bias": None}
  updates, state = _local_update(tx, mesh, "factors")({"kernel": m, "bias": bias},
                                                      tx.init(params), params, factors)

  def projector(v):
    v = np.asarray(v, np.float64)
    return v.T @ np.linalg.solve(v @ v.T, v)

  projected = [m[d] - shrinkage * projector(va[d]) @ m[d] @ projector(vg[d])
               for d in range(NUM_DEVICES)]
  fractions = [np.linalg.norm(m[d] - projected[d]) / np.linalg.norm(m[d])
               for d in range(NUM_DEVICES)]
  chex.assert_trees_all_close(updates, {"kernel": sum(projected), "bias": bias.sum(0)}, atol=1e-4)
  np.testing.assert_allclose(state.intra_reduction["kernel"], np.mean(fractions), rtol=1e-4)
  print("local intra == per-device definition")


# ---------------------------------------------------------------------------------------------
# Training (run in a 4-device subprocess, or as 2 processes).

COMPARED_STEPS = 2


def _tiny(algorithm, warm_dir, **mesh):
  from helpers import tiny_config
  c = tiny_config(algorithm, warm_dir, steps=COMPARED_STEPS)
  c.checkpoint.every = 1000  # one checkpoint, at the end
  c.mesh.update(mesh)
  return c


def _read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _compare_records(got, expected):
  by_step = {r["step"]: r for r in expected}
  assert sorted(r["step"] for r in got) == sorted(by_step)
  assert by_step[COMPARED_STEPS]["proma/reduction"] > 0  # the runs have teeth: rewards vary
  for record in got:
    assert set(record) == set(by_step[record["step"]])
    for key, value in record.items():
      if not key.startswith("time/"):
        np.testing.assert_allclose(value, by_step[record["step"]][key], rtol=1e-4, atol=1e-6,
                                   err_msg=f"step {record['step']} {key}")


def _pretrained_loads_onto_its_shards():
  """The tiny Qwen3 checkpoint read straight onto a 2 x 2 FSDP mesh (`policy._fsdp_shardings`):
  each device receives only its block, the values are those of a one-device load."""
  import chex
  import jax
  import ml_collections
  from flax import nnx

  from proma_jax import mesh as mesh_lib, policy as policy_lib
  from proma_jax.models import loading, stacked
  checkpoint = os.path.join(TESTS, "fixtures", "hf", "tiny_qwen3")
  c = ml_collections.ConfigDict({"mesh": {"data": 2, "fsdp": 2, "fsdp_min_size": 0}})
  sharded = nnx.to_pure_dict(nnx.state(loading.load_model(
      checkpoint, shardings=policy_lib._fsdp_shardings(c))))
  whole = nnx.to_pure_dict(nnx.state(loading.load_model(checkpoint)))
  specs = mesh_lib.param_specs(whole, 2, min_size=0, layer_axis=stacked.is_stacked_name)
  kernel = sharded["layers"]["mlp"]["up_proj"]["kernel"]  # scanned layers: (L, d_in, d_out)
  assert kernel.sharding.spec == specs["layers"]["mlp"]["up_proj"]["kernel"] != mesh_lib.P()
  assert kernel.sharding.spec[0] is None  # never the layer axis
  for shard in kernel.addressable_shards:  # a block per device, never the whole kernel
    assert shard.data.shape[2] == kernel.shape[2] // 2, shard.data.shape
  for got, spec in zip(jax.tree.leaves(sharded), jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, mesh_lib.P))):
    assert got.sharding.spec == spec, (got.sharding, spec)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, sharded), jax.tree.map(np.asarray, whole))
  print("pretrained checkpoint loaded onto its fsdp 2x2 shards")


# Each algorithm's optimizer step on the meshes it may run on, against one device.
MESH_STEPS = {"grpo": ("fsdp",), "proma": ("fsdp", "data"), "proma_intra": ("fsdp",),
              "proma_both": ("fsdp",)}
MESHES = {"single": {}, "fsdp": dict(data=2, fsdp=4, fsdp_min_size=0),
          "data": dict(data=NUM_DEVICES, mode="exact")}


def _random_minibatch(trainer, rng):
  """A random minibatch whose old log-probs make grpo's ratios clip."""
  width, length = trainer.policy.prompt_width, trainer.policy.max_new_tokens
  n = trainer.minibatch_rows
  return {"tokens": rng.integers(1, trainer.policy.model_config.vocab_size,
                                 (n, width + length)).astype(np.int32),
          "valid": np.ones((n, width + length), np.float32),
          "mask": (rng.random((n, length)) < 0.8).astype(np.float32),
          "old_logp": rng.normal(-2.0, 0.5, (n, length)).astype(np.float32),
          "advantages": rng.normal(size=n).astype(np.float32)}


def _optimizer_step(algorithm, minibatch=None, rng=None, fused=True, **mesh):
  """(trainer, minibatch, (params, metrics) after one optimizer step of 2 microbatches of 8 rows
  from random initial params, the transform's metrics included)."""
  import jax

  from proma_jax import policy as policy_lib, trainer as trainer_lib
  c = _tiny(algorithm, "unused", **mesh)
  c.proma.fused = fused
  c.train.update(num_minibatches=1)  # microbatches of 8 rows: one sequence per device on 2 x 4
  policy, params = policy_lib.make_policy(c)
  trainer = trainer_lib.Trainer(c, policy, params)
  minibatch = _random_minibatch(trainer, rng) if minibatch is None else minibatch
  params = trainer.fresh_params()
  params, opt_state, metrics = trainer.optimizer_step(
      params, trainer.init_opt_state(params, 1e-3), minibatch,
      trainer.place(np.float32(minibatch["mask"].sum())))
  metrics.update(trainer_lib.transform_metrics(algorithm, opt_state))
  return trainer, minibatch, jax.tree.map(np.asarray, (params, metrics))


def case_mesh_optimizer_steps(algorithm: str):
  """`algorithm`'s optimizer step (2 microbatches of 8 sequences) on a ("data", "fsdp") = 2 x 4
  mesh, params, optimizer state and sequences sharded (each device its own sequence), equals one
  device's; so does proma's on a 4-device data mesh in exact mode. The PROMA variants'
  per-sequence gradients are resharded like the params (`mesh.constrain_sequence_gradients`);
  what that saves at LLM shapes is measured by experiments/bench_fsdp.py (at these tiny shapes
  the compiler uses all-to-alls with or without it). Also, one part per algorithm so that the
  suite's workers share them: proma_intra in local mode (the paper's data-parallel variant) steps
  with the projection active; proma_both's fused path equals the unfused one in local mode; a
  pretrained checkpoint loads onto its FSDP shards (with grpo). (Whole RL
  steps across processes: test_two_processes_match_one_process; a sharded checkpoint restored
  onto other mesh shapes: case_fsdp_transforms.)"""
  import chex
  import jax

  from proma_jax import mesh as mesh_lib
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  trainer, minibatch, single = _optimizer_step(algorithm, rng=rng)
  assert max(float(np.abs(a - np.asarray(b)).max()) for a, b in zip(
      jax.tree.leaves(single[0]), jax.tree.leaves(trainer.init_params))) > 0, algorithm
  if algorithm == "grpo":
    assert single[1]["pg/clipfrac"] > 0, single[1]
  if algorithm in ("proma", "proma_both"):
    assert single[1]["proma/reduction"] > 0, single[1]
  if algorithm in ("proma_intra", "proma_both"):
    assert single[1]["proma/intra_reduction"] > 0, single[1]
  for layout in MESH_STEPS[algorithm]:
    trainer, _, got = _optimizer_step(algorithm, minibatch, **MESHES[layout])
    if layout == "fsdp":
      rows = trainer.shard({k: v[:8] for k, v in minibatch.items()})["tokens"]
      assert rows.sharding.spec == mesh_lib.P(("data", "fsdp")), rows.sharding
      leaves = jax.tree.leaves(trainer.init_params)
      sharded = [x for x in leaves if "fsdp" in x.sharding.spec]
      assert len(sharded) >= len(leaves) // 2, [x.sharding.spec for x in leaves]
    # Params to 1% of an Adam step (lr 1e-3: where a gradient entry is ~0, Adam's
    # normalisation turns its float32 rounding into a visible change), the metrics to 1e-4.
    chex.assert_trees_all_close(got[0], single[0], rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(got[1], single[1], rtol=1e-4, atol=1e-6)
    print(f"{algorithm} optimizer step {layout} {MESHES[layout]} == 1 device")
  if algorithm == "proma_intra":
    _, _, local = _optimizer_step("proma_intra", rng=rng, data=NUM_DEVICES, mode="local")
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(local))
    assert local[1]["proma/intra_reduction"] > 0, local[1]
    print("proma_intra local mode steps")
  if algorithm == "proma_both":
    # The fused path (the default) against the unfused one in local mode (each device's own
    # statistics, inside shard_map), which has no single-device result to equal. On the FSDP mesh
    # the fused step (the S_i of each kernel constrained like it inside its backward step)
    # equals one device's above, whose fused step equals the unfused one (tests/test_fused.py).
    mesh = dict(data=NUM_DEVICES, mode="local")
    _, minibatch, fused = _optimizer_step(algorithm, rng=rng, **mesh)
    _, _, unfused = _optimizer_step(algorithm, minibatch, fused=False, **mesh)
    assert unfused[1]["proma/reduction"] > 0 and unfused[1]["proma/intra_reduction"] > 0
    chex.assert_trees_all_close(fused[0], unfused[0], rtol=0, atol=1e-5)
    chex.assert_trees_all_close(fused[1], unfused[1], rtol=1e-4, atol=1e-7)
    print(f"{algorithm} fused == unfused on {mesh}")
  if algorithm == "grpo":
    _pretrained_loads_onto_its_shards()


def case_transforms():
  case_exact_transforms()
  case_local_accumulation()
  case_local_intra()


FSDP_SHAPES = {"up": {"kernel": (32, 128)}, "down": {"kernel": (128, 32)},
               "embed": {"embedding": (96, 32)}, "norm": {"scale": (32,)}}


def case_fsdp_transforms():
  """A ("data", "fsdp") = 2 x 4 mesh, params, grads and the transform state sharded by the FSDP
  rule, sequence statistics over "data": each variant's update and state equal one device's,
  and the accumulator R stays sharded (no parameter-sized tensor is replicated)."""
  import chex
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import PartitionSpec as P

  import proma_jax
  from proma_jax import mesh as mesh_lib

  assert jax.device_count() == 8
  mesh = mesh_lib.fsdp_mesh(2, 4)
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), FSDP_SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))
  specs = mesh_lib.param_specs(shapes, 4, min_size=1024)
  assert specs["up"]["kernel"] == P(None, "fsdp") and specs["down"]["kernel"] == P("fsdp", None)
  assert specs["embed"]["embedding"] == P("fsdp", None) and specs["norm"]["scale"] == P()
  num, n_seq, n_tok = 3, 8, 32
  params = jax.tree.map(lambda s: jnp.zeros(s.shape), shapes)
  batches = []
  for key in jax.random.split(jax.random.PRNGKey(40), num):
    k_base, k_noise, k_adv, k_a, k_g = jax.random.split(key, 5)
    adv = jax.random.normal(k_adv, (n_seq,))
    seq = jax.tree.map(lambda s: jax.random.normal(k_base, s.shape)[None] + 0.1 * jax.random.normal(
        k_noise, (n_seq, *s.shape)), shapes)
    grads = jax.tree.map(lambda x: -jnp.tensordot(adv, x, axes=1), seq)
    factors = jax.tree.map(lambda _: None, shapes)
    for name, (d_in, d_out) in (("up", (32, 128)), ("down", (128, 32))):
      factors[name]["kernel"] = proma_jax.DenseFactors(jax.random.normal(k_a, (n_tok, d_in)),
                                                       jax.random.normal(k_g, (n_tok, d_out)))
    batches.append((grads, seq, factors))
  variants = {
      "plain": (proma_jax.microbatch_accumulation(optax.adam(1e-3), num), ()),
      "accumulation": (proma_jax.proma_accumulation(optax.adam(1e-3), num, relative_bound=0.5),
                       ("seq_grads",)),
      "intra": (proma_jax.proma_intra(optax.adam(1e-3), num, rank=3), ("factors",)),
      "both": (proma_jax.proma_both(optax.adam(1e-3), num, rank=3), ("seq_grads", "factors")),
  }
  # Per-sequence stacks (n_seq, *leaf): the sequence axis over "data", the rest as the leaf.
  seq_specs = jax.tree.map(lambda spec: P("data", *spec), specs,
                           is_leaf=lambda x: isinstance(x, P))
  for name, (tx, extra_names) in variants.items():
    single_update = jax.jit(lambda g, st, p, extra, tx=tx: tx.update(g, st, p, **extra))
    single_state = tx.init(params)
    sharded_params = mesh_lib.place(params, mesh, specs)
    # The state by the same rule (it is shape-based): R, Adam's moments and intra's per-kernel
    # sums like the params, scalars replicated.
    state_specs = mesh_lib.param_specs(jax.eval_shape(tx.init, params), 4, min_size=1024)
    sharded_state = mesh_lib.place(tx.init(params), mesh, state_specs)
    state_shardings = jax.tree.map(lambda x: x.sharding, sharded_state)
    update_shardings = jax.tree.map(lambda x: x.sharding, sharded_params)
    sharded_update = jax.jit(lambda g, st, p, extra, tx=tx: tx.update(g, st, p, **extra),
                             out_shardings=(update_shardings, state_shardings))
    for j, (grads, seq, factors) in enumerate(batches):
      extra = {k: v for k, v in (("seq_grads", seq), ("factors", factors)) if k in extra_names}
      single, single_state = single_update(grads, single_state, params, extra)
      placed = {}
      if "seq_grads" in extra:
        placed["seq_grads"] = mesh_lib.place(seq, mesh, seq_specs)
      if "factors" in extra:
        placed["factors"] = jax.device_put(factors, mesh_lib.sequence_sharded(mesh))
      args = (mesh_lib.place(grads, mesh, specs), sharded_state, sharded_params, placed)
      if j == 0:
        hlo = sharded_update.lower(*args).compile().as_text()
        collectives = {op: hlo.count(f" {op}(") for op in ("all-reduce", "all-gather",
                                                          "reduce-scatter", "all-to-all")}
        print(name, "collectives in the compiled update:", collectives)
        if name == "plain":  # ZeRO-3 placement of grads, params and state: nothing gathered
          assert collectives["all-gather"] == 0 and collectives["all-to-all"] == 0, collectives
        # No sharded leaf is gathered whole (nor its S_i): the Gram and <R, S_i> are contracted
        # shard by shard. (S_i shards do cross "data", as in the data-parallel exact mode.)
        gathered = [tuple(int(d) for d in dims.split(",") if d) for dims in
                    re.findall(r"= f32\[([\d,]*)\][^ ]* all-gather\(", hlo)]
        whole = {(32, 128), (128, 32), (96, 32)}
        assert not [g for g in gathered if g[-2:] in whole], (name, gathered)
      sharded, sharded_state = sharded_update(*args)
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(single))
    assert scale > 0, name
    chex.assert_trees_all_close(sharded, single, atol=1e-5 * scale, rtol=1e-5)
    chex.assert_trees_all_close(jax.tree.map(np.asarray, sharded_state),
                                jax.tree.map(np.asarray, single_state), atol=1e-5, rtol=1e-5)
    kernel_r = sharded_state.accumulator["up"]["kernel"]
    assert kernel_r.sharding.spec == P(None, "fsdp"), kernel_r.sharding
    assert kernel_r.addressable_shards[0].data.shape == (32, 32)
    print(name, "fsdp 2x4 == single device")
  _sharded_checkpoint_round_trips({"params": sharded_params, "opt_state": sharded_state})
  _sequence_gradients_constrained_like_params(mesh, shapes, specs)
  _proma_moves_plain_fsdp_bytes()


def _proma_moves_plain_fsdp_bytes():
  """Compile only, on a (1, 8) mesh, one sequence per device: accumulation-PROMA's microbatch step
  (S_i materialised from the captured factors, resharded like the params) moves at most 10% more
  collective bytes than plain FSDP's, and gathers no stack of whole per-sequence kernel gradients
  (n_seq, d_in, d_out). Without the constraint the compiler gathers them (2.7x plain's bytes,
  d_model 512, 8 x 64 tokens). At these shapes (d_model 512) the compiler partitions as it does
  at LLM shapes (experiments/README.md); at the transform tests' tiny shapes it does not."""
  import re

  sys.path.insert(0, os.path.join(REPO, "experiments"))
  import bench_fsdp
  from proma_jax.models import presets

  d = 512
  cfg = presets.preset("qwen3-0.6b", n_layers=1, d_model=d, n_heads=4, n_kv_heads=2,
                       head_dim=d // 4, mlp_dim=3 * d, vocab_size=1024, dtype="float32",
                       param_dtype="float32", remat=False, logits_chunk=0)
  total, hlo = {}, {}
  for variant in ("plain", "proma_mat"):
    compiled, _ = bench_fsdp.compile_step(cfg, variant, 8, 8, 64, 4, "both")
    hlo[variant] = compiled.as_text()
    total[variant] = sum(bench_fsdp.collectives(hlo[variant])["executed_bytes"].values())
  kernels = {(d, 3 * d), (3 * d, d), (d, d), (d, d // 2)}
  stacks = [dims for dims in re.findall(r"= f32\[8,(\d+,\d+)\][^ ]* all-gather\(", hlo["proma_mat"])
            if tuple(int(x) for x in dims.split(",")) in kernels]
  assert not stacks, stacks
  assert total["proma_mat"] <= 1.1 * total["plain"], total
  print(f"proma moves {total['proma_mat'] / 2**20:.2f} MiB per microbatch, plain FSDP "
        f"{total['plain'] / 2**20:.2f} MiB")


def _sequence_gradients_constrained_like_params(mesh, shapes, specs):
  """`constrain_sequence_gradients` inside jit: S stacks computed with their sequences over both
  axes leave with the leaf's own sharding (sequence axis replicated), values unchanged; None and
  matrix-free factors pass through."""
  import chex
  import jax
  import jax.numpy as jnp

  import proma_jax
  from proma_jax import mesh as mesh_lib
  param_shardings = mesh_lib.shardings(mesh, specs)
  seq = jax.tree.map(lambda s: jnp.arange(8 * s.size, dtype=jnp.float32).reshape(8, *s.shape),
                     shapes)
  seq["norm"]["scale"] = None
  factors = proma_jax.DenseSequenceFactors(jnp.ones((16, 32)), jnp.ones((16, 128)),
                                           jnp.zeros(16, jnp.int32), 8)
  seq["up"]["kernel"] = factors
  rows = jax.tree.map(lambda x: jax.device_put(x, mesh_lib.sequence_sharded(mesh, 0, 8)), seq)
  out = jax.jit(lambda s: mesh_lib.constrain_sequence_gradients(
      jax.tree.map(lambda x: 2.0 * x, s), param_shardings))(rows)
  assert out["norm"]["scale"] is None
  for leaf in (out["embed"]["embedding"], out["down"]["kernel"]):  # (8, *leaf): leaf dim 0 sharded
    expected = jax.sharding.NamedSharding(mesh, mesh_lib.P(None, "fsdp"))
    assert leaf.sharding.is_equivalent_to(expected, 3), leaf.sharding
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, out),
                              jax.tree.map(lambda x: 2.0 * np.asarray(x), seq))
  print("sequence gradients constrained like the params")


def _sharded_checkpoint_round_trips(state):
  """`state` saved from its 2 x 4 placement restores onto 1 x 8, 4 x 2 and one device: straight
  onto each template's shardings, equal values, the device checksums agreeing across layouts."""
  import tempfile

  import chex
  import jax

  from proma_jax import mesh as mesh_lib
  from proma_jax.checkpoint import Checkpointer

  with tempfile.TemporaryDirectory() as directory:
    Checkpointer(directory).save(3, state)
    expected = jax.tree.map(np.asarray, state)
    for data, fsdp in ((1, 8), (4, 2), (1, 1)):
      mesh = mesh_lib.fsdp_mesh(data, fsdp)
      zeros = jax.tree.map(np.zeros_like, expected)  # placed by the rule for this mesh
      template = mesh_lib.place(zeros, mesh, mesh_lib.param_specs(zeros, fsdp, min_size=1024))
      step, restored, _ = Checkpointer(directory).restore(template)
      assert step == 3
      for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(template)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want.sharding)
      chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored), expected)
      print(f"sharded checkpoint 2x4 -> {data}x{fsdp} restored onto its shardings")


CASES = {"transforms": case_transforms,
         "mesh_optimizer_steps": case_mesh_optimizer_steps,
         "fsdp_transforms": case_fsdp_transforms}


# ---------------------------------------------------------------------------------------------
# pytest entry points.


@pytest.fixture(scope="module")
def transforms_report():
  """Output of the transform-level cases, run once in one 4-device subprocess."""
  return _run_case("transforms")


def test_exact_mode_equals_single_device_for_each_variant(transforms_report):
  """Accumulation, intra and both under sharded jit on 4 devices equal the single-device update."""
  for name in ("accumulation", "intra", "both"):
    assert f"{name} exact == single device" in transforms_report


def test_local_accumulation_equals_its_per_device_definition(transforms_report):
  """Local accumulation equals sum_d (M^(d) - P^(d)(R)), and exact mode on orthogonal spans."""
  assert "local accumulation None exact == per-device definition" in transforms_report
  assert "local accumulation 0.5 gram_schmidt == per-device definition" in transforms_report
  assert "local == exact on orthogonal device spans" in transforms_report


def test_local_intra_equals_its_per_device_definition(transforms_report):
  """Local intra equals sum_d (M^(d) - s Qa_d Qa_d^T M^(d) Qg_d Qg_d^T)."""
  assert "local intra == per-device definition" in transforms_report


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, warm_dir):
  """Directory whose "single" holds the 1-device, 1-process reference run of proma, from the
  shared warm start. Run in this (1-device) pytest process: `trainer.trainer_for` reuses the
  trainer that test_train compiled for the same config when both run in one worker."""
  from proma_jax import train
  directory = tmp_path_factory.mktemp("reference")
  train.run(_tiny("proma", str(warm_dir)), str(directory / "single"), progress=False)
  return directory


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(MESH_STEPS))
def test_optimizer_step_on_each_mesh_equals_one_device(algorithm):
  """Each algorithm's optimizer step on a 2 x 4 FSDP mesh (each device its own sequence), and
  proma's on a 4-device data mesh, equal one device's to 1e-4; local intra steps; the fused path
  equals the unfused one on meshes; a pretrained checkpoint loads onto its FSDP shards
  (case_mesh_optimizer_steps, one subprocess per algorithm)."""
  out = _run_case("mesh_optimizer_steps", algorithm, devices=8)  # no tight time limit
  for layout in MESH_STEPS[algorithm]:
    assert f"{algorithm} optimizer step {layout} {MESHES[layout]} == 1 device" in out, out
  expected = {"proma_intra": ["proma_intra local mode steps"],
              "proma_both": ["proma_both fused == unfused on"],
              "grpo": ["pretrained checkpoint loaded onto its fsdp 2x2 shards"]}
  for line in expected.get(algorithm, []):
    assert line in out, out


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _tiny_flags(warm_dir) -> list[str]:
  """The command-line form of `_tiny("proma", warm_dir)` (the test compares the run.json configs)."""
  c = _tiny("proma", str(warm_dir))
  fields = {"steps": c.steps, "checkpoint.every": c.checkpoint.every,
            **{f"{section}.{k}": v for section in ("model", "rollout", "train", "sft", "eval")
               for k, v in c[section].items()}}
  return [f"--config.{k}={v}" for k, v in fields.items() if v is not None]  # None: the default


@pytest.mark.slow
def test_two_processes_match_one_process(reference_run, warm_dir, tmp_path):
  """`python -m proma_jax.train` as 2 processes x 4 CPU devices (gloo collectives) on a
  ("data", "fsdp") = 2 x 4 mesh, every 2-D leaf sharded over "fsdp" across both processes'
  devices, logs the metrics of the 1-process, 1-device run; process 0 alone writes metrics, each
  process writes its own shards of the checkpoint. (The data-parallel mesh is the case fsdp = 1
  of the same code: `mesh.place` with replicated specs.)"""
  sys.path.insert(0, TESTS)
  workdir, port = tmp_path / "two", _free_port()
  devices, mesh = 4, ["--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.mesh.fsdp_min_size=0"]
  procs = []
  for pid in range(2):
    cmd = [sys.executable, "-m", "proma_jax.train", "--config=configs/reverse.py:proma",
           f"--workdir={workdir}", *_tiny_flags(warm_dir), *mesh,
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}",
           f"--config.distributed.coordinator=127.0.0.1:{port}"]
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                                    f"--xla_force_host_platform_device_count={devices}")
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outputs = [p.communicate(timeout=1800)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  _compare_records(_read_metrics(workdir), _read_metrics(reference_run / "single"))
  configs = [json.load(open(d / "run.json"))["config"] for d in (workdir, reference_run / "single")]
  for config in configs:  # the same experiment, run on another layout
    config.pop("mesh"), config.pop("distributed")
  assert configs[0] == configs[1]
  written = {d for d in os.listdir(workdir / "checkpoints" / str(COMPARED_STEPS) / "state")
             if d.startswith("ocdbt.process_")}
  assert written == {"ocdbt.process_0", "ocdbt.process_1"}, written


@pytest.mark.slow
def test_fsdp_mesh_transforms_equal_one_device():
  """On a ("data", "fsdp") = 2 x 4 mesh of 8 CPU devices, with params, grads and the transform
  state sharded by the FSDP rule and sequence statistics over "data", plain accumulation and
  every PROMA variant give the single-device update and state; R stays sharded."""
  out = _run_case("fsdp_transforms", devices=8)
  for name in ("plain", "accumulation", "intra", "both"):
    assert f"{name} fsdp 2x4 == single device" in out, out
  for layout in ("1x8", "4x2", "1x1"):
    assert f"sharded checkpoint 2x4 -> {layout} restored onto its shardings" in out, out
  assert "sequence gradients constrained like the params" in out, out
  assert "proma moves" in out, out


def test_fsdp_rule_and_its_refusals():
  """The default rule shards a large leaf of >= 2 dims along its largest divisible dimension and
  replicates the rest; a user rule wins by path; a rule that does not fit names the leaf."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  from proma_jax import mesh as mesh_lib
  tree = {"attn": {"q": {"kernel": jax.ShapeDtypeStruct((1024, 2048), jnp.float32)}},
          "mlp": {"down": {"kernel": jax.ShapeDtypeStruct((3072, 1024), jnp.float32)}},
          "odd": jax.ShapeDtypeStruct((1026, 2050), jnp.float32),
          "norm": {"scale": jax.ShapeDtypeStruct((1024,), jnp.float32)},
          "tiny": jax.ShapeDtypeStruct((8, 8), jnp.float32)}
  specs = mesh_lib.param_specs(tree, 4)
  assert specs["attn"]["q"]["kernel"] == P(None, "fsdp")
  assert specs["mlp"]["down"]["kernel"] == P("fsdp", None)
  assert specs["odd"] == P() and specs["norm"]["scale"] == P() and specs["tiny"] == P()
  specs = mesh_lib.param_specs(tree, 4, rules=[(r"\['q'\]", ("fsdp", None)), ("norm", P())])
  assert specs["attn"]["q"]["kernel"] == P("fsdp", None)
  with pytest.raises(ValueError, match=r"\['odd'\].*dimension 0 of \(1026, 2050\) is not divisible"):
    mesh_lib.param_specs(tree, 4, rules=[("odd", ("fsdp",))])
  with pytest.raises(ValueError, match=r"\['norm'\]\['scale'\].*more entries"):
    mesh_lib.param_specs(tree, 4, rules=[("norm", (None, "fsdp"))])
  with pytest.raises(ValueError, match=r"data 2 x fsdp 4 = 8 devices requested but 1"):
    mesh_lib.fsdp_mesh(2, 4)


def test_mesh_shape_may_change_on_resume_except_in_local_mode(tmp_path):
  """Checkpoints restore onto any mesh: mesh.data / mesh.fsdp may differ from run.json's in exact
  mode; in local mode the device count changes the projection, so mesh.data may not."""
  from proma_jax import run_records

  def config(**mesh):
    return {"seed": 0, "mesh": dict(dict(data=2, mode="exact", fsdp=2, fsdp_min_size=0), **mesh)}

  (tmp_path / "run.json").write_text(json.dumps({"config": config()}))
  _, changes = run_records.check_resume_config(str(tmp_path), config(data=4, fsdp=1), False)
  assert changes == {}
  (tmp_path / "run.json").write_text(json.dumps({"config": config(mode="local", fsdp=1)}))
  with pytest.raises(run_records.ConfigChangedError, match=r"config\.mesh\.data: 2 -> 4"):
    run_records.check_resume_config(str(tmp_path), config(mode="local", fsdp=1, data=4), False)


def test_invalid_mesh_config_names_the_field(tmp_path):
  """mesh.data must divide the microbatch; more devices than exist, or an unknown mode, fail early."""
  sys.path.insert(0, TESTS)
  from proma_jax import mesh as mesh_lib
  from proma_jax.config import validate_config
  c = _tiny("proma", str(tmp_path / "never"), data=3)  # microbatch of 4 sequences
  with pytest.raises(ValueError, match=r"config\.mesh\.data: 3 does not divide the microbatch of 4"):
    validate_config(c)
  c = _tiny("proma", str(tmp_path / "never"), data=2, mode="global")
  with pytest.raises(ValueError, match=r"config\.mesh\.mode"):
    validate_config(c)
  c = _tiny("proma", str(tmp_path / "never"), data=2)
  c.distributed.update(num_processes=2, process_id=2)
  with pytest.raises(ValueError, match=r"config\.distributed\.process_id"):
    validate_config(c)
  with pytest.raises(ValueError, match=r"config\.mesh\.data: 2 devices requested but 1"):
    mesh_lib.data_mesh(2)
  c = _tiny("proma", str(tmp_path / "never"), data=2)  # this process has 1 CPU device
  with pytest.raises(ValueError, match=r"config\.mesh\.data: mesh\.data x mesh\.fsdp = 2 devices "
                                       r"requested but 1 are available"):
    validate_config(c)
  assert not (tmp_path / "never").exists()


if __name__ == "__main__":
  sys.path.insert(0, TESTS)
  CASES[sys.argv[1]](*sys.argv[2:])
