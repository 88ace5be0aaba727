"""The decoder's parameters written out as a Hugging Face checkpoint directory (and a GGUF file).

    write_hf_dir(out, params, cfg, source, dtype="float32")

`params` is a pure parameter dict (`nnx.to_pure_dict`, layers stacked or not) of a decoder whose
architecture came from the checkpoint `source` (a `models.hf.Checkpoint`: a Hugging Face
directory or a GGUF file). The directory is what `load_pretrained` and transformers read:

  config.json               the source's config (a GGUF file's metadata as Qwen3ForCausalLM or
                            LlamaForCausalLM), with the dtype written;
  model.safetensors         or shards model-0000i-of-0000n.safetensors listed in
                            model.safetensors.index.json once the tensors pass `max_shard_size`;
  tokenizer files           a directory's copied as they were; a GGUF file's tokenizer written
                            as tokenizer.json + tokenizer_config.json with its chat template;
  generation_config.json    the source's, or one naming the BOS and EOS tokens.

Each tensor is the inverse of the loader's mapping (`loading.hf_name`; dense kernels transposed
back to HF's (d_out, d_in)), so `load_pretrained(out)` gives `params` back bit for bit when
`dtype` is the parameters' dtype. Llama rows stay in HF's rotate-half order: the GGUF loader
un-permuted them on the way in. Files are written to a temporary directory beside `out` and
renamed at the end: a crash leaves no half-written model under `out`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Iterator

import ml_dtypes
import numpy as np
import safetensors.numpy
from flax import traverse_util

from proma_jax.models import gguf_export, loading, stacked
from proma_jax.models.decoder import ModelConfig
from proma_jax.models.hf import Checkpoint, CheckpointError

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# The files of a Hugging Face directory that describe the tokenizer and generation, copied as
# they are from a directory source.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")
_ARCHITECTURE = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
_INDEX = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}


def parse_size(text: str | int) -> int:
  """Bytes of a size such as 5GB, 500MB, 2GiB or 1000 (transformers' `max_shard_size` form)."""
  if isinstance(text, int) and not isinstance(text, bool):
    size = text
  else:
    match = _SIZE.match(str(text))
    if not match:
      raise ValueError(f"size {text!r} is not a number of bytes with an optional unit "
                       "(B, KB, MB, GB, KiB, MiB, GiB), e.g. 5GB")
    unit = match.group(2).lower() if match.group(2) else None
    size = int(float(match.group(1)) * _UNITS[unit])
  if size <= 0:
    raise ValueError(f"size {text!r} must be positive")
  return size


def hf_tensors(params: dict, cfg: ModelConfig, dtype: str) -> dict[str, np.ndarray]:
  """{HF tensor name: array in HF layout and `dtype`} of a pure parameter dict of the decoder of
  `cfg`. Raises CheckpointError naming a parameter the decoder of `cfg` lacks or has in another
  shape."""
  flat = traverse_util.flatten_dict(stacked.unstack_layers(params))
  expected = loading.parameter_shapes(cfg)
  if set(flat) != set(expected):
    missing, extra = sorted(set(expected) - set(flat), key=str), sorted(set(flat) - set(expected),
                                                                        key=str)
    raise CheckpointError(f"the parameters do not match the checkpoint's architecture: missing "
                     f"{missing[:3]}, unexpected {extra[:3]}")
  out = {}
  for path, leaf in flat.items():
    w = np.asarray(leaf)
    if w.shape != expected[path]:
      raise CheckpointError(f"parameter {'/'.join(map(str, path))} has shape {w.shape}, the "
                       f"checkpoint's architecture {expected[path]}")
    if path[-1] == "kernel":
      w = w.T
    out[loading.hf_name(path)] = np.ascontiguousarray(w.astype(DTYPES[dtype]))
  return out


def hf_config(source: Checkpoint, cfg: ModelConfig, dtype: str, tokenizer) -> dict:
  """config.json of the export: the source's own keys (rope settings, limits, ids as they were),
  plus, for a GGUF source, what its metadata does not say (architecture, activation, Llama 3 rope
  scaling, the special-token ids)."""
  config = dict(source.config)
  family = "qwen3" if cfg.qk_norm else "llama"
  config.setdefault("architectures", [_ARCHITECTURE[family]])
  config.setdefault("model_type", family)
  config.setdefault("hidden_act", "silu")
  config.setdefault("tie_word_embeddings", cfg.tie_embeddings)
  config.setdefault("head_dim", cfg.head_dim)
  if cfg.rope_scaling is not None and not (config.get("rope_scaling")
                                           or config.get("rope_parameters")):
    factor, low, high, original = cfg.rope_scaling
    config["rope_scaling"] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                              "high_freq_factor": high,
                              "original_max_position_embeddings": original}
  for key, value in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id)):
    if value is not None:
      config.setdefault(key, value)
  config["dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"] = dtype
  return config


