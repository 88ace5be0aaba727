"""The fused path (PROMA inside the backward pass) equals the unfused one, variant by variant."""

import chex
import jax
import numpy as np
import optax
import pytest

from helpers import LR, STEPS, optimizer_steps, small


def assert_params_close_in_bfloat16(fused, unfused):
  """After one optimizer step: 99% of the entries within 1e-5, every entry within 2 Adam steps.

  Where a gradient entry is near zero, Adam's normalisation turns its rounding into a step of up
  to lr; in bf16 that rounding is 2^-8 of the products summed, so a few entries (0.3% measured)
  move by whole steps between two summation orders. (After a second step every entry differs a
  little: the first step's differences change the second step's whole forward pass.)"""
  diffs = np.concatenate([np.abs(a - b).ravel() for a, b in zip(
      jax.tree.leaves(fused), jax.tree.leaves(unfused))])
  assert np.mean(diffs > 1e-5) < 0.01, np.mean(diffs > 1e-5)
  assert diffs.max() <= 2 * LR, diffs.max()


def assert_fused_equals_unfused(c, reference=None):
  steps = 1 if c.model.dtype == "bfloat16" else STEPS
  unfused = optimizer_steps(c if reference is None else reference, fused=False, steps=steps)
  fused = optimizer_steps(c, fused=True, steps=steps)
  if c.algorithm in ("proma", "proma_both"):
    assert unfused[1]["proma/reduction"] > 0, unfused[1]
  if c.algorithm in ("proma_intra", "proma_both"):
    assert unfused[1]["proma/intra_reduction"] > 0, unfused[1]
  if c.model.dtype == "bfloat16":
    assert_params_close_in_bfloat16(fused[0], unfused[0])
  else:
    chex.assert_trees_all_close(fused[0], unfused[0], rtol=0, atol=1e-5)
  # The fused proma also reports the loss's own metrics (pg/ratio_mean), as the other variants do.
  assert set(unfused[1]) <= set(fused[1]), (set(unfused[1]), set(fused[1]))
  chex.assert_trees_all_close({k: fused[1][k] for k in unfused[1]}, unfused[1], rtol=1e-4,
                              atol=1e-7)


# Each case compiles two training steps (30-100 s on 2 cores): one stays in the fast tier.
# proma_both at its default knobs is the remat and untied-head case below (and, with knobs, the
# knob cases), so it has no case of its own here.
@pytest.mark.parametrize("algorithm", ["proma", pytest.param("proma_intra", marks=pytest.mark.slow)])
def test_fused_equals_unfused(algorithm):
  assert_fused_equals_unfused(small(algorithm))


@pytest.mark.slow
def test_fused_equals_unfused_on_unscanned_layers():
  """The cases above run the default scanned layers (models/stacked.py); the fused slots work on
  a list of separate layers too."""
  c = small("proma_both")
  c.model.scan_layers = False
  assert_fused_equals_unfused(c)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,knobs", [
    ("proma", dict(shrinkage=0.5, ridge=0.1, relative_bound=0.5, skip_fraction=0.5)),
    ("proma", dict(solver="gram_schmidt", relative_bound=0.05)),
    ("proma_both", dict(solver="gram_schmidt", intra_shrinkage=0.5, rank=3, power_iters=2,
                        skip_fraction=0.25)),
    ("proma_both", dict(scope="dense", relative_bound=0.5)),
])
def test_fused_equals_unfused_for_each_knob(algorithm, knobs):
  assert_fused_equals_unfused(small(algorithm, **knobs))


@pytest.mark.slow
def test_fused_equals_unfused_with_remat_and_an_untied_chunked_head():
  """The LLM settings: rematerialised blocks, and an untied head read as a plain array under
  logits_chunk, which is no fused Dense and gets its S_i from the vmap path (scope "all")."""
  c = small("proma_both")
  c.model.update(remat=True, logits_chunk=8, tie_embeddings=False)
  assert_fused_equals_unfused(c)


