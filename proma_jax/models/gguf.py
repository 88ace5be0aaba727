"""GGUF files (llama.cpp) of the `llama` and `qwen3` architectures, read as HF checkpoints.

The file's metadata becomes an HF `config.json` dict (so `hf.config_from_hf` builds the
`ModelConfig`), its tensors are renamed to HF names (`blk.3.attn_q.weight` ->
`model.layers.3.self_attn.q_proj.weight`) and dequantized to float32 one at a time with
`gguf.quants.dequantize` (F32, F16, BF16, Q8_0, Q4_1, k-quants, ...). The reader's NumPy shape is
GGUF's `ne` reversed, i.e. already HF's (d_out, d_in).

Llama's q_proj/k_proj rows: llama.cpp's converter (`convert_hf_to_gguf.LlamaModel.permute`)
reorders the rows of each head from rotate-half order [x_0..x_{H/2-1}, x_{H/2}..x_{H-1}] to
interleaved pairs (x_0, x_{H/2}, x_1, ...):
    w.reshape(n_head, 2, H // 2, d_in).swapaxes(1, 2).reshape(n_head * H, d_in),
with n_head the query heads for q and the kv heads for k. `unpermute_rows` inverts it. The
converter leaves Qwen3 unpermuted (transformers' GGUF loader likewise reverses llama only).

Llama 3.1+ rope scaling is stored as a tensor, `rope_freqs.weight` (the divisor of each rotary
frequency), not as metadata: its parameters must come from the original config (pass
`rope_scaling=` to `load_pretrained`) and are checked against the tensor (`check_rope_factors`).
"""

from __future__ import annotations

import pathlib
import re

import gguf
import numpy as np
from gguf import quants

from proma_jax.models import tokenizer
from proma_jax.models.decoder import ModelConfig, rope_frequencies
from proma_jax.models.hf import Checkpoint, CheckpointError

_ARCHITECTURES = ("llama", "qwen3")
# GGUF metadata key (after "<arch>.") -> HF config key.
_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "context_length": "max_position_embeddings",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
}
_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
              "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_ROPE_FREQS = "rope_freqs.weight"


def hf_name(gguf_name: str) -> str:
  """The HF name of GGUF tensor `gguf_name`; names without one are returned unchanged."""
  module, dot, suffix = gguf_name.rpartition(".")
  if module in _TOP_LEVEL:
    return f"{_TOP_LEVEL[module]}{dot}{suffix}"
  match = re.fullmatch(r"blk\.(\d+)\.(\w+)", module)
  if match and match.group(2) in _BLOCK:
    return f"model.layers.{match.group(1)}.{_BLOCK[match.group(2)]}{dot}{suffix}"
  return gguf_name


def gguf_name(name: str) -> str:
  """The GGUF name of HF tensor `name` (the inverse of `hf_name`); ValueError when it has none."""
  module, dot, suffix = name.rpartition(".")
  for gguf_module, hf_module in _TOP_LEVEL.items():
    if module == hf_module:
      return f"{gguf_module}{dot}{suffix}"
  match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
  for gguf_part, hf_part in _BLOCK.items():
    if match and match.group(2) == hf_part:
      return f"blk.{match.group(1)}.{gguf_part}{dot}{suffix}"
  raise ValueError(f"tensor {name} has no GGUF name")