def _shards(tensors: dict[str, np.ndarray], max_shard_size: int) -> list[list[str]]:
  """Tensor names grouped in order into shards of at most `max_shard_size` bytes (a tensor larger
  than that gets a shard of its own)."""
  shards, size = [[]], 0
  for name, w in tensors.items():
    if shards[-1] and size + w.nbytes > max_shard_size:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += w.nbytes
  return shards


def write_safetensors(directory: pathlib.Path, tensors: dict[str, np.ndarray],
                      max_shard_size: int) -> list[str]:
  """`tensors` as model.safetensors, or as shards with model.safetensors.index.json when they
  pass `max_shard_size` bytes; returns the files written."""
  groups = _shards(tensors, max_shard_size)
  if len(groups) == 1:
    safetensors.numpy.save_file(tensors, directory / "model.safetensors",
                                metadata={"format": "pt"})
    return ["model.safetensors"]
  files, weight_map = [], {}
  for i, names in enumerate(groups):
    file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    safetensors.numpy.save_file({n: tensors[n] for n in names}, directory / file,
                                metadata={"format": "pt"})
    weight_map.update({n: file for n in names})
    files.append(file)
  index = {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())},
           "weight_map": weight_map}
  (directory / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
  return [*files, _INDEX]


def _copy_tokenizer_files(source_dir: pathlib.Path, directory: pathlib.Path) -> list[str]:
  copied = []
  for name in TOKENIZER_FILES:
    if (source_dir / name).is_file():
      shutil.copyfile(source_dir / name, directory / name)
      copied.append(name)
  return copied


def write_tokenizer(directory: pathlib.Path, tokenizer) -> list[str]:
  """tokenizer.json and tokenizer_config.json of an `HFTokenizer` that has no files of its own (a
  GGUF file's): the backend as it is, plus a post-processor that prepends BOS when the source's
  tokenizer does (`add_bos`), which is how transformers and our loader read that setting."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import processors  # pylint: disable=import-outside-toplevel
  backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())  # a copy to modify
  if tokenizer.add_bos:
    bos = tokenizer.special_tokens["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)])
  backend.save(str(directory / "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            **dict(tokenizer.special_tokens), "add_bos_token": bool(tokenizer.add_bos)}
  if tokenizer.chat_template is not None:
    config["chat_template"] = tokenizer.chat_template
  (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  return ["tokenizer.json", "tokenizer_config.json"]


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool) -> Iterator[pathlib.Path]:
  """A temporary directory beside `out` to fill; renamed to `out` when the block ends without an
  error, removed when it raises. An `out` that exists and is not empty is refused unless
  `overwrite` (then it is replaced only once the new directory is complete)."""
  out = pathlib.Path(out)
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"{out} exists and is not a directory")
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
  out.parent.mkdir(parents=True, exist_ok=True)
  work = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
  try:
    yield work
  except BaseException:
    shutil.rmtree(work, ignore_errors=True)
    raise
  old = None
  if out.exists():
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    out.rename(old)
  work.rename(out)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def write_hf_dir(out: str | os.PathLike, params: dict, cfg: ModelConfig, source: Checkpoint,
                 source_path: pathlib.Path, *, dtype: str = "float32",
                 max_shard_size: int | str = "5GB", overwrite: bool = False,
                 gguf: str | None = None, name: str = "proma_jax export") -> list[str]:
  """Writes the Hugging Face directory `out` (see the module docstring) and returns its files.

  params: pure parameter dict of the decoder of `cfg` (stacked or not); source: the opened
  checkpoint the run started from, at `source_path` (a directory or a .gguf file); dtype:
  "float32", "bfloat16" or "float16" for every tensor; gguf: also write `model-<gguf>.gguf`
  with tensors of that type ("f32", "f16", "bf16"; `models.gguf_export`), named `name`.
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
  tensors = hf_tensors(params, cfg, "float32")
  tokenizer = source.load_tokenizer()
  with atomic_directory(out, overwrite) as work:
    files = write_safetensors(work, {k: w.astype(DTYPES[dtype]) for k, w in tensors.items()},
                              parse_size(max_shard_size))
    if gguf is not None:
      gguf_export.write_gguf(work / f"model-{gguf}.gguf", tensors, cfg, tokenizer, gguf,
                             name=name)
      files.append(f"model-{gguf}.gguf")
    del tensors
    if source_path.is_dir():
      files += _copy_tokenizer_files(source_path, work)
    else:
      files += write_tokenizer(work, tokenizer)
    config = hf_config(source, cfg, dtype, tokenizer)
    (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    files.append("config.json")
    if not (work / "generation_config.json").exists():
      generation = {key: config[key] for key in ("bos_token_id", "eos_token_id") if key in config}
      (work / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
      files.append("generation_config.json")
  return sorted(files)


__all__ = ["CheckpointError", "DTYPES", "atomic_directory", "hf_config", "hf_tensors",
           "parse_size", "write_hf_dir", "write_safetensors", "write_tokenizer"]
