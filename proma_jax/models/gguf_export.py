"""The decoder's parameters and tokenizer written as a GGUF file that llama.cpp reads.

    write_gguf(path, params, cfg, tokenizer, "bf16")

The layout is the one llama.cpp's `convert_hf_to_gguf.py` writes for `LlamaForCausalLM` and
`Qwen3ForCausalLM`, and that `models.gguf` reads back:
  - tensors under GGUF names (`models.gguf.gguf_name`), with GGUF's shape order (the NumPy array
    is HF's (d_out, d_in)); Llama's q_proj/k_proj rows permuted to llama.cpp's interleaved rotary
    pairs (`models.gguf.permute_rows`), Qwen3's left as they are; matrices in the asked type
    (f32, f16, bf16), 1-D tensors (norm scales) always f32 as the converter does; no
    `output.weight` when the embedding is tied; `rope_freqs.weight` for Llama 3 rope scaling;
  - metadata `<arch>.*` (context length, widths, heads, rms eps, rope base, head sizes);
  - the tokenizer as `tokenizer.ggml.*`: model "gpt2" (byte-level BPE), the pre-tokenizer type
    (`tokenizer.ggml.pre`, recognised from the tokenizer's own pre-tokenizer), tokens in id order
    with their types (control tokens for special added tokens), merges, BOS/EOS/padding ids,
    add_bos_token and the chat template.
"""

from __future__ import annotations

import json
import os
import pathlib

import gguf
import numpy as np
import tokenizers
from gguf import quants

from proma_jax.models import gguf as gguf_checkpoint
from proma_jax.models import tokenizer as tokenizer_lib
from proma_jax.models.decoder import ModelConfig, rope_frequencies

TENSOR_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                "bf16": gguf.GGMLQuantizationType.BF16}
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "bf16": gguf.LlamaFileType.MOSTLY_BF16}
_PRE_TYPES = ("gpt2", "smollm", "qwen2")


def _without_offsets(node):
  """A tokenizer component's JSON without `trim_offsets`, which moves offsets and not ids."""
  if isinstance(node, dict):
    return {k: _without_offsets(v) for k, v in node.items() if k != "trim_offsets"}
  if isinstance(node, list):
    return [_without_offsets(v) for v in node]
  return node


def pre_tokenizer_type(backend: tokenizers.Tokenizer) -> str:
  """llama.cpp's name (`tokenizer.ggml.pre`) for the normaliser and pre-tokenizer of `backend`:
  the one of `tokenizer.GGUF_PRE_TYPES` that the GGUF loader rebuilds into the same JSON."""
  own = _without_offsets(json.loads(backend.to_str()))
  for pre in _PRE_TYPES:
    normalizer, pre_tokenizer = tokenizer_lib._gguf_pre_tokenizer(pre)  # pylint: disable=protected-access
    candidate = tokenizers.Tokenizer(tokenizers.models.BPE())
    candidate.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
      candidate.normalizer = normalizer
    built = _without_offsets(json.loads(candidate.to_str()))
    if all(built[key] == own[key] for key in ("normalizer", "pre_tokenizer")):
      return pre
  raise ValueError(f"the tokenizer's normaliser {own['normalizer']} and pre-tokenizer "
                   f"{own['pre_tokenizer']} match none of llama.cpp's {_PRE_TYPES}; it cannot be "
                   "written as GGUF metadata")


def _add_tokenizer(writer: gguf.GGUFWriter, tok) -> None:
  """The byte-level BPE `tok` (`models.tokenizer.HFTokenizer`) as tokenizer.ggml.* metadata."""
  backend = tok.backend
  model = json.loads(backend.to_str())["model"]
  if model.get("type") != "BPE":
    raise ValueError(f"only byte-level BPE tokenizers can be written to GGUF, not {model.get('type')}")
  vocab = backend.get_vocab(with_added_tokens=True)
  tokens = sorted(vocab, key=vocab.get)
  if [vocab[t] for t in tokens] != list(range(len(tokens))):
    raise ValueError("the tokenizer's ids are not 0..n-1; GGUF lists tokens by position")
  added = backend.get_added_tokens_decoder()
  types = [gguf.TokenType.NORMAL] * len(tokens)
  for index, token in added.items():
    types[index] = gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre_tokenizer_type(backend))
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
  writer.add_eos_token_id(tok.eos_id)
  writer.add_pad_token_id(tok.pad_id)
  if tok.bos_id is not None:
    writer.add_bos_token_id(tok.bos_id)
  writer.add_add_bos_token(bool(tok.add_bos))
  if tok.chat_template is not None:
    writer.add_chat_template(tok.chat_template)


def _add_config(writer: gguf.GGUFWriter, cfg: ModelConfig, file_type: str, name: str) -> None:
  writer.add_name(name)
  writer.add_file_type(_FILE_TYPES[file_type])
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_context_length(cfg.max_len)
  writer.add_embedding_length(cfg.d_model)
  writer.add_block_count(cfg.n_layers)
  writer.add_feed_forward_length(cfg.mlp_dim)
  writer.add_head_count(cfg.n_heads)
  writer.add_head_count_kv(cfg.n_kv_heads)
  writer.add_key_length(cfg.head_dim)
  writer.add_value_length(cfg.head_dim)
  writer.add_rope_dimension_count(cfg.head_dim)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.norm_eps)


def write_gguf(path: str | os.PathLike, hf_tensors: dict[str, np.ndarray], cfg: ModelConfig,
               tok, tensor_type: str = "bf16", *, name: str = "proma_jax export") -> pathlib.Path:
  """Writes `hf_tensors` ({HF name: float32 array in HF layout}, `models.export.hf_tensors`) of
  the decoder of `cfg` and its tokenizer `tok` as the GGUF file `path` (see the module
  docstring); matrices in `tensor_type` ("f32", "f16" or "bf16")."""
  if tensor_type not in TENSOR_TYPES:
    raise ValueError(f"GGUF tensor type {tensor_type!r} is not one of {sorted(TENSOR_TYPES)}")
  arch = "qwen3" if cfg.qk_norm else "llama"
  path = pathlib.Path(path)
  writer = gguf.GGUFWriter(path, arch)
  _add_config(writer, cfg, tensor_type, name)
  _add_tokenizer(writer, tok)
  heads = {"q_proj": cfg.n_heads, "k_proj": cfg.n_kv_heads}
  for hf_name, w in hf_tensors.items():
    if hf_name == "lm_head.weight" and cfg.tie_embeddings:
      continue
    w = np.asarray(w, np.float32)
    projection = hf_name.split(".")[-2]
    if arch == "llama" and projection in heads:
      w = gguf_checkpoint.permute_rows(w, heads[projection])
    qtype = TENSOR_TYPES[tensor_type] if w.ndim > 1 else TENSOR_TYPES["f32"]
    writer.add_tensor(gguf_checkpoint.gguf_name(hf_name), quants.quantize(w, qtype),
                      raw_dtype=qtype)
  if cfg.rope_scaling is not None:
    factors = (rope_frequencies(cfg.head_dim, cfg.rope_theta)
               / rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    writer.add_tensor("rope_freqs.weight", np.asarray(factors, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path