@pytest.mark.slow
def test_fused_equals_unfused_in_bfloat16():
  """bf16 compute (float32 params): the layer inputs and output gradients are bf16 on both paths.

  The reference of the fused proma is the unfused one-backward statistics (proma_both with the
  intra projection off, which is proma): the unfused proma takes every S_i from its own
  per-sequence backward pass (vmap), whose bf16 rounding differs from a batched backward's by
  bf16's 2^-8, which Adam turns into whole steps where a gradient entry is near zero. proma_both
  has both projections, so its fused path in bf16 covers proma's and proma_intra's (each of which
  is checked against its unfused path in float32 above)."""
  c = small("proma_both")
  c.model.dtype = "bfloat16"
  assert_fused_equals_unfused(c)


def test_blocked_statistics_equal_stacked():
  """The Gram and <R, S_i> from S_i formed a block of columns at a time equal a float64 NumPy
  computation from the whole stack, for every block width that divides d_out."""
  import jax.numpy as jnp

  from proma_jax import seqgrads
  rng = np.random.default_rng(1)
  n, t, d_in, d_out = 3, 5, 4, 6
  a, g = rng.normal(size=(n * t, d_in)), rng.normal(size=(n * t, d_out))
  r = rng.normal(size=(d_in, d_out))
  s = np.einsum("bti,bto->bio", a.reshape(n, t, d_in), g.reshape(n, t, d_out))
  expected = (np.einsum("iab,jab->ij", s, s), np.einsum("iab,ab->i", s, r))
  ids = jnp.repeat(jnp.arange(n, dtype=jnp.int32), t)
  for block in (1, 2, 3, 6):
    factors = seqgrads.DenseSequenceFactors(jnp.asarray(a, jnp.float32),
                                            jnp.asarray(g, jnp.float32), ids, n, block)
    got = jax.jit(seqgrads.dense_statistics)(jnp.asarray(r, jnp.float32), factors)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-4)
  assert seqgrads.blocked_columns(8, 1024, 3072, 16 * 2**20) == 512
  assert seqgrads.blocked_columns(8, 3072, 1024, 16 * 2**20) == 128


def test_a_dense_layer_called_twice_is_refused():
  """A Dense called twice in one forward pass would add two changes of R: a clear error."""
  import jax.numpy as jnp
  from flax import nnx

  import proma_jax

  class Twice(nnx.Module):
    def __init__(self):
      self.layer = proma_jax.Dense(4, 4, use_bias=False, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.layer(jnp.tanh(self.layer(x)))

  model = Twice()
  tx = proma_jax.proma_accumulation(optax.sgd(0.1), 2)
  state = tx.init(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  batch = jnp.ones((2, 3, 4))
  with pytest.raises(ValueError, match="called more than once"):
    proma_jax.policy_gradient_and_fused_changes(
        lambda m, b: jnp.sum(m(b), axis=(1, 2)), model, batch, jnp.array([1.0, -1.0]), state,
        num_microbatches=2, accumulation=proma_jax.AccumulationOptions())


def test_a_model_without_dense_layers_is_refused():
  """Nothing to fuse (no proma_jax.Dense is called): a clear error, not a silent plain step."""
  import jax.numpy as jnp
  from flax import nnx

  import proma_jax

  class Plain(nnx.Module):
    def __init__(self):
      self.layer = nnx.Linear(4, 4, use_bias=False, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.layer(x)

  model = Plain()
  tx = proma_jax.proma_intra(optax.sgd(0.1), 2)
  state = tx.init(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  with pytest.raises(ValueError, match="no proma_jax.Dense"):
    proma_jax.policy_gradient_and_fused_changes(
        lambda m, b: jnp.sum(m(b), axis=(1, 2)), model, jnp.ones((2, 3, 4)),
        jnp.array([1.0, -1.0]), state, num_microbatches=2, intra=proma_jax.IntraOptions())
