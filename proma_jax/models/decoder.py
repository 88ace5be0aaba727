"""The decoder of the Qwen3 and Llama families in Flax NNX, with an explicit KV cache.

One module covers Qwen3 (q/k RMSNorm, `qk_norm=True`) and Llama 3 / SmolLM2 (`qk_norm=False`,
optional Llama-3 rope scaling); the demo's tiny model is a preset of the same decoder
(`models.presets`). Architecture (HF Qwen3/Llama, parameter names included): token embedding `embed_tokens`; `n_layers`
pre-norm blocks
    h = x + self_attn(input_layernorm(x)),    out = h + mlp(post_attention_layernorm(h)),
with grouped-query attention (Qwen3: RMSNorm `q_norm`/`k_norm` over each head; then rotary positions) and
a SwiGLU MLP `down_proj(silu(gate_proj(x)) * up_proj(x))`; final `norm`; logits from the tied
embedding (`embed_tokens.attend`) or an untied `lm_head`. Every linear layer is a bias-free
`nn.Dense` with a 2-D kernel (d_in, d_out), called once per forward pass, so that
`capture.grads_and_dense_factors` sees each layer exactly once.

Shapes: B batch, T query length, S key length (T without a cache, the cache length with one),
D d_model, N query heads, K kv heads, G = N // K query heads per kv head, H head_dim, F mlp_dim,
V vocab, L layers.

Padding: sequences are a LEFT-padded prompt followed by the response. The forward takes the
`valid_BxT` mask of real tokens and position ids that skip padding (`positions_from_valid`).
Attention is causal over cache slots and ignores padding keys; every query may also attend to its
own slot, so padding rows (which have no valid key) stay finite and real rows are unaffected.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from proma_jax.nn import Dense
from proma_jax.models import stacked

# What ModelConfig.dtype and param_dtype, and attention_impl, accept (and a config's model fields).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_IMPLS = (None, "xla", "cudnn")
_INIT = nnx.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder hyper-parameters; `dtype` is the compute dtype, `param_dtype` the storage one."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_len: int
  tie_embeddings: bool = True
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Qwen3 normalises each query/key head before the rotary embedding; Llama does not.
  qk_norm: bool = True
  # Llama 3.1+ "llama3" rope scaling: (factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings), or None for plain rotary frequencies.
  rope_scaling: tuple[float, float, float, int] | None = None
  # `jax.nn.dot_product_attention` implementation: "xla", "cudnn", or None: cuDNN's fused kernel
  # on a GPU with bfloat16 compute, XLA everywhere else (see `attention_implementation`).
  attention_impl: str | None = None
  # Rematerialise each decoder block in the backward pass (`jax.checkpoint`): activations inside
  # a block are recomputed instead of stored; see `Transformer.__call__` for what stays live.
  remat: bool = False
  # `token_logprobs` computes log-softmax and entropy over the vocabulary in chunks of this many
  # token positions (0: all positions at once), so that no (B, T, V) array is ever formed.
  logits_chunk: int = 0
  # Stack the layers' parameters on a leading axis and run them by one `lax.scan`
  # (`models.stacked`): the block is compiled once, so compile time does not grow with depth.
  # The parameter dicts differ in layout only (`stacked.stack_layers` / `unstack_layers`).
  scan_layers: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "mlp_dim", "max_len", "rope_theta", "norm_eps"):
      if not getattr(self, name) > 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide "
                       f"n_heads={self.n_heads} (grouped-query attention)")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even (rotary embedding)")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"ModelConfig.{name} must be one of {sorted(DTYPES)}, "
                         f"got {getattr(self, name)!r}")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"ModelConfig.scan_layers must be True or False, got {self.scan_layers!r}")
    if not (isinstance(self.logits_chunk, int) and self.logits_chunk >= 0):
      raise ValueError(f"ModelConfig.logits_chunk must be an integer >= 0, got {self.logits_chunk!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig.attention_impl must be one of {ATTENTION_IMPLS}, "
                       f"got {self.attention_impl!r}")
    if self.rope_scaling is not None:
      if len(self.rope_scaling) != 4 or not all(v > 0 for v in self.rope_scaling):
        raise ValueError("ModelConfig.rope_scaling must be None or four positive numbers (factor, "
                         "low_freq_factor, high_freq_factor, original_max_position_embeddings), "
                         f"got {self.rope_scaling!r}")
      if self.rope_scaling[1] >= self.rope_scaling[2]:
        raise ValueError(f"ModelConfig.rope_scaling: low_freq_factor={self.rope_scaling[1]} must be "
                         f"below high_freq_factor={self.rope_scaling[2]}")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return DTYPES[self.dtype]

  @property
  def storage_dtype(self) -> jnp.dtype:
    return DTYPES[self.param_dtype]


class KVCache(NamedTuple):
  """Keys and values of every layer, passed in and returned by the forward (a plain pytree).

  k, v:      tuples of L arrays (B, S, K, H), or with `scan_layers` one (L, B, S, K, H) array each;
             slot s holds the key/value of the token written at s.
  valid_BxS: bool, True where slot s holds a real (non-padding) token.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid_BxS: jax.Array


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache of `max_len` slots (no valid key), in `dtype` (default: the compute dtype)."""
  dtype = cfg.compute_dtype if dtype is None else dtype
  shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  if cfg.scan_layers:
    zeros = jnp.zeros((cfg.n_layers, *shape), dtype)
  else:
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
  return KVCache(k=zeros, v=zeros, valid_BxS=jnp.zeros((batch, max_len), bool))


def positions_from_valid(valid_BxT: jax.Array) -> jax.Array:
  """Position ids that skip padding: max(cumsum(valid) - 1, 0), int32 (B, T)."""
  return jnp.maximum(jnp.cumsum(valid_BxT.astype(jnp.int32), axis=1) - 1, 0)


def rope_frequencies(head_dim: int, theta: float,
                     scaling: tuple[float, float, float, int] | None = None) -> jax.Array:
  """Inverse frequencies theta^(-2i/H), i < H/2, float32; with Llama 3's `scaling` applied.

  Llama 3 ("llama3" rope type, HF `_compute_llama3_parameters`): wavelengths 2 pi / f longer than
  original_max / low_freq_factor are divided by `factor`, those shorter than
  original_max / high_freq_factor are kept, and the band between is interpolated smoothly.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return inv_freq
  factor, low, high, original = scaling
  wavelen = 2 * jnp.pi / inv_freq
  smooth = (original / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
  is_medium = (wavelen <= original / low) & (wavelen >= original / high)
  return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float,
               scaling: tuple[float, float, float, int] | None = None) -> jax.Array:
  """Rotary embedding, HF rotate-half convention, computed in float32.

  With x = [x1, x2] split in halves and angles phi_i = pos * f_i (`rope_frequencies`), i < H/2:
      rope(x) = [x1 cos(phi) - x2 sin(phi), x2 cos(phi) + x1 sin(phi)].
  """
  h = x_BxTxNxH.shape[-1]
  inv_freq_Hh = rope_frequencies(h, theta, scaling)
  phi_BxTx1xHh = (positions_BxT.astype(jnp.float32)[..., None] * inv_freq_Hh)[:, :, None, :]
  cos, sin = jnp.cos(phi_BxTx1xHh), jnp.sin(phi_BxTx1xHh)
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2, last axis) + eps) * scale, in float32, returned in the compute dtype."""

  def __init__(self, dim: int, cfg: ModelConfig):
    self.scale = nnx.Param(jnp.ones((dim,), cfg.storage_dtype))
    self.eps = cfg.norm_eps
    self.dtype = cfg.compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def _dense(cfg: ModelConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> Dense:
  return Dense(d_in, d_out, use_bias=False, dtype=cfg.compute_dtype,
               param_dtype=cfg.storage_dtype, kernel_init=_INIT, rngs=rngs)


def attention_implementation(cfg: ModelConfig) -> str:
  """`cfg.attention_impl`, with None resolved: "cudnn" on a GPU backend with bfloat16 compute (its
  fused kernel never forms the (B, N, T, S) scores), else "xla" (float32 scores; CPU, TPU, fp32)."""
  if cfg.attention_impl is not None:
    return cfg.attention_impl
  on_gpu = jax.default_backend() == "gpu"
  return "cudnn" if on_gpu and cfg.compute_dtype == jnp.bfloat16 else "xla"


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary positions (and Qwen3's per-head q/k RMSNorm)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    n, k, h, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    self.q_proj = _dense(cfg, d, n * h, rngs)
    self.k_proj = _dense(cfg, d, k * h, rngs)
    self.v_proj = _dense(cfg, d, k * h, rngs)
    self.o_proj = _dense(cfg, n * h, d, rngs)
    self.q_norm = RMSNorm(h, cfg) if cfg.qk_norm else None
    self.k_norm = RMSNorm(h, cfg) if cfg.qk_norm else None
    self.cfg = cfg

  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, kv_cache, cache_index, layer=None):
    """softmax(q k^T / sqrt(H) + mask) v over the keys of `kv_cache` (after writing the T new ones).

    kv_cache: None (keys are the T inputs) or a layer's `(k_BxSxKxH, v_BxSxKxH)`, to which the new
    keys/values are written at slots [cache_index, cache_index + T). With `layer` (scanned layers),
    the cache of every layer `(k_LxBxSxKxH, v_LxBxSxKxH)`: the new keys are written into layer
    `layer`'s slots only, in place, and that layer's keys are read. Returns (out_BxTxD, new kv).
    The product is `jax.nn.dot_product_attention` (`cfg.attention_impl`): cuDNN's fused kernel on
    GPUs where it applies, XLA's softmax(q k^T) v elsewhere.
    """
    cfg = self.cfg
    b, t, _ = x_BxTxD.shape
    n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q_BxTxNxH = self.q_proj(x_BxTxD).reshape(b, t, n, h)
    k_BxTxKxH = self.k_proj(x_BxTxD).reshape(b, t, k, h)
    v_BxTxKxH = self.v_proj(x_BxTxD).reshape(b, t, k, h)
    if cfg.qk_norm:
      q_BxTxNxH, k_BxTxKxH = self.q_norm(q_BxTxNxH), self.k_norm(k_BxTxKxH)
    q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, cfg.rope_theta, cfg.rope_scaling)
    k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, cfg.rope_theta, cfg.rope_scaling)
    if kv_cache is None:
      k_BxSxKxH, v_BxSxKxH = k_BxTxKxH, v_BxTxKxH
    elif layer is None:
      k_cache_BxSxKxH, v_cache_BxSxKxH = kv_cache
      start = (0, cache_index, 0, 0)
      k_BxSxKxH = jax.lax.dynamic_update_slice(
          k_cache_BxSxKxH, k_BxTxKxH.astype(k_cache_BxSxKxH.dtype), start)
      v_BxSxKxH = jax.lax.dynamic_update_slice(
          v_cache_BxSxKxH, v_BxTxKxH.astype(v_cache_BxSxKxH.dtype), start)
      kv_cache = (k_BxSxKxH, v_BxSxKxH)
    else:  # one stacked cache for every layer: write T slots of this layer, read this layer
      k_cache, v_cache = kv_cache
      start = (layer, 0, cache_index, 0, 0)
      k_cache = jax.lax.dynamic_update_slice(k_cache, k_BxTxKxH[None].astype(k_cache.dtype), start)
      v_cache = jax.lax.dynamic_update_slice(v_cache, v_BxTxKxH[None].astype(v_cache.dtype), start)
      k_BxSxKxH = jax.lax.dynamic_index_in_dim(k_cache, layer, keepdims=False)
      v_BxSxKxH = jax.lax.dynamic_index_in_dim(v_cache, layer, keepdims=False)
      kv_cache = (k_cache, v_cache)
    dtype = cfg.compute_dtype
    out_BxTxNxH = jax.nn.dot_product_attention(
        q_BxTxNxH.astype(dtype), k_BxSxKxH.astype(dtype), v_BxSxKxH.astype(dtype),
        mask=mask_BxTxS[:, None], scale=h ** -0.5, implementation=attention_implementation(cfg))
    return self.o_proj(out_BxTxNxH.reshape(b, t, n * h)), kv_cache


class MLP(nnx.Module):
  """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.gate_proj = _dense(cfg, cfg.d_model, cfg.mlp_dim, rngs)
    self.up_proj = _dense(cfg, cfg.d_model, cfg.mlp_dim, rngs)
    self.down_proj = _dense(cfg, cfg.mlp_dim, cfg.d_model, rngs)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD))


