"""cuDNN's fused attention against XLA's on the same decoder: logits, KV-cache decode and gradients.

Run on a GPU: prints the max abs differences of bfloat16 forward logits (full forward and one
KV-cache decode step, left-padded batch) and of the parameter gradients of the summed token
log-probabilities, cuDNN ("cudnn") against XLA ("xla"), and exits non-zero if cuDNN fails or any
output is non-finite.

  python3 experiments/check_attention.py
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proma_jax.models import decoder, presets


def outputs(cfg, tokens_BxT, valid_BxT):
  model = decoder.make_model(cfg, seed=0)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state):
    m = nnx.merge(graphdef, state)
    logits = decoder.forward_logits(m, tokens_BxT, valid_BxT)
    b, t = tokens_BxT.shape
    cache = decoder.init_cache(cfg, b, t + 1)
    positions = decoder.positions_from_valid(valid_BxT)
    _, cache = m(tokens_BxT, positions, valid_BxT, cache=cache, cache_index=0)
    step, _ = m(tokens_BxT[:, -1:], positions[:, -1:] + 1, jnp.ones((b, 1), bool), cache=cache,
                cache_index=t)

    def objective(s):
      logp, _ = decoder.token_logprobs(nnx.merge(graphdef, s), tokens_BxT, valid_BxT)
      return jnp.sum(logp * valid_BxT[:, 1:])

    return logits, step, jax.grad(objective)(state)

  return run(state)


def main():
  cfg = presets.preset("qwen3-0.6b", n_layers=2, vocab_size=4096, dtype="bfloat16",
                       param_dtype="bfloat16")
  b, t = 4, 256
  tokens = jax.random.randint(jax.random.PRNGKey(0), (b, t), 0, cfg.vocab_size)
  valid = jnp.arange(t)[None] >= jnp.array([0, 17, 100, 255])[:, None]
  ref = outputs(dataclasses.replace(cfg, attention_impl="xla"), tokens, valid)
  got = outputs(dataclasses.replace(cfg, attention_impl="cudnn"), tokens, valid)
  ok = True
  for name, r, g in (("logits", ref[0], got[0]), ("decode step logits", ref[1], got[1]),
                     ("gradients", ref[2], got[2])):
    diffs = [float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
             for x, y in zip(jax.tree.leaves(r), jax.tree.leaves(g))]
    scale = max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)))) for x in jax.tree.leaves(r))
    finite = all(bool(np.isfinite(np.asarray(x, np.float32)).all()) for x in jax.tree.leaves(g))
    ok &= finite
    print(f"{name:20s} max |cudnn - xla| {max(diffs):.4g} (max |xla| {scale:.4g}) finite {finite}")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
