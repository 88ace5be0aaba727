"""PROMA transforms against an independent float64 NumPy computation of docs/algorithm.md: "Accumulation PROMA", "Intra-microbatch PROMA".

The float64 reference of accumulation PROMA (`np_accumulate`) is in tests/helpers.py, shared with
tests/test_distributed.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import proma_jax
from proma_jax import projection
from helpers import SHAPES, correlated_microbatch, np_accumulate, params_like

# ---------------------------------------------------------------------------------------------
# Helpers.


def run_microbatches(tx, params, batches, extra_name):
  """Feeds every microbatch through a jitted tx.update; returns the list of (updates, state)."""
  state = tx.init(params)
  update = jax.jit(lambda g, st, p, x: tx.update(g, st, p, **{extra_name: x}))
  out = []
  for grads, extra in batches:
    updates, state = update(grads, state, params, extra)
    out.append((updates, state))
  return out


# ---------------------------------------------------------------------------------------------
# 1. Accumulation projection equals the float64 reference.


@pytest.mark.parametrize("shrinkage,ridge,relative_bound,skip_fraction,solver", [
    (1.0, 1e-2, None, 0.0, "exact"),
    (0.5, 1e-1, None, 0.0, "exact"),
    (1.0, 1e-2, 0.5, 0.0, "exact"),
    (1.0, 1e-3, None, 0.5, "exact"),
    (1.0, 1e-2, None, 0.0, "gram_schmidt"),
    (0.7, 1e-2, 0.3, 0.25, "gram_schmidt"),
])
def test_accumulation_matches_float64_reference(shrinkage, ridge, relative_bound, skip_fraction,
                                                solver):
  """R handed to the optimizer equals a float64 NumPy evaluation of docs/algorithm.md#accumulation-proma."""
  num = 4
  batches = [correlated_microbatch(k, n_seq=5) for k in jax.random.split(jax.random.PRNGKey(0), num)]
  tx = proma_jax.proma_accumulation(optax.identity(), num, shrinkage=shrinkage, ridge=ridge,
                                    relative_bound=relative_bound, skip_fraction=skip_fraction,
                                    solver=solver)
  out = run_microbatches(tx, params_like(), batches, "seq_grads")
  expected = np_accumulate([b[0] for b in batches], [b[1] for b in batches], shrinkage=shrinkage,
                           ridge=ridge, relative_bound=relative_bound, skip_fraction=skip_fraction,
                           solver=solver)
  scale = max(np.abs(v).max() for v in expected.values())
  chex.assert_trees_all_close(out[-1][0], expected, atol=2e-5 * scale, rtol=1e-4)
  for updates, _ in out[:-1]:
    chex.assert_trees_all_close(updates, jax.tree.map(jnp.zeros_like, updates), atol=0)


def test_projection_actually_changes_the_sum():
  """On correlated gradients the projected R differs materially from the plain sum (test 1 has teeth)."""
  batches = [correlated_microbatch(k, n_seq=5) for k in jax.random.split(jax.random.PRNGKey(1), 3)]
  tx = proma_jax.proma_accumulation(optax.identity(), 3)
  r = run_microbatches(tx, params_like(), batches, "seq_grads")[-1][0]
  plain = jax.tree.map(lambda *g: sum(g), *[b[0] for b in batches])
  assert float(jnp.linalg.norm(r["kernel"] - plain["kernel"])) > 0.1 * float(
      jnp.linalg.norm(plain["kernel"]))
  chex.assert_trees_all_close(r["frozen"], plain["frozen"], rtol=1e-6)  # None leaf: unprojected


# ---------------------------------------------------------------------------------------------
# 2. shrinkage = 0 is plain gradient accumulation on every step.


