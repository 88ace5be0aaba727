"""Hugging Face checkpoints: `config.json` to `ModelConfig`, and safetensors tensors by name.

A checkpoint directory holds `config.json` and either one `model.safetensors` or shards listed in
`model.safetensors.index.json` (its `weight_map`: tensor name -> shard file). Tensors keep their
HF names and layout (linear weights (d_out, d_in)); `loading.load_pretrained` maps them onto the
decoder. GGUF files (`models.gguf`) are read into the same `Checkpoint` form.

bfloat16 tensors: safetensors' NumPy reader builds them with `np.dtype("bfloat16")`, which exists
once `ml_dtypes` (a JAX dependency) is imported; they come back as `ml_dtypes.bfloat16` arrays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from typing import Any, Callable, Iterator

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" dtype for safetensors' reader)
import numpy as np
import safetensors

from proma_jax.models import tokenizer
from proma_jax.models.decoder import ModelConfig

_ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}
# transformers' config defaults where they differ between the families (Qwen3Config, LlamaConfig).
_DEFAULTS = {
    "qwen3": dict(head_dim=128, tie_word_embeddings=False, max_position_embeddings=32768,
                  rms_norm_eps=1e-6),
    "llama": dict(head_dim=None, tie_word_embeddings=False, max_position_embeddings=2048,
                  rms_norm_eps=1e-6),
}
_DEFAULT_ROPE_THETA = 10000.0
_SINGLE_FILE, _INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint the decoder cannot load: unsupported architecture or option, a missing,
  unexpected, misshapen or non-finite tensor. The message names the tensor and the file."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """The tensors of a checkpoint under their Hugging Face names, read one at a time.

  config:         the HF `config.json` dict (for GGUF: built from the file's metadata).
  config_source:  the file `config` came from, for error messages.
  tensors_source: the file that lists the tensors (safetensors file, shard index or GGUF file).
  origins:        HF tensor name -> where it is stored, for error messages ("model-00001-of-00002
                  .safetensors", "x.gguf (GGUF tensor blk.0.attn_q.weight)").
  read:           HF tensor name -> NumPy array in HF layout (linear weights (d_out, d_in)).
  load_tokenizer: builds the checkpoint's tokenizer (`models.tokenizer`).
  rope_factors:   GGUF Llama 3.1+ only: llama.cpp's `rope_freqs.weight`, the divisor of each rotary
                  frequency under Llama 3 rope scaling, which the metadata does not describe.
  """

  config: dict
  config_source: str
  tensors_source: str
  origins: dict[str, str]
  read: Callable[[str], np.ndarray]
  load_tokenizer: Callable[[], Any]
  rope_factors: np.ndarray | None = None


def _architecture(config: dict, source: str) -> str:
  """The decoder family ("qwen3" or "llama") named by `architectures` and/or `model_type`."""
  families = set()
  for name in config.get("architectures") or []:
    if name not in _ARCHITECTURES:
      raise CheckpointError(f"{source}: unsupported architecture {name!r}; expected one of "
                            f"{sorted(_ARCHITECTURES)}")
    families.add(_ARCHITECTURES[name])
  model_type = config.get("model_type")
  if model_type is not None:
    if model_type not in _DEFAULTS:
      raise CheckpointError(f"{source}: unsupported model_type {model_type!r}; expected one of "
                            f"{sorted(_DEFAULTS)}")
    families.add(model_type)
  if len(families) != 1:
    raise CheckpointError(f"{source}: cannot tell the architecture: architectures="
                          f"{config.get('architectures')!r}, model_type={model_type!r}")
  return families.pop()


def _rope(config: dict, source: str, max_len: int,
          ) -> tuple[float, tuple[float, float, float, int] | None]:
  """(rope_theta, llama3 scaling or None) from transformers 4's `rope_theta` + `rope_scaling` or
  transformers 5's `rope_parameters` (which wins where both give a value)."""
  params = dict(config.get("rope_scaling") or {}) | dict(config.get("rope_parameters") or {})
  if any(isinstance(v, dict) for v in params.values()):
    raise CheckpointError(f"{source}: per-layer-type rope parameters are not supported: {params}")
  theta = float(params.get("rope_theta", config.get("rope_theta", _DEFAULT_ROPE_THETA)))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type != "llama3":
    raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported "
                          "(only 'default' and 'llama3')")
  missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
  if missing:
    raise CheckpointError(f"{source}: llama3 rope scaling lacks {missing}: {params}")
  original = params.get("original_max_position_embeddings", max_len)
  return theta, (float(params["factor"]), float(params["low_freq_factor"]),
                 float(params["high_freq_factor"]), int(original))


def config_from_hf(config: dict, source: str) -> ModelConfig:
  """The `ModelConfig` of a Qwen3ForCausalLM or LlamaForCausalLM `config.json` read from `source`.

  Missing optional keys take transformers' defaults (Qwen3: head_dim 128, untied; Llama: head_dim
  hidden_size / num_attention_heads, untied). Options the decoder lacks (biases, sliding windows,
  activations other than SiLU, rope types other than default and llama3) raise `CheckpointError`.
  """
  family = _architecture(config, source)
  defaults = _DEFAULTS[family]

  def get(key):
    if key in config and config[key] is not None:
      return config[key]
    if defaults.get(key) is not None:
      return defaults[key]
    raise CheckpointError(f"{source}: config key {key!r} is missing")

  for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
    if config.get(flag):
      raise CheckpointError(f"{source}: {flag}=True is not supported by the decoder")
  if config.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{source}: hidden_act={config['hidden_act']!r} is not supported "
                          "(only 'silu')")
  def integer(key):
    value = get(key)
    if isinstance(value, bool) or not isinstance(value, int):
      raise CheckpointError(f"{source}: config key {key!r} must be an integer, got {value!r}")
    return value

  n_heads = integer("num_attention_heads")
  head_dim = (integer("head_dim") if config.get("head_dim") or defaults["head_dim"]
              else integer("hidden_size") // n_heads)
  max_len = integer("max_position_embeddings")
  theta, scaling = _rope(config, source, max_len)
  fields = dict(
      vocab_size=integer("vocab_size"), d_model=integer("hidden_size"),
      n_layers=integer("num_hidden_layers"), n_heads=n_heads,
      n_kv_heads=integer("num_key_value_heads") if config.get("num_key_value_heads") else n_heads,
      head_dim=int(head_dim), mlp_dim=integer("intermediate_size"), max_len=max_len,
      tie_embeddings=bool(get("tie_word_embeddings")), rope_theta=theta,
      norm_eps=float(get("rms_norm_eps")), qk_norm=family == "qwen3", rope_scaling=scaling)
  try:
    return ModelConfig(**fields)
  except ValueError as e:
    raise CheckpointError(f"{source}: {e}") from e


def _read_json(path: pathlib.Path, what: str) -> dict:
  """The JSON object in `path`; CheckpointError naming the file when it is not one."""
  try:
    value = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise CheckpointError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{path}: the {what} must be a JSON object, got a "
                          f"{type(value).__name__}")
  return value