class Block(nnx.Module):
  """Pre-norm decoder block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.d_model, cfg)
    self.self_attn = Attention(cfg, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, kv_cache, cache_index, layer=None):
    attn_BxTxD, kv_cache = self.self_attn(self.input_layernorm(x_BxTxD), positions_BxT,
                                          mask_BxTxS, kv_cache, cache_index, layer)
    h_BxTxD = x_BxTxD + attn_BxTxD
    return h_BxTxD + self.mlp(self.post_attention_layernorm(h_BxTxD)), kv_cache


def _call_block(block, x_BxTxD, positions_BxT, mask_BxTxS, kv, cache_index):
  return block(x_BxTxD, positions_BxT, mask_BxTxS, kv, cache_index)


# With `cfg.remat`, each block's backward recomputes its forward from the block input: what stays
# live between the forward and the backward pass is, per layer, the block input x (B, T, D) plus
# whatever the block hands out, which under `proma_jax.capture` is every Dense layer's input A
# (needed by PROMA's statistics anyway). Inner activations (q, k, v, attention weights, the MLP's
# (B, T, F) hidden) are recomputed. The KV-cache path (sampling, no backward) never remats.
_remat_block = nnx.remat(_call_block, static_argnums=(5,), graph=False)

# Scanned layers (`models.stacked.scan`), by `cfg.remat`: True recomputes each block's forward in
# its backward step, as above. False still recomputes the elementwise work (norms, rotary, SiLU,
# softmax) and saves every matmul's output: a value that crosses the scan's loop boundary must be
# stored whole, stacked over the layers, where XLA fuses it into its consumers in the unscanned
# model. Saving everything was measured at +415 MiB over the unscanned model at 4 Qwen3-0.6B-shaped
# layers (8 x 128 tokens); this policy at -89 MiB (experiments/README.md, "Scanned layers").
_SCAN_POLICY = {True: jax.checkpoint_policies.nothing_saveable,
                False: jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class Transformer(nnx.Module):
  """The decoder: `model(tokens, positions, valid, cache=None, cache_index=None)`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                                  param_dtype=cfg.storage_dtype, embedding_init=_INIT, rngs=rngs)
    if cfg.scan_layers:  # one Block, every parameter (L, ...): `models.stacked`
      self.layers = stacked.make_stacked(lambda: Block(cfg, rngs), cfg.n_layers)
    else:
      self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
    self.norm = RMSNorm(cfg.d_model, cfg)
    self.lm_head = None if cfg.tie_embeddings else _dense(cfg, cfg.d_model, cfg.vocab_size, rngs)

  def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array, valid_BxT: jax.Array,
               cache: KVCache | None = None, cache_index: jax.Array | int | None = None,
               ) -> tuple[jax.Array, KVCache | None]:
    """Logits of the next token at every input position.

    Args:
      tokens_BxT: int32 token ids. positions_BxT: int32 position ids (`positions_from_valid`).
      valid_BxT: bool/float mask of real tokens; invalid keys are never attended to.
      cache: optional `KVCache`; the T new keys/values and validity are written at slots
        [cache_index, cache_index + T) and query t (slot cache_index + t) attends to the valid
        slots s <= cache_index + t. Without a cache, query t attends to valid keys s <= t.
      cache_index: int or int32 scalar, required with `cache`.

    Returns:
      `(logits_BxTxV float32, new_cache)`, `new_cache` None when `cache` is None.
    """
    x_BxTxD, new_cache = self.hidden_states(tokens_BxT, positions_BxT, valid_BxT, cache,
                                            cache_index)
    return self.logits(x_BxTxD), new_cache

  def logits(self, x_BxTxD: jax.Array) -> jax.Array:
    """float32 logits of final-norm hidden states (`hidden_states`): the (tied or untied) head."""
    if self.lm_head is None:
      logits_BxTxV = jnp.einsum("btd,vd->btv", x_BxTxD, self.embed_tokens.embedding[...].astype(
          x_BxTxD.dtype), preferred_element_type=jnp.float32)
    else:
      logits_BxTxV = self.lm_head(x_BxTxD)
    return logits_BxTxV.astype(jnp.float32)

  def hidden_states(self, tokens_BxT, positions_BxT, valid_BxT, cache=None, cache_index=None,
                    ) -> tuple[jax.Array, KVCache | None]:
    """The final-norm hidden states (B, T, D) in the compute dtype, and the new cache."""
    _, t = tokens_BxT.shape
    valid_BxT = valid_BxT.astype(bool)
    if cache is None:
      key_valid_BxS, query_slot_T, kv_caches = valid_BxT, jnp.arange(t), [None] * self.cfg.n_layers
    else:
      if cache_index is None:
        raise ValueError("cache_index is required with a cache")
      cache_index = jnp.asarray(cache_index, jnp.int32)
      key_valid_BxS = jax.lax.dynamic_update_slice(cache.valid_BxS, valid_BxT, (0, cache_index))
      query_slot_T = cache_index + jnp.arange(t)
      kv_caches = None if self.cfg.scan_layers else list(zip(cache.k, cache.v))
    key_slot_S = jnp.arange(key_valid_BxS.shape[1])
    causal_TxS = key_slot_S[None, :] <= query_slot_T[:, None]
    self_TxS = key_slot_S[None, :] == query_slot_T[:, None]
    mask_BxTxS = (causal_TxS[None] & key_valid_BxS[:, None, :]) | self_TxS[None]

    x_BxTxD = self.embed_tokens(tokens_BxT)
    if self.cfg.scan_layers:
      return self._scanned_hidden_states(x_BxTxD, positions_BxT, mask_BxTxS, cache, cache_index,
                                         key_valid_BxS)
    new_kv = []
    call_block = _remat_block if self.cfg.remat and cache is None else _call_block
    for layer, kv in zip(self.layers, kv_caches):
      x_BxTxD, kv = call_block(layer, x_BxTxD, positions_BxT, mask_BxTxS, kv, cache_index)
      new_kv.append(kv)
    new_cache = None if cache is None else KVCache(
        k=tuple(k for k, _ in new_kv), v=tuple(v for _, v in new_kv), valid_BxS=key_valid_BxS)
    return self.norm(x_BxTxD), new_cache

  def _scanned_hidden_states(self, x_BxTxD, positions_BxT, mask_BxTxS, cache, cache_index,
                             key_valid_BxS):
    """`hidden_states`' layers by one `lax.scan` over the stacked block (`models.stacked`)."""
    if cache is None:
      def step(block, x_BxTxD, _):
        return block(x_BxTxD, positions_BxT, mask_BxTxS, None, None)[0], None

      x_BxTxD, _ = stacked.scan(self.layers, step, x_BxTxD,
                                policy=_SCAN_POLICY[self.cfg.remat])
      return self.norm(x_BxTxD), None

    # The cache rides in the carry and each layer writes its T new slots in place: as scanned
    # outputs the whole cache would be copied at every decoding step.
    def cached_step(block, carry, layer):
      x_BxTxD, kv = carry
      return block(x_BxTxD, positions_BxT, mask_BxTxS, kv, cache_index, layer), None

    (x_BxTxD, (k, v)), _ = stacked.scan(self.layers, cached_step, (x_BxTxD, (cache.k, cache.v)),
                                        jnp.arange(self.cfg.n_layers))
    return self.norm(x_BxTxD), KVCache(k=k, v=v, valid_BxS=key_valid_BxS)

  def head_kernel(self) -> jax.Array:
    """The output projection (D, V) in the compute dtype: the tied embedding's transpose or
    `lm_head`'s kernel, as a plain array (a chunked head bypasses `Dense` capture)."""
    if self.lm_head is None:
      return self.embed_tokens.embedding[...].T.astype(self.cfg.compute_dtype)
    return self.lm_head.kernel[...].astype(self.cfg.compute_dtype)