def test_zero_shrinkage_equals_plain_accumulation_every_step():
  """With shrinkage 0, every optimizer step of a 3-step run equals optax.MultiSteps over the same inner."""
  num, steps = 3, 3
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
  tx = proma_jax.proma_accumulation(inner, num, shrinkage=0.0)
  ref = optax.MultiSteps(inner, num, use_grad_mean=False)
  params = {k: jnp.ones(v) for k, v in SHAPES.items()}
  p_proma, p_ref = params, params
  st, st_ref = tx.init(params), ref.init(params)
  upd = jax.jit(lambda g, s, p, x: tx.update(g, s, p, seq_grads=x))
  upd_ref = jax.jit(ref.update)
  keys = jax.random.split(jax.random.PRNGKey(2), num * steps)
  for step in range(steps):
    for j in range(num):
      grads, seq = correlated_microbatch(keys[step * num + j], 4)
      u, st = upd(grads, st, p_proma, seq)
      u_ref, st_ref = upd_ref(grads, st_ref, p_ref)
      p_proma, p_ref = optax.apply_updates(p_proma, u), optax.apply_updates(p_ref, u_ref)
    chex.assert_trees_all_close(p_proma, p_ref, atol=1e-6)
  assert not np.allclose(p_proma["kernel"], params["kernel"])


# ---------------------------------------------------------------------------------------------
# 3. Orthonormal sequence gradients: R - P is orthogonal to the span; projecting twice is a no-op.


def _project_once(r, s, ridge=1e-7):
  gram, inner = projection.stacked_statistics(r, s)
  change, _ = projection.accumulation_change(
      r, jnp.zeros_like(r), gram, inner, lambda c: projection.stacked_combination(c, s),
      shrinkage=1.0, ridge=ridge, relative_bound=None, solver="exact")
  return r + change


def test_orthonormal_projection_is_orthogonal_and_idempotent():
  """With orthonormal S_i and a tiny ridge, <R - P, S_i> = 0 and projecting R - P again changes nothing."""
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(3), (20, 4)))
  s = q.T.reshape(4, 4, 5)
  r = jax.random.normal(jax.random.PRNGKey(4), (4, 5))
  once = jax.jit(_project_once)(r, s)
  chex.assert_trees_all_close(jnp.tensordot(s, once, axes=2), jnp.zeros(4), atol=1e-5)
  chex.assert_trees_all_close(jax.jit(_project_once)(once, s), once, atol=1e-5)
  removed = r - once
  chex.assert_trees_all_close(removed, jnp.einsum("i,ijk->jk", jnp.tensordot(s, r, axes=2), s),
                              atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 4. Gram-Schmidt agrees with the exact solve on orthogonal inputs and stays bounded when correlated.


def _p(r, s, solver):
  sys = projection.normalised_system(*projection.stacked_statistics(r, s))
  w = projection.span_coefficients(sys, ridge=1e-7, solver=solver)
  return projection.stacked_combination(w * sys.scale_n, s)


def test_gram_schmidt_equals_exact_on_orthogonal_inputs():
  """On orthogonal (not unit-norm) S_i, two GS sweeps and the exact solve give the same P."""
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(5), (30, 6)))
  s = (q.T * jnp.arange(1.0, 7.0)[:, None]).reshape(6, 30)
  r = jax.random.normal(jax.random.PRNGKey(6), (30,))
  p_gs = jax.jit(lambda r, s: _p(r, s, "gram_schmidt"))(r, s)
  p_exact = jax.jit(lambda r, s: _p(r, s, "exact"))(r, s)
  chex.assert_trees_all_close(p_gs, p_exact, atol=1e-5)


def test_gram_schmidt_bounded_on_correlated_inputs_where_simultaneous_blows_up():
  """On nearly parallel S_i, sequential sweeps give ||P|| <= ||R||; the vectorised one does not."""
  n, d = 12, 64
  base = jax.random.normal(jax.random.PRNGKey(7), (d,))
  s = base[None] + 0.01 * jax.random.normal(jax.random.PRNGKey(8), (n, d))
  r = jax.random.normal(jax.random.PRNGKey(9), (d,)) + 3 * base
  p = jax.jit(lambda r, s: _p(r, s, "gram_schmidt"))(r, s)
  assert float(jnp.linalg.norm(p)) <= float(jnp.linalg.norm(r)) * (1 + 1e-6)
  sh = s / jnp.linalg.norm(s, axis=1, keepdims=True)
  simultaneous = r - (r - sh.T @ (sh @ (r - sh.T @ (sh @ r))))  # the (I - S S^T)^2 pitfall
  assert float(jnp.linalg.norm(simultaneous)) > 10 * float(jnp.linalg.norm(r))


# ---------------------------------------------------------------------------------------------
# 5. relative_bound and skip_fraction.


