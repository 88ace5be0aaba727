"""The transforms' contract with a user's training loop: dtypes, donation, arguments, scheduling.

Each test pins a behaviour `optax.MultiSteps` users rely on, or an error that replaces a silent
fallback to plain accumulation.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import proma_jax

SHAPES = {"kernel": (6, 5), "bias": (5,)}


def _microbatch(key, n_seq=3, dtype=jnp.float32):
  """Correlated S_i and M = -sum_i A_i S_i, cast to `dtype`."""
  k1, k2, k3 = jax.random.split(key, 3)
  base = {k: jax.random.normal(jax.random.fold_in(k1, i), v) for i, (k, v) in enumerate(SHAPES.items())}
  seq = {k: b[None] + 0.1 * jax.random.normal(jax.random.fold_in(k2, i), (n_seq,) + b.shape)
         for i, (k, b) in enumerate(base.items())}
  adv = jax.random.normal(k3, (n_seq,))
  grads = {k: -jnp.tensordot(adv, s, axes=1) for k, s in seq.items()}
  cast = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)
  return cast(grads), cast(seq)


def _factors(key, n_tok=7):
  a = jax.random.normal(key, (n_tok, SHAPES["kernel"][0]))
  g = jax.random.normal(jax.random.fold_in(key, 1), (n_tok, SHAPES["kernel"][1]))
  return {"kernel": proma_jax.DenseFactors(a, g), "bias": None}


def _params(dtype=jnp.float32):
  return {k: jnp.full(v, 0.5, dtype) for k, v in SHAPES.items()}


# ---------------------------------------------------------------------------------------------
# 1. bf16 and mixed-precision trees.


@pytest.mark.parametrize("param_dtype, grad_dtype", [
    pytest.param(jnp.bfloat16, jnp.bfloat16,  # bf16 params and gradients
                 marks=pytest.mark.slow),
    (jnp.float32, jnp.bfloat16),    # fp32 master params, bf16 compute gradients
])
def test_low_precision_trees_match_multisteps(param_dtype, grad_dtype):
  """With shrinkage 0, bf16/mixed trees give optax.MultiSteps' params and state dtypes; the
  accumulator stays float32 and projection runs on bf16 sequence gradients."""
  num = 2
  inner = optax.adamw(1e-2, weight_decay=0.1)
  plain = proma_jax.proma_accumulation(inner, num, shrinkage=0.0)
  ref = optax.MultiSteps(inner, num, use_grad_mean=False)
  params = _params(param_dtype)
  st, st_ref = plain.init(params), ref.init(params)
  upd = jax.jit(lambda g, s, p, x: plain.update(g, s, p, seq_grads=x))
  p_plain = p_ref = params
  for key in jax.random.split(jax.random.PRNGKey(0), 2 * num):
    grads, seq = _microbatch(key, dtype=grad_dtype)
    u, st = upd(grads, st, p_plain, seq)
    u_ref, st_ref = jax.jit(ref.update)(grads, st_ref, p_ref)
    chex.assert_trees_all_equal_dtypes(u, u_ref)
    p_plain, p_ref = optax.apply_updates(p_plain, u), optax.apply_updates(p_ref, u_ref)
  chex.assert_trees_all_equal_dtypes(st.inner_state, st_ref.inner_opt_state)
  chex.assert_trees_all_close(p_plain, p_ref, atol=1e-2)
  assert not np.allclose(np.asarray(p_plain["kernel"], np.float32), 0.5)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(st.accumulator))

  for tx, extra in [(proma_jax.proma_accumulation(inner, num), ("seq_grads",)),
                    (proma_jax.proma_both(inner, num, rank=2), ("seq_grads", "factors"))]:
    state, p = tx.init(params), params
    for i, key in enumerate(jax.random.split(jax.random.PRNGKey(1), num)):
      grads, seq = _microbatch(key, dtype=grad_dtype)
      args = {"seq_grads": seq, "factors": _factors(key)}
      u, state = jax.jit(lambda g, s, p, a: tx.update(g, s, p, **a))(
          grads, state, p, {k: args[k] for k in extra})
      p = optax.apply_updates(p, u)
    assert float(state.reduction) > 0
    chex.assert_trees_all_equal_dtypes(p, params)
    chex.assert_trees_all_equal_dtypes(state.inner_state, st_ref.inner_opt_state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))


# ---------------------------------------------------------------------------------------------
# 3. Donation.


@pytest.mark.parametrize("variant", ["accumulation", "intra", "both", "plain"])
def test_fresh_state_and_params_can_be_donated(variant):
  """jit(step, donate_argnums=(0, 1)) works on a fresh init (no buffer appears twice in the state)."""
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  tx, extra = {
      "accumulation": (proma_jax.proma_accumulation(inner, 2), ("seq_grads",)),
      "intra": (proma_jax.proma_intra(inner, 2, rank=2), ("factors",)),
      "both": (proma_jax.proma_both(inner, 2, rank=2), ("seq_grads", "factors")),
      "plain": (proma_jax.microbatch_accumulation(inner, 2), ()),
  }[variant]

  def step(params, state, grads, args):
    updates, state = tx.update(grads, state, params, **args)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(step, donate_argnums=(0, 1))
  params, state = _params(), tx.init(_params())
  for key in jax.random.split(jax.random.PRNGKey(3), 4):
    grads, seq = _microbatch(key)
    args = {"seq_grads": seq, "factors": _factors(key)}
    old_params = params
    params, state = jitted(params, state, grads, {k: args[k] for k in extra})
  assert old_params["kernel"].is_deleted()
  assert int(state.count) == 4


# ---------------------------------------------------------------------------------------------
# 4. A missing or misspelt statistic raises instead of running plain accumulation.


def test_missing_or_misspelt_statistics_raise():
  params = _params()
  grads, seq = _microbatch(jax.random.PRNGKey(4))
  acc = proma_jax.proma_accumulation(optax.sgd(0.1), 2)
  intra = proma_jax.proma_intra(optax.sgd(0.1), 2)
  both = proma_jax.proma_both(optax.sgd(0.1), 2)
  with pytest.raises(TypeError, match=r"seqgrads.*seq_grads"):
    acc.update(grads, acc.init(params), params, seqgrads=seq)
  with pytest.raises(ValueError, match="seq_grads="):
    acc.update(grads, acc.init(params), params)
  with pytest.raises(ValueError, match="seq_grads=.*all None"):
    acc.update(grads, acc.init(params), params, seq_grads={"kernel": None, "bias": None})
  with pytest.raises(TypeError, match=r"seq_grads= was given.*\['factors'\]"):
    intra.update(grads, intra.init(params), params, seq_grads=seq)
  with pytest.raises(ValueError, match="factors="):
    both.update(grads, both.init(params), params, seq_grads=seq)
  with pytest.raises(TypeError, match="seq_grads= was given"):
    plain = proma_jax.microbatch_accumulation(optax.sgd(0.1), 2)
    plain.update(grads, plain.init(params), params, seq_grads=seq)
  # A leaf deliberately left unprojected stays None; shrinkage 0 needs no statistics.
  acc.update(grads, acc.init(params), params, seq_grads=dict(seq, bias=None))
  zero = proma_jax.proma_accumulation(optax.sgd(0.1), 2, shrinkage=0.0)
  zero.update(grads, zero.init(params), params)


def test_inner_args_are_forwarded_by_name_only():
  """Keywords meant for the inner optimizer are forwarded when named in inner_args."""
  seen = {}

  def init(params):
    return optax.EmptyState()

  def update(updates, state, params=None, *, value=None, **extra):
    seen["value"] = value
    return updates, state

  inner = optax.GradientTransformationExtraArgs(init, update)
  params = _params()
  grads, seq = _microbatch(jax.random.PRNGKey(5))
  tx = proma_jax.proma_accumulation(inner, 1)
  with pytest.raises(TypeError, match="inner_args"):
    tx.update(grads, tx.init(params), params, seq_grads=seq, value=1.0)
  tx = proma_jax.proma_accumulation(inner, 1, inner_args=("value",))
  tx.update(grads, tx.init(params), params, seq_grads=seq, value=3.0)
  assert seen["value"] == 3.0


# ---------------------------------------------------------------------------------------------
# 5. Scheduling hyperparameters and jitting the metrics.


def test_inject_hyperparams_schedules_proma_knobs_under_jit():
  """inject_hyperparams(proma_accumulation): shrinkage set in the state under jit gives the same
  update as a transform built with that shrinkage; proma_metrics jits."""
  params = _params()
  batches = [_microbatch(k) for k in jax.random.split(jax.random.PRNGKey(6), 2)]
  tx = optax.inject_hyperparams(proma_jax.proma_accumulation)(
      optax.sgd(1.0), 2, shrinkage=1.0, relative_bound=0.5)
  state = tx.init(params)
  state.hyperparams["shrinkage"] = jnp.asarray(0.25)
  upd = jax.jit(lambda g, s, x: tx.update(g, s, params, seq_grads=x))
  for grads, seq in batches:
    u, state = upd(grads, state, seq)
  ref = proma_jax.proma_accumulation(optax.sgd(1.0), 2, shrinkage=0.25, relative_bound=0.5)
  ref_state = ref.init(params)
  for grads, seq in batches:
    u_ref, ref_state = ref.update(grads, ref_state, params, seq_grads=seq)
  chex.assert_trees_all_close(u, u_ref, atol=1e-6)
  metrics = jax.jit(proma_jax.proma_metrics)(state)
  assert float(metrics["proma/reduction"]) > 0
  intra = proma_jax.proma_intra(optax.sgd(1.0), 1, rank=2)
  intra_state = intra.update(batches[0][0], intra.init(params), params,
                             factors=_factors(jax.random.PRNGKey(7)))[1]
  eager, jitted = proma_jax.proma_metrics(intra_state), jax.jit(proma_jax.proma_metrics)(intra_state)
  assert set(eager) == set(jitted)
  chex.assert_trees_all_close(eager, jitted)
  assert float(jitted["proma/intra_reduction"]) == pytest.approx(
      float(jitted["proma/intra_reduction/kernel"]))
  assert float(jitted["proma/intra_reduction/bias"]) == 0.0


def test_invalid_concrete_hyperparameters_still_raise():
  for bad in (dict(shrinkage=-1.0), dict(ridge=float("nan")), dict(relative_bound=-0.1),
              dict(skip_fraction=1.5)):
    with pytest.raises(ValueError, match=list(bad)[0]):
      proma_jax.proma_accumulation(optax.sgd(1.0), 2, **bad)
  with pytest.raises(ValueError, match="rank"):
    proma_jax.proma_intra(optax.sgd(1.0), 2, rank=0)
  tx = optax.inject_hyperparams(proma_jax.proma_intra)(optax.sgd(1.0), 2, rank=2)
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(lambda s, g: tx.update(g, s, _params(), factors=_factors(jax.random.PRNGKey(0))))(
        tx.init(_params()), _params())


# ---------------------------------------------------------------------------------------------
# 6. A step whose microbatches were all dropped does not step the inner optimizer.


def test_all_dropped_step_leaves_inner_optimizer_alone():
  num = 2
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.5))
  tx = proma_jax.proma_accumulation(inner, num)
  params = _params()
  state = tx.init(params)
  upd = jax.jit(lambda g, s, p, x: tx.update(g, s, p, seq_grads=x))
  for key in jax.random.split(jax.random.PRNGKey(8), num):
    grads, seq = _microbatch(key)
    grads = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
    updates, state = upd(grads, state, params, seq)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert int(state.dropped) == num
  chex.assert_trees_all_equal(state.inner_state, tx.init(params).inner_state)
  # The next step, with finite microbatches, steps normally (count 1).
  for key in jax.random.split(jax.random.PRNGKey(9), num):
    grads, seq = _microbatch(key)
    updates, state = upd(grads, state, params, seq)
  assert int(optax.tree.get(state.inner_state, "count")) == 1
  assert float(jnp.abs(updates["kernel"]).sum()) > 0