def permute_rows(w_OxI: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's q/k row permutation (`convert_hf_to_gguf.LlamaModel.permute`): rows (n_head, 2,
  H/2) -> (n_head, H/2, 2); `unpermute_rows` inverts it."""
  o = w_OxI.shape[0]
  return (w_OxI.reshape(n_head, 2, o // n_head // 2, *w_OxI.shape[1:])
          .swapaxes(1, 2).reshape(w_OxI.shape))


def unpermute_rows(w_OxI: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation: rows (n_head, H/2, 2) -> (n_head, 2, H/2)."""
  o = w_OxI.shape[0]
  return (w_OxI.reshape(n_head, o // n_head // 2, 2, *w_OxI.shape[1:])
          .swapaxes(1, 2).reshape(w_OxI.shape))


def _float32_repr(value: float) -> float:
  """A float32 metadata value as the decimal the converter wrote (9.9999997e-06 -> 1e-05)."""
  return float(str(np.float32(value)))


def config_from_metadata(meta: dict, tensor_shapes: dict[str, tuple[int, ...]],
                         source: str) -> dict:
  """The HF `config.json` dict described by GGUF metadata `meta` (key -> value).

  tensor_shapes (GGUF name -> HF-layout shape) decide `tie_word_embeddings` (no `output.weight`)
  and, where the metadata lacks `<arch>.vocab_size`, the vocabulary (rows of `token_embd`).
  """
  arch = meta.get("general.architecture")
  if arch not in _ARCHITECTURES:
    raise CheckpointError(f"{source}: unsupported GGUF architecture {arch!r}; expected one of "
                          f"{list(_ARCHITECTURES)}")
  config = {"model_type": arch, "tie_word_embeddings": "output.weight" not in tensor_shapes}
  for key, hf_key in _CONFIG_KEYS.items():
    if f"{arch}.{key}" in meta:
      config[hf_key] = meta[f"{arch}.{key}"]
  for hf_key in ("rms_norm_eps", "rope_theta"):
    if hf_key in config:
      config[hf_key] = _float32_repr(config[hf_key])
  value_length = meta.get(f"{arch}.attention.value_length", config.get("head_dim"))
  if value_length != config.get("head_dim"):
    raise CheckpointError(f"{source}: attention.key_length={config.get('head_dim')} differs from "
                          f"attention.value_length={value_length}")
  if arch == "llama" and "head_dim" not in config and f"{arch}.rope.dimension_count" in meta:
    config["head_dim"] = meta[f"{arch}.rope.dimension_count"]  # all of a Llama head rotates
  if "vocab_size" not in config and "token_embd.weight" in tensor_shapes:
    config["vocab_size"] = tensor_shapes["token_embd.weight"][0]
  scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
  if scaling_type != "none":  # config_from_hf names it as unsupported
    config["rope_scaling"] = {"rope_type": scaling_type,
                              "factor": meta.get(f"{arch}.rope.scaling.factor")}
  return config


def check_rope_factors(rope_factors: np.ndarray, cfg: ModelConfig, source: str) -> None:
  """Raise unless `cfg`'s Llama 3 rope scaling divides each rotary frequency by `rope_factors`
  (llama.cpp's `rope_freqs.weight`: plain frequency / scaled frequency)."""
  if cfg.rope_scaling is None:
    raise CheckpointError(
        f"{source}: {_ROPE_FREQS} holds Llama 3 rope-scaling factors that the GGUF metadata does "
        "not describe; pass rope_scaling=(factor, low_freq_factor, high_freq_factor, "
        "original_max_position_embeddings) from the model's config.json")
  expected = np.asarray(rope_frequencies(cfg.head_dim, cfg.rope_theta)
                        / rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
  if rope_factors.shape != expected.shape or not np.allclose(rope_factors, expected, rtol=1e-4):
    raise CheckpointError(
        f"{source}: {_ROPE_FREQS} {np.round(rope_factors, 4).tolist()} differs from the factors "
        f"of rope_scaling={cfg.rope_scaling} {np.round(expected, 4).tolist()}")


def open_checkpoint(path: str | pathlib.Path) -> Checkpoint:
  """The GGUF file at `path` as a `Checkpoint`: HF names, float32 tensors, Llama q/k unpermuted."""
  path = pathlib.Path(path)
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError, OSError) as e:  # gguf-py's errors on a cut file
    raise CheckpointError(f"{path}: not a readable GGUF file, truncated or corrupt? "
                          f"({type(e).__name__}: {e})") from None
  tensors = {t.name: t for t in reader.tensors}
  shapes = {name: tuple(int(n) for n in reversed(t.shape)) for name, t in tensors.items()}
  meta = tokenizer.read_gguf_metadata(reader)
  config = config_from_metadata(meta, shapes, str(path))
  by_hf_name = {hf_name(name): t for name, t in tensors.items() if name != _ROPE_FREQS}
  heads = {"q": config.get("num_attention_heads"),
           "k": config.get("num_key_value_heads", config.get("num_attention_heads"))}

  def read(name: str) -> np.ndarray:
    tensor = by_hf_name[name]
    try:
      w = quants.dequantize(tensor.data, tensor.tensor_type)
    except (ValueError, IndexError) as e:
      raise CheckpointError(f"{path} (GGUF tensor {tensor.name}): unreadable data, truncated or "
                            f"corrupt? ({type(e).__name__}: {e})") from None
    qk = re.fullmatch(r"model\.layers\.\d+\.self_attn\.([qk])_proj\.weight", name)
    if not qk or config["model_type"] != "llama":
      return w
    n_head = heads[qk.group(1)]
    if w.shape[0] % (2 * n_head):
      raise CheckpointError(f"{path} (GGUF tensor {tensor.name}): {w.shape[0]} rows do not split "
                            f"into {n_head} heads of even size")
    return unpermute_rows(w, n_head)

  rope_factors = None
  if _ROPE_FREQS in tensors:
    rope_factors = np.asarray(quants.dequantize(tensors[_ROPE_FREQS].data,
                                                tensors[_ROPE_FREQS].tensor_type), np.float32)
  return Checkpoint(
      config=config, config_source=str(path), tensors_source=str(path),
      origins={name: f"{path} (GGUF tensor {t.name})" for name, t in by_hf_name.items()},
      read=read, load_tokenizer=lambda: tokenizer.from_gguf_metadata(meta, str(path)),
      rope_factors=rope_factors)