def test_relative_bound_caps_projection_norm():
  """||P|| after the bound is at most bound * ||M_m||, and the cap binds on this input."""
  r = jax.random.normal(jax.random.PRNGKey(10), (40,)) * 10
  s = jax.random.normal(jax.random.PRNGKey(11), (3, 40))
  m = 0.1 * jax.random.normal(jax.random.PRNGKey(12), (40,))
  bound = 0.5

  def removed(r, s, m, relative_bound):
    gram, inner = projection.stacked_statistics(r, s)
    change, removed_norm = projection.accumulation_change(
        r, m, gram, inner, lambda c: projection.stacked_combination(c, s), shrinkage=1.0,
        ridge=1e-2, relative_bound=relative_bound, solver="exact")
    return m - change, removed_norm

  p_free, _ = jax.jit(lambda r, s, m: removed(r, s, m, None))(r, s, m)
  p_capped, norm = jax.jit(lambda r, s, m: removed(r, s, m, bound))(r, s, m)
  assert float(jnp.linalg.norm(p_free)) > bound * float(jnp.linalg.norm(m))
  np.testing.assert_allclose(jnp.linalg.norm(p_capped), bound * jnp.linalg.norm(m), rtol=1e-5)
  np.testing.assert_allclose(norm, bound * jnp.linalg.norm(m), rtol=1e-5)
  chex.assert_trees_all_close(p_capped / jnp.linalg.norm(p_capped),
                              p_free / jnp.linalg.norm(p_free), atol=1e-5)


def test_skip_fraction_leaves_early_microbatches_unprojected():
  """With skip_fraction=0.5 and M=4, R after microbatch 2 equals the plain sum; microbatches 3-4 project."""
  num = 4
  batches = [correlated_microbatch(k, 4) for k in jax.random.split(jax.random.PRNGKey(13), num)]
  tx = proma_jax.proma_accumulation(optax.identity(), num, skip_fraction=0.5)
  out = run_microbatches(tx, params_like(), batches, "seq_grads")
  plain_two = jax.tree.map(lambda a, b: a + b, batches[0][0], batches[1][0])
  chex.assert_trees_all_close(out[1][1].accumulator, plain_two, atol=1e-6)
  expected = np_accumulate([b[0] for b in batches], [b[1] for b in batches], skip_fraction=0.5)
  chex.assert_trees_all_close(out[-1][0], expected, atol=1e-4, rtol=1e-4)
  plain = jax.tree.map(lambda *g: sum(g), *[b[0] for b in batches])
  assert not np.allclose(out[-1][0]["kernel"], plain["kernel"], atol=1e-2)


# ---------------------------------------------------------------------------------------------
# 6. Intra-microbatch projection.


def test_intra_exact_rank_removes_exact_kronecker_block():
  """With factors of exact rank k and rank=k, the update is M - s Pa M Pg; other leaves pass through."""
  n, d_in, d_out, k, s = 32, 12, 9, 3, 0.8
  keys = jax.random.split(jax.random.PRNGKey(14), 5)
  va = jax.random.normal(keys[0], (k, d_in))
  vg = jax.random.normal(keys[1], (k, d_out))
  a = jax.random.normal(keys[2], (n, k)) @ va
  g = jax.random.normal(keys[3], (n, k)) @ vg
  m = jax.random.normal(keys[4], (d_in, d_out))
  bias = jnp.arange(float(d_out))
  grads = {"kernel": m, "bias": bias}
  factors = {"kernel": proma_jax.DenseFactors(a, g), "bias": None}
  tx = proma_jax.proma_intra(optax.identity(), 1, rank=k, shrinkage=s)
  (updates, state), = run_microbatches(tx, jax.tree.map(jnp.zeros_like, grads), [(grads, factors)],
                                       "factors")
  va64, vg64, m64 = (np.asarray(x, np.float64) for x in (va, vg, m))
  pa = va64.T @ np.linalg.solve(va64 @ va64.T, va64)
  pg = vg64.T @ np.linalg.solve(vg64 @ vg64.T, vg64)
  expected = m64 - s * pa @ m64 @ pg
  chex.assert_trees_all_close(updates["kernel"], expected, atol=1e-4)
  chex.assert_trees_all_close(updates["bias"], bias)
  np.testing.assert_allclose(state.intra_reduction["kernel"],
                             s * np.linalg.norm(pa @ m64 @ pg) / np.linalg.norm(m64), rtol=1e-4)
  metrics = proma_jax.proma_metrics(state)
  assert set(metrics) >= {"proma/reduction", "proma/intra_reduction", "proma/dropped",
                          "proma/intra_reduction/kernel"}


