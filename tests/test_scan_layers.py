"""Scanned decoder layers (models/stacked.py): the same model, the same gradients and the same PROMA
step, layer by layer, as the unscanned decoder; and every surface that meets the stacked layout
(loaders, checkpoints, FSDP placement, the sampler)."""

import dataclasses
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import proma_jax
from proma_jax import mesh as mesh_lib, sampling, train, transforms
from proma_jax.checkpoint import Checkpointer
from proma_jax.models import loading, presets, stacked
from proma_jax.models.decoder import make_model, token_logprobs
from proma_jax.seqgrads import DenseFactors, DenseSequenceFactors

from helpers import optimizer_steps, read_metrics, small, tiny_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
CFG = presets.preset("demo", vocab_size=40, max_len=32, n_layers=3)


def both_layouts(**overrides):
  """(unscanned model, scanned model) of the same config and seed."""
  cfg = dataclasses.replace(CFG, **overrides)
  return (make_model(dataclasses.replace(cfg, scan_layers=False), 0),
          make_model(dataclasses.replace(cfg, scan_layers=True), 0))


def pure(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def batch(seed=1, b=3, t=12):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(1, CFG.vocab_size, (b, t)), jnp.int32)
  valid = np.ones((b, t), np.float32)
  valid[0, :4] = 0.0  # left padding
  return tokens, jnp.asarray(valid)


def test_stacked_params_are_the_unscanned_params_stacked():
  flat, scanned = both_layouts()
  assert stacked.is_stacked(pure(scanned)) and not stacked.is_stacked(pure(flat))
  chex.assert_shape(pure(scanned)["layers"]["mlp"]["up_proj"]["kernel"], (3, 64, 192))
  chex.assert_trees_all_equal(stacked.stack_layers(pure(flat)), pure(scanned))
  chex.assert_trees_all_equal(stacked.unstack_layers(pure(scanned)), pure(flat))
  mixed = dict(pure(flat), layers={0: {}, 2: {}})
  with pytest.raises(ValueError, match="expected 0..1"):
    stacked.stack_layers(mixed)