def _safe_open(path: pathlib.Path):
  """`safetensors.safe_open(path)`; CheckpointError naming the file when its header is unreadable
  (a truncated file, a garbled header, offsets past the end of the file)."""
  try:
    return safetensors.safe_open(path, framework="numpy")
  except (safetensors.SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt? "
                          f"({type(e).__name__}: {e})") from None


def _shard_path(directory: pathlib.Path, index: pathlib.Path, name: str, file) -> pathlib.Path:
  """The shard that the index names for tensor `name`, refused unless it is a file name inside
  `directory` (an index must not make the loader open files elsewhere)."""
  if not isinstance(file, str) or not file:
    raise CheckpointError(f"{index}: weight_map entry {name!r} -> {file!r} is not a file name")
  path = (directory / file).resolve()
  if not path.is_relative_to(directory.resolve()):
    raise CheckpointError(f"{index}: weight_map entry {name!r} -> {file!r} points outside the "
                          f"checkpoint directory {directory}; refused")
  return path


def _weight_map(directory: pathlib.Path) -> tuple[pathlib.Path, dict[str, str]]:
  """(the file that lists the tensors, tensor name -> safetensors file name): the shard index's
  `weight_map`, or every tensor of the single `model.safetensors`."""
  index = directory / _INDEX_FILE
  if index.is_file():
    weight_map = _read_json(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise CheckpointError(f"{index}: no 'weight_map' (tensor name -> shard file)")
    for name, file in weight_map.items():
      _shard_path(directory, index, name, file)
    return index, weight_map
  single = directory / _SINGLE_FILE
  if not single.is_file():
    raise CheckpointError(f"{directory}: neither {_SINGLE_FILE} nor {_INDEX_FILE} found")
  with _safe_open(single) as f:
    return single, {name: _SINGLE_FILE for name in f.keys()}


def _reader(directory: pathlib.Path, handles: dict, weight_map: dict[str, str]):
  """name -> the tensor as a NumPy array; CheckpointError naming the file and the tensor when its
  bytes cannot be read (e.g. the data ends before the header says)."""
  def read(name: str):
    try:
      return handles[weight_map[name]].get_tensor(name)
    except (safetensors.SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f"{directory / weight_map[name]}: tensor {name} is unreadable, "
                            f"truncated or corrupt? ({type(e).__name__}: {e})") from None
  return read


@contextlib.contextmanager
def open_checkpoint(directory: str | pathlib.Path) -> Iterator[Checkpoint]:
  """The HF checkpoint in `directory`, its safetensors files open (memory-mapped) while in use."""
  directory = pathlib.Path(directory)
  config_file = directory / "config.json"
  if not config_file.is_file():
    raise CheckpointError(f"{directory}: no config.json")
  config = _read_json(config_file, "config")
  listing, weight_map = _weight_map(directory)
  with contextlib.ExitStack() as stack:
    handles = {}
    for file in sorted(set(weight_map.values())):
      if not (directory / file).is_file():
        raise CheckpointError(f"{listing}: shard {file} does not exist")
      handles[file] = stack.enter_context(_safe_open(directory / file))
    for file, handle in handles.items():
      listed = {name for name, f in weight_map.items() if f == file}
      absent = sorted(listed - set(handle.keys()))
      if absent:
        raise CheckpointError(f"{directory / file}: tensor {absent[0]} listed in the index is "
                              f"not in the file ({len(absent)} missing)")
    yield Checkpoint(
        config=config, config_source=str(config_file),
        tensors_source=str(listing),
        origins={name: str(directory / file) for name, file in weight_map.items()},
        read=_reader(directory, handles, weight_map),
        load_tokenizer=lambda: tokenizer.from_hf_dir(directory))