def test_intra_rank_deficient_factors_remove_nothing_outside_their_span():
  """Factors of rank 2 with rank=5: only the rank-2 block is removed (no noise directions)."""
  n, d_in, d_out = 16, 10, 8
  keys = jax.random.split(jax.random.PRNGKey(15), 5)
  a = jax.random.normal(keys[0], (n, 2)) @ jax.random.normal(keys[1], (2, d_in))
  g = jax.random.normal(keys[2], (n, 2)) @ jax.random.normal(keys[3], (2, d_out))
  m = jax.random.normal(keys[4], (d_in, d_out))
  out, frac = jax.jit(lambda m, a, g: projection.intra_step(
      m, a, g, jax.random.PRNGKey(0), rank=5, shrinkage=1.0, power_iters=1))(m, a, g)
  out2, _ = jax.jit(lambda m, a, g: projection.intra_step(
      m, a, g, jax.random.PRNGKey(0), rank=2, shrinkage=1.0, power_iters=1))(m, a, g)
  chex.assert_trees_all_close(out, out2, atol=1e-4)
  assert 0.0 < float(frac) < 1.0


def test_both_variant_is_intra_then_accumulation():
  """proma_both equals feeding intra-projected gradients to proma_accumulation."""
  num, n, d_in, d_out = 3, 4, 6, 5
  keys = jax.random.split(jax.random.PRNGKey(16), num)
  batches, intra_batches = [], []
  for key in keys:
    k1, k2, k3 = jax.random.split(key, 3)
    grads, seq = correlated_microbatch(k1, n)
    factors = {"kernel": proma_jax.DenseFactors(jax.random.normal(k2, (20, d_in)),
                                                 jax.random.normal(k3, (20, d_out))),
               "bias": None, "frozen": None}
    batches.append((grads, (seq, factors)))
  both = proma_jax.proma_both(optax.identity(), num, rank=2, seed=3)
  state = both.init(params_like())
  intra = proma_jax.proma_intra(optax.identity(), 1, rank=2, seed=3)
  acc = proma_jax.proma_accumulation(optax.identity(), num)
  acc_state = acc.init(params_like())
  for j, (grads, (seq, factors)) in enumerate(batches):
    updates, state = jax.jit(both.update)(grads, state, None, seq_grads=seq, factors=factors)
    # The intra transform seeds its range finder by the global microbatch count: replay it.
    intra_state = intra.init(params_like())._replace(count=jnp.array(j, jnp.int32))
    projected, _ = jax.jit(intra.update)(grads, intra_state, None, factors=factors)
    acc_updates, acc_state = jax.jit(acc.update)(projected, acc_state, None, seq_grads=seq)
  chex.assert_trees_all_close(updates, acc_updates, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 7. Inner optimizer runs once per M microbatches.


def test_inner_step_count_advances_once_per_minibatch():
  """Chained with clip + AdamW, the inner count is k after k*M microbatches, updates zero in between."""
  num = 4
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  tx = proma_jax.proma_accumulation(inner, num)
  batches = [correlated_microbatch(k, 3) for k in jax.random.split(jax.random.PRNGKey(17), 2 * num)]
  out = run_microbatches(tx, params_like(), batches, "seq_grads")
  counts = [int(optax.tree.get(st.inner_state, "count")) for _, st in out]
  assert counts == [0, 0, 0, 1, 1, 1, 1, 2]
  for j, (u, _) in enumerate(out):
    nonzero = any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(u))
    assert nonzero == (j % num == num - 1)


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("make", [
    lambda: proma_jax.proma_accumulation(optax.sgd(1.0), 0),
    lambda: proma_jax.proma_accumulation(optax.sgd(1.0), 2, shrinkage=-1.0),
    lambda: proma_jax.proma_accumulation(optax.sgd(1.0), 2, ridge=-1e-3),
    lambda: proma_jax.proma_accumulation(optax.sgd(1.0), 2, solver="quick"),
    lambda: proma_jax.proma_accumulation(optax.sgd(1.0), 2, skip_fraction=1.5),
    lambda: proma_jax.proma_intra(optax.sgd(1.0), 2, rank=0),
    lambda: proma_jax.proma_intra(optax.sgd(1.0), 2, shrinkage=-0.1),
    lambda: proma_jax.proma_both(optax.sgd(1.0), 2, solver="cholesky"),
])
def test_invalid_construction_raises(make):
  """Invalid construction arguments raise ValueError at construction."""
  with pytest.raises(ValueError):
    make()


