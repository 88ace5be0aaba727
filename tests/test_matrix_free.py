"""Matrix-free statistics of dense kernels (docs/algorithm.md#matrix-free-statistics-for-dense-layers) equal the materialised / vmap ones."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import proma_jax
from proma_jax import losses, projection, seqgrads

# ---------------------------------------------------------------------------------------------
# Random factors: variable sequence lengths, tokens of a sequence not contiguous, padding tokens.


def random_factors(key, n_seq=5, d_in=6, d_out=4, lengths=(7, 1, 4, 9, 3), n_pad=6):
  """DenseSequenceFactors with shuffled tokens, and the float64 stacked S_i = A_i^T G_i.

  Padding tokens come in two kinds: zero activation rows with an in-range id, and random rows
  with an out-of-range id (-1 or n_seq); neither may contribute.
  """
  k_a, k_g, k_perm = jax.random.split(key, 3)
  ids = np.concatenate([np.repeat(np.arange(n_seq), lengths), np.zeros(n_pad // 2, int),
                        np.full(n_pad - n_pad // 2, -1)]).astype(np.int32)
  ids[-1] = n_seq
  n_tok = len(ids)
  a = np.asarray(jax.random.normal(k_a, (n_tok, d_in)), np.float64)
  g = np.asarray(jax.random.normal(k_g, (n_tok, d_out)), np.float64)
  a[sum(lengths):sum(lengths) + n_pad // 2] = 0.0  # zero-row padding with id 0
  perm = np.asarray(jax.random.permutation(k_perm, n_tok))
  a, g, ids = a[perm], g[perm], ids[perm]
  s = np.stack([a[ids == i].T @ g[ids == i] for i in range(n_seq)])
  factors = proma_jax.DenseSequenceFactors(jnp.asarray(a, jnp.float32), jnp.asarray(g, jnp.float32),
                                           jnp.asarray(ids), n_seq)
  return factors, s


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_matrix_free_gram_inner_combination_equal_materialised(chunk_size):
  """E^T((AA^T)*(GG^T))E, E^T rowsum((AR)*G) and A^T((Ec)*G) equal the stacked-S_i versions."""
  factors, s = random_factors(jax.random.PRNGKey(0))
  r = jax.random.normal(jax.random.PRNGKey(1), s.shape[1:])
  c = jax.random.normal(jax.random.PRNGKey(2), (s.shape[0],))

  @jax.jit
  def matrix_free(r, c, f):
    return (seqgrads.dense_sequence_gram(f, chunk_size), seqgrads.dense_sequence_inner(r, f),
            seqgrads.dense_combination(c, f))

  gram, inner, comb = matrix_free(r, c, factors)
  s_flat = s.reshape(len(s), -1)
  scale = np.abs(s_flat).max() ** 2
  np.testing.assert_allclose(gram, s_flat @ s_flat.T, atol=1e-5 * scale, rtol=1e-5)
  np.testing.assert_allclose(inner, s_flat @ np.asarray(r, np.float64).reshape(-1), atol=1e-4,
                             rtol=1e-5)
  np.testing.assert_allclose(comb, np.tensordot(np.asarray(c, np.float64), s, axes=1), atol=1e-4,
                             rtol=1e-5)
  # And the stacked float32 path of projection.py agrees with both.
  st_gram, st_inner = jax.jit(projection.stacked_statistics)(r, jnp.asarray(s, jnp.float32))
  chex.assert_trees_all_close((gram, inner), (st_gram, st_inner), atol=1e-4 * scale, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The full transform: DenseSequenceFactors leaves equal stacked seq grads over a multi-microbatch step.


def microbatch(key, n_seq=4):
  factors, s = random_factors(key, n_seq=n_seq, lengths=(5, 2, 8, 3)[:n_seq])
  k_adv, k_bias = jax.random.split(jax.random.fold_in(key, 1))
  adv = jax.random.normal(k_adv, (n_seq,))
  bias_s = jax.random.normal(k_bias, (n_seq, 4))
  s32 = jnp.asarray(s, jnp.float32)
  grads = {"kernel": -jnp.tensordot(adv, s32, axes=1), "bias": -adv @ bias_s}
  return grads, factors, {"kernel": s32, "bias": bias_s}


@pytest.mark.parametrize("make_tx, takes_factors", [
    (lambda: proma_jax.proma_accumulation(optax.identity(), 4), False),
    (lambda: proma_jax.proma_accumulation(optax.identity(), 4, relative_bound=0.3,
                                          solver="gram_schmidt"), False),
    (lambda: proma_jax.proma_both(optax.identity(), 4, rank=3), True),
])
def test_transform_with_dense_sequence_factors_equals_stacked(make_tx, takes_factors):
  """The optimizer's R after 4 microbatches is the same whether the kernel's S_i come stacked or factored."""
  tx = make_tx()
  params = {"kernel": jnp.zeros((6, 4)), "bias": jnp.zeros(4)}
  update = jax.jit(lambda g, st, s, f: tx.update(
      g, st, params, seq_grads=s, **(dict(factors=f) if takes_factors else {})))
  st_stacked = st_factored = tx.init(params)
  plain = jax.tree.map(jnp.zeros_like, params)
  for key in jax.random.split(jax.random.PRNGKey(3), 4):
    grads, factors, stacked = microbatch(key)
    plain = jax.tree.map(jnp.add, plain, grads)
    intra = {"kernel": proma_jax.DenseFactors(factors.activations, factors.output_grads), "bias": None}
    u_stacked, st_stacked = update(grads, st_stacked, stacked, intra)
    u_factored, st_factored = update(grads, st_factored, dict(stacked, kernel=factors), intra)
    chex.assert_trees_all_close(st_factored.accumulator, st_stacked.accumulator, atol=1e-4, rtol=1e-4)
  chex.assert_trees_all_close(u_factored, u_stacked, atol=1e-4, rtol=1e-4)
  assert not np.allclose(u_stacked["kernel"], plain["kernel"], atol=1e-2)  # the projection acted
  assert float(st_factored.reduction) > 0.0


def test_bad_dense_sequence_factors_raise_naming_the_leaf():
  """Wrong widths, a 1-D leaf, float segment ids or a bad num_sequences raise ValueError naming the leaf."""
  tx = proma_jax.proma_accumulation(optax.identity(), 2)
  params = {"layer": {"kernel": jnp.zeros((6, 4)), "bias": jnp.zeros(4)}}
  st = tx.init(params)
  a, g, ids = jnp.ones((10, 6)), jnp.ones((10, 4)), jnp.zeros(10, jnp.int32)
  bad = {
      "output_grads": proma_jax.DenseSequenceFactors(a, jnp.ones((10, 5)), ids, 2),
      "token counts": proma_jax.DenseSequenceFactors(a, g, jnp.zeros(9, jnp.int32), 2),
      "integer": proma_jax.DenseSequenceFactors(a, g, jnp.zeros(10), 2),
      "num_sequences": proma_jax.DenseSequenceFactors(a, g, ids, 0),
  }
  for what, f in bad.items():
    with pytest.raises(ValueError, match=r"seq_grads\['layer'\]\['kernel'\]"):
      tx.update(params, st, params, seq_grads={"layer": {"kernel": f, "bias": None}})
  with pytest.raises(ValueError, match=r"seq_grads\['layer'\]\['bias'\].*2-D"):
    tx.update(params, st, params, seq_grads={"layer": {"kernel": None,
                                                       "bias": proma_jax.DenseSequenceFactors(
                                                           a, g, ids, 2)}})


def test_choose_dense_path_rule():
  """auto: the path with fewer multiply-adds; explicit modes win; unknown modes raise."""
  # 4 x 512 tokens, 1024 x 3072: matrix-free Gram 2048^2 * 4096 >> materialised 4^2 |W|.
  assert proma_jax.choose_dense_path(4, 512, 1024, 3072) == "materialise"
  # 2 one-token sequences of a wide kernel: matrix-free 4 * 8192 + 4 |W| < (4 + 6) |W|.
  assert proma_jax.choose_dense_path(2, 1, 4096, 4096) == "matrix_free"
  assert proma_jax.choose_dense_path(16, 8, 8, 8, "matrix_free") == "matrix_free"
  assert proma_jax.choose_dense_path(1, 1, 1024, 1024, "materialise") == "materialise"
  with pytest.raises(ValueError, match="dense path"):
    proma_jax.choose_dense_path(1, 1, 2, 2, "fast")


# ---------------------------------------------------------------------------------------------
# The capture helper on a small NNX model equals the vmap path.


class TinyLM(nnx.Module):
  """Embedding -> Dense -> tanh -> mix over time -> Dense -> logits (dense and non-dense leaves)."""

  def __init__(self, vocab=11, width=8, hidden=16, rngs=None):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.hidden = proma_jax.Dense(width, hidden, rngs=rngs)
    self.out = proma_jax.Dense(hidden, vocab, use_bias=False, rngs=rngs)

  def __call__(self, tokens_BxT):
    h_BxTxH = jnp.tanh(self.hidden(self.embed(tokens_BxT)))
    h_BxTxH = h_BxTxH + 0.5 * jnp.cumsum(h_BxTxH, axis=1) / jnp.arange(1, h_BxTxH.shape[1] + 1)[:, None]
    return self.out(h_BxTxH)


def logprobs(model, tokens_BxT):
  logits = model(tokens_BxT[:, :-1])
  return jnp.take_along_axis(jax.nn.log_softmax(logits), tokens_BxT[:, 1:, None], -1)[..., 0]


@pytest.mark.parametrize("dense_path", ["matrix_free", "materialise"])
def test_capture_statistics_equal_vmap_sequence_gradients(dense_path):
  """policy_gradient_and_sequence_statistics: true loss gradient, and per-leaf statistics equal to the vmap path."""
  n_seq, length = 5, 7
  model = TinyLM(rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (n_seq, length), 0, 11)
  mask = (jnp.arange(length - 1)[None] < jnp.array([6, 4, 5, 2, 6])[:, None]).astype(jnp.float32)
  adv = jax.random.normal(jax.random.PRNGKey(2), (n_seq,))
  num_tokens = mask.sum()

  def seq_objective(m, batch):
    tokens, mask, _ = batch
    return losses.sequence_logprob(logprobs(m, tokens), mask, num_tokens)

  def loss_fn(m, batch):
    tokens, mask, adv = batch
    logp = logprobs(m, tokens)
    return losses.reinforce_loss(logp, jax.lax.stop_gradient(logp), adv, mask, num_tokens)

  def objectives(m, batch):  # f_i and the loss's metrics from one forward pass
    tokens, mask, adv = batch
    logp = logprobs(m, tokens)
    aux = losses.reinforce_loss(logp, jax.lax.stop_gradient(logp), adv, mask, num_tokens)[1]
    return losses.sequence_logprob(logp, mask, num_tokens), aux

  batch = (tokens, mask, adv.at[2].set(0.0))  # a zero-advantage sequence still has its S_i
  adv = batch[2]
  (loss, _), grads, seq, factors = jax.jit(lambda b: proma_jax.policy_gradient_and_sequence_statistics(
      objectives, model, b, b[2], has_aux=True, dense_path=dense_path))(batch)
  ref_grads = nnx.grad(lambda m: loss_fn(m, batch)[0])(model)
  chex.assert_trees_all_close(grads, nnx.to_pure_dict(ref_grads), atol=1e-6)
  _, _, ref_factors = jax.jit(lambda b: proma_jax.grads_and_dense_factors(
      lambda m, b: jnp.sum(seq_objective(m, b)), model, b))(batch)
  assert factors["embed"]["embedding"] is None
  chex.assert_trees_all_close(factors["hidden"]["kernel"], ref_factors["hidden"]["kernel"],
                              atol=1e-6, rtol=1e-5)

  graphdef, state = nnx.split(model)

  def seq_objective_of_params(p, sequence):
    st = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(st, p)
    return seq_objective(nnx.merge(graphdef, st), jax.tree.map(lambda x: x[None], sequence))[0]

  params = nnx.to_pure_dict(state)
  oracle = jax.jit(lambda p: proma_jax.sequence_gradients(seq_objective_of_params, p, batch))(params)
  kernel = seq["hidden"]["kernel"]
  expected_type = (proma_jax.DenseSequenceFactors if dense_path == "matrix_free" else jax.Array)
  assert isinstance(kernel, expected_type) and isinstance(seq["out"]["kernel"], expected_type)
  r = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(4), p.shape), params)

  @jax.jit
  def statistics(r, s):
    if isinstance(s, proma_jax.DenseSequenceFactors):
      return seqgrads.dense_statistics(r, s)
    return projection.stacked_statistics(r, s)

  for path in (("hidden", "kernel"), ("out", "kernel"), ("hidden", "bias"), ("embed", "embedding")):
    got = statistics(r[path[0]][path[1]], seq[path[0]][path[1]])
    want = statistics(r[path[0]][path[1]], oracle[path[0]][path[1]])
    scale = float(jnp.max(jnp.abs(want[0])))
    chex.assert_trees_all_close(got, want, atol=1e-5 * scale + 1e-7, rtol=2e-5)
    assert scale > 0
  # The policy gradient is -sum_i A_i S_i for the kernels too.
  c = jax.jit(seqgrads.dense_combination)(-adv, kernel) if dense_path == "matrix_free" else (
      jnp.tensordot(-adv, kernel, axes=1))
  chex.assert_trees_all_close(c, grads["hidden"]["kernel"], atol=1e-6)

  # scope="dense": non-dense leaves get None; the dense kernels are unchanged.
  _, _, dense_only, _ = jax.jit(lambda b: proma_jax.policy_gradient_and_sequence_statistics(
      objectives, model, b, b[2], has_aux=True, scope="dense", dense_path=dense_path))(batch)
  assert dense_only["embed"]["embedding"] is None and dense_only["hidden"]["bias"] is None
  chex.assert_trees_all_close(dense_only["out"]["kernel"], seq["out"]["kernel"])


def test_bf16_factors_stay_bf16_and_statistics_compute_in_float32():
  """Under bfloat16 compute the captured factors keep the layer's dtype (no float32 copy of every
  layer's inputs stays live); the matrix-free Gram, inner products and materialised S_i computed
  from them equal float64 NumPy ones on the same bfloat16 values."""
  from proma_jax.models.decoder import ModelConfig, make_model, token_logprobs
  cfg = ModelConfig(vocab_size=17, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                    mlp_dim=24, max_len=16, dtype="bfloat16")
  model = make_model(cfg, seed=0)
  n_seq, length = 3, 6
  tokens = jax.random.randint(jax.random.PRNGKey(1), (n_seq, length), 0, cfg.vocab_size)
  valid = jnp.arange(length)[None] >= jnp.array([0, 2, 3])[:, None]
  adv = jnp.array([1.0, -0.5, 2.0])

  def objectives(m, batch):
    logp, _ = token_logprobs(m, batch[0], batch[1])
    return jnp.sum(logp * batch[1][:, 1:], axis=1)

  def run(dense_path):
    return jax.jit(lambda b: proma_jax.policy_gradient_and_sequence_statistics(
        objectives, model, b, adv, token_mask=b[1], scope="dense", dense_path=dense_path))(
            (tokens, valid))

  _, _, seq, factors = run("matrix_free")
  _, _, seq_mat, _ = run("materialise")
  f = factors["layers"][0]["mlp"]["down_proj"]["kernel"]
  assert f.activations.dtype == jnp.bfloat16 and f.output_grads.dtype == jnp.bfloat16
  a = np.asarray(f.activations.astype(jnp.float32), np.float64).reshape(n_seq, length, -1)
  g = np.asarray(f.output_grads.astype(jnp.float32), np.float64).reshape(n_seq, length, -1)
  s_ref = np.einsum("nti,nto->nio", a, g)
  r = np.asarray(jax.random.normal(jax.random.PRNGKey(3), s_ref.shape[1:]), np.float64)
  gram, inner = jax.jit(seqgrads.dense_statistics)(jnp.asarray(r, jnp.float32),
                                                    seq["layers"][0]["mlp"]["down_proj"]["kernel"])
  scale = np.abs(s_ref).max()
  np.testing.assert_allclose(gram, np.einsum("nio,mio->nm", s_ref, s_ref), rtol=1e-4,
                             atol=1e-5 * scale**2)
  np.testing.assert_allclose(inner, np.einsum("io,nio->n", r, s_ref), rtol=1e-4,
                             atol=1e-5 * scale * np.abs(r).max())
  s_mat = seq_mat["layers"][0]["mlp"]["down_proj"]["kernel"]
  assert s_mat.dtype == jnp.float32
  np.testing.assert_allclose(s_mat, s_ref, rtol=1e-4, atol=1e-5 * scale)