def make_model(cfg: ModelConfig, seed: int) -> Transformer:
  """A freshly initialised decoder: N(0, 0.02^2) kernels and embeddings, unit norm scales."""
  return Transformer(cfg, rngs=nnx.Rngs(seed))


def separate_layers(model: Transformer) -> Transformer:
  """`model` with its layers as a list of blocks (`scan_layers=False`), the same parameters
  unstacked (`stacked.unstack_layers`); `model` itself when its layers are not scanned.

  Inside jit this costs a copy of the layers' parameters. The sampler pays it once per call: a
  decoding step through scanned layers slices every layer's weights out of the stacked arrays at
  every token, measured 0.78x the tokens/s of separate layers on the CPU (experiments/README.md,
  "Scanned layers")."""
  if not model.cfg.scan_layers:
    return model
  cfg = dataclasses.replace(model.cfg, scan_layers=False)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, stacked.unstack_layers(nnx.to_pure_dict(nnx.state(model))))
  return nnx.merge(graphdef, state)


def forward_logits(model: Transformer, tokens_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """float32 next-token logits (B, T, V) of a left-padded batch: the entry point for outside checks.

  mask_BxT is 1 for real tokens and 0 for padding; position ids count real tokens only
  (`cumsum(mask) - 1`, `positions_from_valid`). Rows at padding positions are finite but
  meaningless. Equal to Hugging Face transformers' `model(input_ids, attention_mask).logits` on
  the same checkpoint (tests/test_pretrained.py).
  """
  logits_BxTxV, _ = model(tokens_BxT, positions_from_valid(mask_BxT), mask_BxT)
  return logits_BxTxV


def token_logprobs(model: Transformer, tokens_BxT: jax.Array, valid_BxT: jax.Array,
                   ) -> tuple[jax.Array, jax.Array]:
  """Teacher-forced log-probabilities and predictive entropies: THE policy log-prob.

  With p_t = softmax(logits_t) the model's distribution of token t+1 given tokens[:, :t+1]
  (positions from `positions_from_valid(valid_BxT)`):
      logp[:, t]    = log p_t(tokens[:, t+1]) = logits_t[y] - logsumexp(logits_t),
      entropy[:, t] = -sum_v p_t(v) log p_t(v) = logsumexp(logits_t) - sum_v p_t(v) logits_t[v],
  t = 0 .. T-2. Both are float32 (B, T-1) and unmasked: callers mask with valid_BxT[:, 1:] (or a
  response mask).

  With `model.cfg.logits_chunk = C > 0` the B (T-1) positions are processed C at a time by a
  rematerialised `lax.map`: at most a (C, V) float32 block of logits exists, forward or backward,
  instead of (B, T, V). The head then reads its kernel as a plain array (`head_kernel`), so an
  untied `lm_head` is not a captured `Dense` (its statistics, if any, come from the vmap path).
  """
  positions_BxT = positions_from_valid(valid_BxT)
  chunk = model.cfg.logits_chunk
  if not chunk:
    logits_BxTxV, _ = model(tokens_BxT, positions_BxT, valid_BxT)
    return _logp_and_entropy(logits_BxTxV[:, :-1], tokens_BxT[:, 1:])
  x_BxTxD, _ = model.hidden_states(tokens_BxT, positions_BxT, valid_BxT)
  b, t, d = x_BxTxD.shape
  n = b * (t - 1)
  n_chunks = -(-n // chunk)
  x_NxD = jnp.pad(x_BxTxD[:, :-1].reshape(n, d), ((0, n_chunks * chunk - n), (0, 0)))
  y_N = jnp.pad(tokens_BxT[:, 1:].reshape(n), (0, n_chunks * chunk - n))
  w_DxV = model.head_kernel()

  @jax.checkpoint
  def one_chunk(xy):
    x_CxD, y_C = xy
    logits_CxV = jnp.dot(x_CxD, w_DxV, preferred_element_type=jnp.float32)
    return _logp_and_entropy(logits_CxV, y_C)

  logp, entropy = jax.lax.map(one_chunk, (x_NxD.reshape(n_chunks, chunk, d),
                                          y_N.reshape(n_chunks, chunk)))
  return logp.reshape(-1)[:n].reshape(b, t - 1), entropy.reshape(-1)[:n].reshape(b, t - 1)


def _logp_and_entropy(logits_xV: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """log p(target) and the entropy of softmax(logits) over the last axis, float32."""
  logits_xV = logits_xV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits_xV, axis=-1)
  logp = jnp.take_along_axis(logits_xV, targets[..., None], axis=-1)[..., 0] - lse
  probs_xV = jnp.exp(logits_xV - lse[..., None])
  return logp, lse - jnp.sum(probs_xV * logits_xV, axis=-1)