def test_shape_mismatch_names_leaf_and_shapes():
  """A seq_grads leaf of the wrong shape raises ValueError at trace time naming the path and shapes."""
  tx = proma_jax.proma_accumulation(optax.sgd(1.0), 2)
  params = params_like()
  grads, seq = correlated_microbatch(jax.random.PRNGKey(18), 3)
  seq["kernel"] = seq["kernel"][:, :, :4]
  with pytest.raises(ValueError, match=r"\['kernel'\].*\(6, 5\).*\(3, 6, 4\)"):
    jax.jit(lambda g, s, p, x: tx.update(g, s, p, seq_grads=x))(grads, tx.init(params), params, seq)
  with pytest.raises(ValueError, match="structure"):
    tx.update(grads, tx.init(params), params, seq_grads={"kernel": seq["kernel"]})
  bad_params = dict(params, bias=jnp.zeros(4))
  with pytest.raises(ValueError, match=r"\['bias'\].*\(5,\).*\(4,\)"):
    tx.update(grads, tx.init(params), bad_params, seq_grads=None)
  intra = proma_jax.proma_intra(optax.sgd(1.0), 2)
  factors = {"kernel": proma_jax.DenseFactors(jnp.ones((7, 6)), jnp.ones((7, 4))), "bias": None,
             "frozen": None}
  with pytest.raises(ValueError, match=r"\['kernel'\].*\(7, 4\)"):
    intra.update(grads, intra.init(params), params, factors=factors)


def test_zero_sequence_gradients_give_no_nan():
  """All-zero sequence gradients (e.g. a padded microbatch) give a finite R equal to the plain sum."""
  num = 2
  batches = [correlated_microbatch(k, 3) for k in jax.random.split(jax.random.PRNGKey(19), num)]
  zero_seq = jax.tree.map(jnp.zeros_like, batches[1][1])
  batches[1] = (batches[1][0], zero_seq)
  for ridge in (1e-2, 0.0):
    for solver in ("exact", "gram_schmidt"):
      tx = proma_jax.proma_accumulation(optax.identity(), num, ridge=ridge, solver=solver)
      out = run_microbatches(tx, params_like(), batches, "seq_grads")
      plain = jax.tree.map(lambda a, b: a + b, batches[0][0], batches[1][0])
      chex.assert_trees_all_close(out[-1][0], plain, atol=1e-6)
      assert int(out[-1][1].dropped) == 0


def test_non_finite_microbatch_is_dropped_and_counted():
  """A microbatch with a NaN gradient or NaN statistics is skipped, counted, and params stay finite."""
  num = 3
  batches = [correlated_microbatch(k, 3) for k in jax.random.split(jax.random.PRNGKey(20), num)]
  grads1 = dict(batches[1][0], bias=batches[1][0]["bias"].at[0].set(jnp.nan))
  seq2 = dict(batches[2][1], kernel=batches[2][1]["kernel"].at[0, 0, 0].set(jnp.inf))
  bad = [batches[0], (grads1, batches[1][1]), (batches[2][0], seq2)]
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
  tx = proma_jax.proma_accumulation(inner, num)
  params = {k: jnp.ones(v) for k, v in SHAPES.items()}
  out = run_microbatches(tx, params, bad, "seq_grads")
  assert int(out[-1][1].dropped) == 2
  new_params = optax.apply_updates(params, out[-1][0])
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new_params))
  ref = optax.apply_updates(params, run_microbatches(
      proma_jax.proma_accumulation(inner, 1), params, [batches[0]], "seq_grads")[-1][0])
  chex.assert_trees_all_close(new_params, ref, atol=1e-6)