# With remat in the slow tier (tests/test_model.py checks remat blocks in the fast one).
@pytest.mark.parametrize("remat", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_scanned_logprobs_and_gradients_equal_unscanned(remat):
  flat, scanned = both_layouts(remat=remat)
  tokens, valid = batch()

  @jax.jit
  def value_and_grad(params, graphdef):
    def f(p):
      logp, entropy = token_logprobs(nnx.merge(graphdef, p), tokens, valid)
      return jnp.sum(logp * valid[:, 1:]) + 0.1 * jnp.sum(entropy), logp
    return jax.value_and_grad(f, has_aux=True)(params)

  results = []
  for model in (flat, scanned):
    graphdef, params = nnx.split(model, nnx.Param)
    (_, logp), grads = jax.jit(value_and_grad, static_argnums=1)(params, graphdef)
    results.append((logp, nnx.to_pure_dict(grads)))
  chex.assert_trees_all_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(results[1][1], stacked.stack_layers(results[0][1]),
                              atol=1e-5, rtol=1e-4)


def test_scanned_sampling_equals_unscanned():
  """The KV cache of scanned layers is one (L, B, S, K, H) array per k and v, written in place
  by the scan; the sampled tokens and log-probs are the unscanned cache's."""
  rollouts = []
  prompt, valid = batch(seed=2, b=4, t=8)
  for model in both_layouts():
    graphdef, state = nnx.split(model)
    rollouts.append(jax.jit(lambda s, key, graphdef=graphdef: sampling.sample(
        graphdef, s, prompt, valid, key, max_new_tokens=12, eos_id=0, pad_id=0,
        temperature=1.0))(state, jax.random.key(3)))
  chex.assert_trees_all_equal(rollouts[1].tokens_BxT, rollouts[0].tokens_BxT)
  chex.assert_trees_all_close(rollouts[1].logprobs_BxL, rollouts[0].logprobs_BxL, atol=1e-5)


def random_statistics(rng, n_layers=3, n_seq=4, t=5, d_in=6, d_out=8):
  f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return dict(r=f32(n_layers, d_in, d_out), m=f32(n_layers, d_in, d_out),
              a=f32(n_layers, n_seq * t, d_in), g=f32(n_layers, n_seq * t, d_out),
              segment_ids=jnp.repeat(jnp.arange(n_seq, dtype=jnp.int32), t), n_seq=n_seq, t=t)


@pytest.mark.parametrize("route", ["stacked", "matrix_free", "blocked"])
def test_layerwise_change_equals_each_layer_on_its_own(route):
  """`layerwise_change` (vmap over the layer axis) against a Python loop of `microbatch_change`
  on each layer's slice: the Gram, the intra range finder and the metrics of layer l use layer l
  only."""
  x = random_statistics(np.random.default_rng(0))
  n_layers = x["r"].shape[0]
  s_stacked = jnp.einsum("lbti,lbto->blio", x["a"].reshape(n_layers, x["n_seq"], x["t"], -1),
                         x["g"].reshape(n_layers, x["n_seq"], x["t"], -1))
  seq_grads = {"stacked": s_stacked,
               "matrix_free": DenseSequenceFactors(x["a"], x["g"], x["segment_ids"], x["n_seq"]),
               "blocked": DenseSequenceFactors(x["a"], x["g"], x["segment_ids"], x["n_seq"], 4),
               }[route]
  factors = DenseFactors(x["a"], x["g"])
  keys = transforms.layer_keys(jax.random.PRNGKey(7), n_layers)
  acc = transforms.AccumulationOptions(shrinkage=0.7, ridge=0.1)
  intra = transforms.IntraOptions(rank=3, shrinkage=0.5)
  project = jnp.array(True)
  got = jax.jit(lambda: transforms.layerwise_change(
      x["r"], x["m"], seq_grads, factors, keys, project, acc, intra))()

  def layer(tree, l):
    if isinstance(tree, DenseSequenceFactors):
      return tree._replace(activations=tree.activations[l], output_grads=tree.output_grads[l])
    return tree[:, l]

  expected = [jax.jit(lambda l=l: transforms.microbatch_change(
      x["r"][l], x["m"][l], layer(seq_grads, l), DenseFactors(x["a"][l], x["g"][l]), keys[l],
      project, acc, intra))() for l in range(n_layers)]
  chex.assert_trees_all_close(got, jax.tree.map(lambda *xs: jnp.stack(xs), *expected),
                              atol=1e-5, rtol=1e-5)
  assert float(jnp.min(got[1])) > 0 and float(jnp.min(got[2])) > 0  # both projections acted


def test_stacked_transform_equals_the_unstacked_transform():
  """proma_accumulation on a stacked leaf (stacked=) gives, layer for layer, what it gives on the
  layers as separate leaves: state, updates and metrics, over two optimizer steps."""
  rng = np.random.default_rng(1)
  n_layers, n_seq, shape = 3, 4, (5, 6)
  f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  params_stacked = {"layers": {"w": f32(n_layers, *shape)}, "head": f32(6, 2)}
  params_flat = stacked.unstack_layers(params_stacked)
  kw = dict(num_microbatches=2, shrinkage=0.8, ridge=0.05)
  tx_stacked = proma_jax.proma_accumulation(optax.adam(1e-2), stacked=stacked.stacked_paths, **kw)
  tx_flat = proma_jax.proma_accumulation(optax.adam(1e-2), **kw)
  states = [tx_stacked.init(params_stacked), tx_flat.init(params_flat)]
  params = [params_stacked, params_flat]
  for _ in range(4):  # two optimizer steps of two microbatches
    grads = {"layers": {"w": f32(n_layers, *shape)}, "head": f32(6, 2)}
    seqs = {"layers": {"w": f32(n_seq, n_layers, *shape)}, "head": f32(n_seq, 6, 2)}
    seqs_flat = {"layers": {l: {"w": seqs["layers"]["w"][:, l]} for l in range(n_layers)},
                 "head": seqs["head"]}
    updates_s, states[0] = jax.jit(tx_stacked.update)(grads, states[0], params[0],
                                                      seq_grads=seqs)
    updates_f, states[1] = jax.jit(tx_flat.update)(stacked.unstack_layers(grads), states[1],
                                                   params[1], seq_grads=seqs_flat)
    chex.assert_trees_all_close(updates_s, stacked.stack_layers(updates_f), atol=1e-6)
    params = [optax.apply_updates(params[0], updates_s), optax.apply_updates(params[1], updates_f)]
    chex.assert_trees_all_close(proma_jax.proma_metrics(states[0]),
                                proma_jax.proma_metrics(states[1]), atol=1e-6, rtol=1e-5)
  assert float(proma_jax.proma_metrics(states[0])["proma/reduction"]) > 0


def test_stacked_option_is_checked():
  tx = proma_jax.proma_accumulation(optax.sgd(1.0), 2, stacked={"w": True, "b": False})
  params = {"w": jnp.zeros((3, 2, 2)), "b": jnp.zeros((2,))}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"seq_grads\['w'\] must have shape \(n_seq, \*\(3, 2, 2\)\) for the stacked"):
    tx.update(params, state, params, seq_grads={"w": jnp.zeros((4, 2, 2)), "b": None})
  with pytest.raises(ValueError, match="structure of the params"):
    proma_jax.proma_accumulation(optax.sgd(1.0), 2, stacked={"w": True}).init(params)


