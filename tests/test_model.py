"""Tests of the decoder (`proma_jax.models.decoder`) and its KV-cache sampler (`proma_jax.sampling`)."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from proma_jax import capture
from proma_jax.models.decoder import (ModelConfig, init_cache, make_model, positions_from_valid,
                             token_logprobs)
from proma_jax.sampling import sample

CFG = ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  mlp_dim=64, max_len=32)
PAD, EOS = 0, 1


@pytest.fixture(scope="module")
def split_model():
  return nnx.split(make_model(CFG, seed=0))


def _left_padded(seed, lengths, width):
  """Random prompts (tokens >= 2, so no PAD/EOS) left-padded with PAD to `width`."""
  tokens = jax.random.randint(jax.random.key(seed), (len(lengths), width), 2, CFG.vocab_size)
  valid = jnp.arange(width)[None, :] >= width - jnp.asarray(lengths)[:, None]
  return jnp.where(valid, tokens, PAD).astype(jnp.int32), valid


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens_BxT, valid_BxT):
  model = nnx.merge(graphdef, state)
  return model(tokens_BxT, positions_from_valid(valid_BxT), valid_BxT)[0]


@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(graphdef, state, tokens_BxT, valid_BxT):
  return token_logprobs(nnx.merge(graphdef, state), tokens_BxT, valid_BxT)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _cached_forward(graphdef, state, tokens_BxT, valid_BxT, prefill):
  """Prefill `prefill` tokens into the cache, then decode the rest one token per `lax.scan` step."""
  model = nnx.merge(graphdef, state)
  b, t = tokens_BxT.shape
  positions_BxT = positions_from_valid(valid_BxT)
  prefill_logits, cache = model(tokens_BxT[:, :prefill], positions_BxT[:, :prefill],
                                valid_BxT[:, :prefill], cache=init_cache(model.cfg, b, t),
                                cache_index=0)

  def decode(cache, inputs):
    index, token_B, position_B, valid_B = inputs
    logits_Bx1xV, cache = model(token_B[:, None], position_B[:, None], valid_B[:, None],
                                cache=cache, cache_index=index)
    return cache, logits_Bx1xV[:, 0]

  _, decode_logits_TxBxV = jax.lax.scan(
      decode, cache, (jnp.arange(prefill, t), tokens_BxT[:, prefill:].T,
                      positions_BxT[:, prefill:].T, valid_BxT[:, prefill:].T))
  return jnp.concatenate([prefill_logits, decode_logits_TxBxV.transpose(1, 0, 2)], axis=1)


# The untied head in the slow tier (test_chunked_logprobs_equal_full_vocabulary keeps it fast).
@pytest.mark.parametrize("tie_embeddings", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_kv_cache_forward_equals_full_forward(tie_embeddings):
  """Prefill + token-by-token decode through the KV cache gives the full forward's logits at every
  position, with left-padded rows and a masked (post-EOS-like) tail."""
  cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tie_embeddings})
  graphdef, state = nnx.split(make_model(cfg, seed=1))
  tokens, valid = _left_padded(0, [10, 7, 3], 10)
  valid = valid.at[1, 8:].set(False)
  full = _forward(graphdef, state, tokens, valid)
  cached = _cached_forward(graphdef, state, tokens, valid, 6)
  assert np.isfinite(np.asarray(full)).all()
  chex.assert_trees_all_close(cached, full, atol=1e-5)


def test_padding_invariance(split_model):
  """Logits of a left-padded sequence at its real positions equal those of the unpadded one."""
  graphdef, state = split_model
  tokens, valid = _left_padded(1, [5], 5)
  padded_tokens = jnp.concatenate([jnp.full((1, 3), PAD, jnp.int32), tokens], axis=1)
  padded_valid = jnp.concatenate([jnp.zeros((1, 3), bool), valid], axis=1)
  chex.assert_trees_all_close(_forward(graphdef, state, padded_tokens, padded_valid)[:, 3:],
                              _forward(graphdef, state, tokens, valid), atol=1e-5)


@pytest.fixture(scope="module")
def rollout(split_model):
  """Temperature-0.7 samples for 16 prompts of lengths 1..6 (P = 6, L = 10)."""
  graphdef, state = split_model
  prompt, prompt_valid = _left_padded(2, [6, 4, 2, 1, 5, 3, 2, 1] * 2, 6)
  return prompt, sample(graphdef, state, prompt, prompt_valid, jax.random.key(0),
                        max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=0.7)


def test_sampler_logprobs_equal_teacher_forced(split_model, rollout):
  """The sampler's log-probs of its tokens (sampled at temperature 0.7) equal the teacher-forced,
  temperature-1 `token_logprobs` of the same tokens on the response positions."""
  graphdef, state = split_model
  prompt, rollout = rollout
  logp, entropy = _token_logprobs(graphdef, state, rollout.tokens_BxT, rollout.valid_BxT)
  mask = rollout.response_mask_BxL
  chex.assert_shape(logp, (16, 15))
  chex.assert_trees_all_close(rollout.logprobs_BxL * mask, logp[:, 5:] * mask, atol=1e-5)
  assert np.isfinite(np.asarray(entropy)).all()
  chex.assert_trees_all_equal(rollout.tokens_BxT[:, :6], prompt)
  chex.assert_trees_all_equal(rollout.valid_BxT[:, 6:], mask)


def test_eos_tokens_after_eos_are_pad_and_masked(rollout):
  """Response tokens after the first EOS are PAD with mask and log-prob 0; the mask is 1 up to and
  including the EOS (everywhere for rows without EOS)."""
  _, rollout = rollout
  response = np.asarray(rollout.tokens_BxT[:, 6:])
  mask = np.asarray(rollout.response_mask_BxL)
  is_eos = response == EOS
  assert is_eos.any(axis=1).sum() >= 2, "the test needs rows that emit EOS"
  first_eos = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), response.shape[1])
  steps = np.arange(response.shape[1])[None, :]
  np.testing.assert_array_equal(mask, (steps <= first_eos[:, None]).astype(np.float32))
  np.testing.assert_array_equal(response[steps > first_eos[:, None]], PAD)
  assert (np.asarray(rollout.logprobs_BxL)[mask == 0] == 0).all()
  assert (np.asarray(rollout.logprobs_BxL)[mask == 1] < 0).all()
  np.testing.assert_array_equal(np.asarray(rollout.valid_BxT[:, 6:]), mask)


def test_greedy_is_deterministic_and_equals_full_forward_argmax(split_model):
  """Greedy sampling ignores the key and, up to EOS, equals step-by-step argmax decoding with a
  full (cache-free) forward pass over the growing sequence."""
  graphdef, state = split_model
  p, new = 5, 8
  prompt, prompt_valid = _left_padded(4, [5, 3, 1], p)
  kwargs = dict(max_new_tokens=new, eos_id=EOS, pad_id=PAD, greedy=True)
  rollout = sample(graphdef, state, prompt, prompt_valid, jax.random.key(0), **kwargs)
  chex.assert_trees_all_equal(
      rollout, sample(graphdef, state, prompt, prompt_valid, jax.random.key(7), **kwargs))

  tokens = jnp.concatenate([prompt, jnp.full((3, new), PAD, jnp.int32)], axis=1)
  valid = jnp.concatenate([prompt_valid, jnp.ones((3, new), bool)], axis=1)
  for i in range(new):
    logits = _forward(graphdef, state, tokens, valid)
    tokens = tokens.at[:, p + i].set(jnp.argmax(logits[:, p + i - 1], axis=-1))
  mask = rollout.response_mask_BxL.astype(jnp.int32)
  chex.assert_trees_all_equal(rollout.tokens_BxT[:, p:] * mask, tokens[:, p:] * mask)


def test_bfloat16_compute_gives_finite_float32_logits():
  """With dtype="bfloat16" the sampler (bf16 KV cache) and the forward run and give finite
  float32 log-probs and logits."""
  cfg = ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  graphdef, state = nnx.split(make_model(cfg, seed=0))
  prompt, prompt_valid = _left_padded(5, [4, 2], 4)
  rollout = sample(graphdef, state, prompt, prompt_valid, jax.random.key(0), max_new_tokens=4,
                   eos_id=EOS, pad_id=PAD)
  logits = _forward(graphdef, state, rollout.tokens_BxT, rollout.valid_BxT)
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  assert np.isfinite(np.asarray(rollout.logprobs_BxL)).all()


def test_every_dense_is_captured_once(split_model):
  """Each of the 7 dense layers per block is called once: its captured factors give its kernel
  gradient, grad W = A^T G, for the teacher-forced log-prob objective."""
  graphdef, state = split_model
  tokens, valid = _left_padded(6, [6, 3], 6)

  def loss_fn(m, tokens_BxT, valid_BxT):
    logp, _ = token_logprobs(m, tokens_BxT, valid_BxT)
    return jnp.sum(logp * valid_BxT[:, 1:])

  @jax.jit
  def run(state):
    return capture.grads_and_dense_factors(loss_fn, nnx.merge(graphdef, state), tokens, valid)

  _, grads, factors = run(state)
  found = 0
  for path, f in jax.tree_util.tree_leaves_with_path(
      factors, is_leaf=lambda x: isinstance(x, capture.DenseFactors)):
    grad = grads
    for k in path:
      grad = grad[k.key if hasattr(k, "key") else k.idx]
    chex.assert_trees_all_close(f.activations.T @ f.output_grads, grad, atol=1e-5)
    found += 1
  assert found == 7 * CFG.n_layers


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_chunked_logprobs_equal_full_vocabulary(tie_embeddings):
  """logits_chunk > 0 (a rematerialised lax.map over position chunks, one not dividing B (T-1))
  gives the same log-probs, entropies and parameter gradients as the full (B, T, V) computation."""
  tokens, valid = _left_padded(7, [6, 4, 2], 6)

  def run(chunk):
    cfg = dataclasses.replace(CFG, tie_embeddings=tie_embeddings, logits_chunk=chunk)
    graphdef, state = nnx.split(make_model(cfg, seed=0))

    @jax.jit
    def value_and_grads(state):
      def objective(state):
        logp, entropy = token_logprobs(nnx.merge(graphdef, state), tokens, valid)
        return jnp.sum(logp * valid[:, 1:]) + 0.3 * jnp.sum(entropy * valid[:, 1:]), (logp, entropy)
      return jax.value_and_grad(objective, has_aux=True)(state)

    return value_and_grads(state)

  chex.assert_trees_all_close(run(0), run(4), atol=1e-5, rtol=1e-5)


def test_remat_blocks_give_the_same_gradients_and_factors():
  """remat=True (each block recomputed in the backward pass) changes neither the loss gradient
  nor the dense factors that `capture` records inside the rematerialised blocks."""
  tokens, valid = _left_padded(8, [6, 3], 6)

  def loss_fn(m, tokens_BxT, valid_BxT):
    logp, _ = token_logprobs(m, tokens_BxT, valid_BxT)
    return jnp.sum(logp * valid_BxT[:, 1:])

  def run(remat):
    graphdef, state = nnx.split(make_model(dataclasses.replace(CFG, remat=remat), seed=0))
    return jax.jit(lambda s: capture.grads_and_dense_factors(
        loss_fn, nnx.merge(graphdef, s), tokens, valid, token_mask=valid))(state)

  chex.assert_trees_all_close(run(False), run(True), atol=1e-6)


@pytest.mark.parametrize("field, value", [
    ("n_kv_heads", 3), ("head_dim", 7), ("vocab_size", 0), ("dtype", "float16"),
    ("param_dtype", "int8"), ("logits_chunk", -1), ("attention_impl", "flash"),
    ("rope_scaling", (8.0, 4.0, 1.0, 32)),
])
def test_config_validation_names_the_field(field, value):
  """An invalid ModelConfig raises ValueError whose message names the offending field."""
  with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
    ModelConfig(**{**CFG.__dict__, field: value})