def test_fsdp_never_shards_the_layer_axis():
  """Even where the layer axis is the largest dimension (64 layers of 8 x 16), the stacked leaf
  is placed as each layer's leaf would be."""
  tree = {"layers": {"mlp": {"kernel": jax.ShapeDtypeStruct((64, 8, 16), jnp.float32)}},
          "embed": jax.ShapeDtypeStruct((64, 16), jnp.float32)}
  specs = mesh_lib.param_specs(tree, 4, min_size=1, layer_axis=stacked.is_stacked_name)
  assert specs["layers"]["mlp"]["kernel"] == jax.sharding.PartitionSpec(None, None, "fsdp")
  assert specs["embed"] == jax.sharding.PartitionSpec("fsdp", None)
  assert mesh_lib.fsdp_spec((64, 8, 16), 4, 1) == jax.sharding.PartitionSpec("fsdp", None, None)
  assert stacked.is_stacked_path(("layers", "mlp", "kernel"))
  assert not stacked.is_stacked_path(("layers", 3, "mlp", "kernel"))


@pytest.mark.parametrize("name", ["tiny_qwen3", pytest.param("tiny_llama", marks=pytest.mark.slow)])
def test_loaders_stack_the_checkpoint_layers(name):
  """Pretrained checkpoints load scanned by default: the tensors of the unscanned load, stacked,
  and the same logits."""
  path = os.path.join(FIXTURES, name)
  scanned = loading.load_model(path)
  flat = loading.load_model(path, scan_layers=False)
  assert scanned.cfg.scan_layers and not flat.cfg.scan_layers
  chex.assert_trees_all_equal(pure(scanned), stacked.stack_layers(pure(flat)))
  tokens, valid = batch(b=2, t=6)
  tokens = tokens % flat.cfg.vocab_size
  chex.assert_trees_all_close(token_logprobs(scanned, tokens, valid),
                              token_logprobs(flat, tokens, valid), atol=1e-5, rtol=1e-5)


# An unscanned checkpoint (older runs) restored scanned stays fast; the reverse is slow.
@pytest.mark.parametrize("saved_scanned", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_checkpoints_restore_in_either_layout(tmp_path, saved_scanned):
  """A training state saved with the layers unstacked (older runs, scan_layers=False) restores
  into a stacked template and the other way round: params, Adam's moments and PROMA's state."""
  flat, scanned = both_layouts()
  tx = proma_jax.proma_intra(optax.adam(1e-3), 2, stacked=stacked.stacked_paths)
  states = {}
  for key, model in (("flat", flat), ("scanned", scanned)):
    params = pure(model)
    states[key] = {"params": params, "opt_state": tx.init(params)}
  # Make the saved state non-trivial: shift every leaf by its index.
  saved_key, other_key = ("scanned", "flat") if saved_scanned else ("flat", "scanned")
  saved = states[saved_key]
  leaves, treedef = jax.tree.flatten(saved)
  saved = treedef.unflatten([jnp.asarray(x) + i for i, x in enumerate(leaves)])
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(5, saved, {"note": "x"})
  step, restored, meta = stacked.restore_either_layout(ckpt, states[other_key])
  ckpt.close()
  assert step == 5 and meta == {"note": "x"}
  convert = stacked.unstack_layers if saved_scanned else stacked.stack_layers
  chex.assert_trees_all_equal(restored, stacked.map_layer_dicts(convert, saved))
  assert jax.tree.structure(restored) == jax.tree.structure(states[other_key])


def _trainer_steps(algorithm, scan, fused):
  c = small(algorithm)
  c.model.update(n_layers=3, scan_layers=scan)
  params, metrics = optimizer_steps(c, fused=fused)
  return stacked.stack_layers(params), metrics


# Two compiled training steps per layout: slow. The fast tier keeps the scanned log-probs,
# gradients, layerwise changes and transform above, and tests/test_fused.py's fused step.
@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False])
def test_scanned_training_equals_unscanned(fused):
  """Two optimizer steps of the RL loop's proma update on 3 layers, scanned and not: the same
  params (stacked) and metrics. Accumulation-PROMA has no random range finder, so the
  comparison is exact to float rounding: each layer's Gram is its own, as when the layers were
  separate leaves."""
  flat = _trainer_steps("proma", scan=False, fused=fused)
  scanned = _trainer_steps("proma", scan=True, fused=fused)
  assert flat[1]["proma/reduction"] > 0
  chex.assert_trees_all_close(scanned[0], flat[0], rtol=0, atol=1e-5)
  chex.assert_trees_all_close(scanned[1], flat[1], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_an_unscanned_run_resumes_scanned(warm_dir, tmp_path):
  """A run checkpointed with the layers unstacked (runs from before scan_layers) resumes with
  them stacked; its warm start, cached unstacked, loads too."""
  c = tiny_config("proma", warm_dir, steps=1)
  c.model.scan_layers = False
  train.run(c, str(tmp_path), progress=False)
  c.model.scan_layers, c.steps = True, 2
  train.run(c, str(tmp_path), progress=False)
  metrics = read_metrics(tmp_path)
  assert sorted(metrics) == [0, 1, 2] and np.isfinite(metrics[2]["kl/init"])
