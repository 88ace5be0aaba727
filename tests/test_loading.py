"""Tests of pretrained-checkpoint loading (`proma_jax.models.loading`, `hf`, `gguf`).

Tiny random checkpoints are written here (safetensors + config.json, GGUF via gguf-py's writer);
the real SmolLM2-135M GGUF file is checked against slices of transformers' own dequantized weights
(tests/fixtures/smollm2_gguf_weights.npz, written by make_gguf_weight_fixture.py).
"""

import dataclasses
import json
import pathlib
import re

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from gguf import quants

from proma_jax.models import stacked
from proma_jax.models.decoder import rope_frequencies
from proma_jax.models.gguf import unpermute_rows
from proma_jax.models.hf import CheckpointError, config_from_hf
from proma_jax.models.loading import load_model

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "smollm2_gguf_weights.npz"

QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 32,
         "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 24,
         "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
         "tie_word_embeddings": True, "attention_bias": False, "hidden_act": "silu"}
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32,
         "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 24, "max_position_embeddings": 128,
         "rms_norm_eps": 1e-5, "rope_theta": 5e5, "tie_word_embeddings": False,
         "mlp_bias": False, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 32}}
_LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def hf_tensors(config: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
  """Random tensors of an HF checkpoint with `config`, in HF layout (linear weights (out, in))."""
  rng = np.random.default_rng(seed)
  d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
  n, k = config["num_attention_heads"], config["num_key_value_heads"]
  h = config.get("head_dim", d // n)
  out_in = {"self_attn.q_proj": (n * h, d), "self_attn.k_proj": (k * h, d),
            "self_attn.v_proj": (k * h, d), "self_attn.o_proj": (d, n * h),
            "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  for i in range(config["num_hidden_layers"]):
    for module, shape in out_in.items():
      shapes[f"model.layers.{i}.{module}.weight"] = shape
    for norm in ("input_layernorm", "post_attention_layernorm"):
      shapes[f"model.layers.{i}.{norm}.weight"] = (d,)
    if config["model_type"] == "qwen3":
      shapes[f"model.layers.{i}.self_attn.q_norm.weight"] = (h,)
      shapes[f"model.layers.{i}.self_attn.k_norm.weight"] = (h,)
  if not config["tie_word_embeddings"]:
    shapes["lm_head.weight"] = (v, d)
  return {name: rng.normal(size=shape).astype(dtype) for name, shape in shapes.items()}


def write_hf(directory: pathlib.Path, config: dict, tensors: dict[str, np.ndarray],
             shards: int = 1) -> pathlib.Path:
  """config.json and model.safetensors, or `shards` files listed in model.safetensors.index.json."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  if shards == 1:
    safetensors.numpy.save_file(tensors, directory / "model.safetensors")
    return directory
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {name: tensors[name] for name in names[s::shards]}
    safetensors.numpy.save_file(part, directory / file)
    weight_map.update(dict.fromkeys(part, file))
  (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return directory


def expected_params(config: dict, tensors: dict[str, np.ndarray]) -> dict:
  """The decoder's pure parameter dict holding `tensors`, kernels transposed to (in, out)."""
  layers = {}
  for i in range(config["num_hidden_layers"]):
    layer = {"self_attn": {}, "mlp": {}}
    for module in _LINEAR:
      group, name = module.split(".")
      layer[group][name] = {"kernel": tensors[f"model.layers.{i}.{module}.weight"].T}
    for norm in ("input_layernorm", "post_attention_layernorm"):
      layer[norm] = {"scale": tensors[f"model.layers.{i}.{norm}.weight"]}
    if config["model_type"] == "qwen3":
      for norm in ("q_norm", "k_norm"):
        layer["self_attn"][norm] = {"scale": tensors[f"model.layers.{i}.self_attn.{norm}.weight"]}
    layers[i] = layer
  params = {"embed_tokens": {"embedding": tensors["model.embed_tokens.weight"]},
            "layers": layers, "norm": {"scale": tensors["model.norm.weight"]}}
  if not config["tie_word_embeddings"]:
    params["lm_head"] = {"kernel": tensors["lm_head.weight"].T}
  return params


def params_of(model) -> dict:
  """The model's parameters with the layers unstacked (pretrained models load scanned)."""
  return stacked.unstack_layers(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def param_as_hf(params: dict, name: str) -> np.ndarray:
  """The decoder parameter that holds HF tensor `name`, in HF layout (kernels transposed)."""
  if name == "model.embed_tokens.weight":
    return np.asarray(params["embed_tokens"]["embedding"])
  if name == "model.norm.weight":
    return np.asarray(params["norm"]["scale"])
  _, _, layer, *modules, _ = name.split(".")
  leaf = params["layers"][int(layer)]
  for module in modules:
    leaf = leaf[module]
  return np.asarray(leaf["kernel"]).T if "kernel" in leaf else np.asarray(leaf["scale"])


def assert_params_equal(model, expected: dict) -> None:
  flat_got = nnx.traversals.flatten_mapping(params_of(model))
  flat_expected = nnx.traversals.flatten_mapping(expected)
  assert set(flat_got) == set(flat_expected)
  for path, value in flat_expected.items():
    np.testing.assert_array_equal(np.asarray(flat_got[path]), value, err_msg=str(path))


def test_qwen3_tied_checkpoint_loads_every_tensor_transposed(tmp_path):
  """Each decoder parameter equals its HF tensor (kernels transposed); no lm_head when tied."""
  tensors = hf_tensors(QWEN3)
  model = load_model(write_hf(tmp_path, QWEN3, tensors))
  cfg = model.cfg
  assert (cfg.head_dim, cfg.qk_norm, cfg.tie_embeddings, cfg.rope_theta, cfg.max_len) == (
      8, True, True, 1e6, 64)
  assert model.lm_head is None
  assert_params_equal(model, expected_params(QWEN3, tensors))


def test_llama_untied_with_llama3_rope_scaling(tmp_path):
  """Llama: no q/k norm, an lm_head, head_dim = hidden / heads, rope scaling from rope_scaling."""
  tensors = hf_tensors(LLAMA, seed=1)
  model = load_model(write_hf(tmp_path, LLAMA, tensors))
  cfg = model.cfg
  assert (cfg.head_dim, cfg.qk_norm, cfg.tie_embeddings, cfg.rope_theta, cfg.norm_eps) == (
      4, False, False, 5e5, 1e-5)
  assert cfg.rope_scaling == (8.0, 1.0, 4.0, 32)
  assert_params_equal(model, expected_params(LLAMA, tensors))


def test_sharded_checkpoint_reads_every_shard(tmp_path):
  """Tensors spread over three shards via model.safetensors.index.json load like one file."""
  tensors = hf_tensors(LLAMA, seed=2)
  directory = write_hf(tmp_path, LLAMA, tensors, shards=3)
  assert len(list(directory.glob("*.safetensors"))) == 3
  assert_params_equal(load_model(directory), expected_params(LLAMA, tensors))


def test_transformers5_rope_parameters():
  """transformers 5's `rope_parameters` (theta and type inside) gives the same config as 4's."""
  v4 = config_from_hf(LLAMA, "v4/config.json")
  v5 = {k: v for k, v in LLAMA.items() if k not in ("rope_theta", "rope_scaling")}
  v5["rope_parameters"] = dict(LLAMA["rope_scaling"], rope_theta=5e5)
  assert config_from_hf(v5, "v5/config.json") == v4
  plain = dict(v5, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
  cfg = config_from_hf(plain, "plain/config.json")
  assert (cfg.rope_theta, cfg.rope_scaling) == (1e4, None)


def test_config_defaults_follow_transformers():
  """Absent keys: Qwen3 head_dim 128 and untied; Llama head_dim hidden/heads, kv heads = heads,
  rope_theta 1e4, untied."""
  qwen3 = {k: v for k, v in QWEN3.items() if k not in ("head_dim", "tie_word_embeddings")}
  cfg = config_from_hf(qwen3, "config.json")
  assert (cfg.head_dim, cfg.tie_embeddings) == (128, False)
  llama = {k: v for k, v in LLAMA.items()
           if k not in ("num_key_value_heads", "rope_theta", "rope_scaling", "tie_word_embeddings")}
  cfg = config_from_hf(llama, "config.json")
  assert (cfg.head_dim, cfg.n_kv_heads, cfg.rope_theta, cfg.tie_embeddings) == (4, 4, 1e4, False)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bfloat16_safetensors(tmp_path, param_dtype):
  """bf16 safetensors (ml_dtypes arrays) load exactly into float32 or bfloat16 parameters."""
  tensors = hf_tensors(QWEN3, seed=3, dtype=ml_dtypes.bfloat16)
  model = load_model(write_hf(tmp_path, QWEN3, tensors), param_dtype=param_dtype,
                     dtype="bfloat16")
  assert model.cfg.param_dtype == param_dtype and model.cfg.dtype == "bfloat16"
  assert model.embed_tokens.embedding[...].dtype == jnp.dtype(param_dtype)
  expected = expected_params(QWEN3, {k: v.astype(np.float32) for k, v in tensors.items()})
  got = nnx.traversals.flatten_mapping(params_of(model))
  for path, value in nnx.traversals.flatten_mapping(expected).items():
    np.testing.assert_array_equal(np.asarray(got[path], np.float32), value, err_msg=str(path))


def test_config_overrides_apply_and_unknown_ones_are_refused(tmp_path):
  directory = write_hf(tmp_path, QWEN3, hf_tensors(QWEN3))
  model = load_model(directory, max_len=16, remat=True)
  assert (model.cfg.max_len, model.cfg.remat) == (16, True)
  with pytest.raises(TypeError, match="max_length"):
    load_model(directory, max_length=16)


def test_tied_checkpoint_may_repeat_the_embedding_as_lm_head(tmp_path):
  """A tied checkpoint that also stores lm_head.weight loads if it equals the embedding."""
  tensors = hf_tensors(QWEN3)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  assert_params_equal(load_model(write_hf(tmp_path / "same", QWEN3, tensors)),
                      expected_params(QWEN3, tensors))
  tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor lm_head\.weight differs"):
    load_model(write_hf(tmp_path / "different", QWEN3, tensors))


def _corrupt(name: str, tensors: dict) -> None:
  tensors[name] = tensors[name].copy()
  tensors[name][0] = np.nan


@pytest.mark.parametrize("edit, message", [
    (lambda c, t: c.update(architectures=["MistralForCausalLM"]),
     r"config\.json: unsupported architecture 'MistralForCausalLM'"),
    (lambda c, t: c.update(model_type="gemma3"), r"config\.json: unsupported model_type 'gemma3'"),
    (lambda c, t: c.update(attention_bias=True), r"config\.json: attention_bias=True"),
    (lambda c, t: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     r"config\.json: rope type 'yarn'"),
    (lambda c, t: t.pop("model.layers.1.mlp.up_proj.weight"),
     r"model\.safetensors: missing tensor model\.layers\.1\.mlp\.up_proj\.weight"),
    (lambda c, t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}),
     r"model\.safetensors: unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias"),
    (lambda c, t: t.update({"model.layers.1.self_attn.o_proj.weight": np.zeros((32, 16),
                                                                              np.float32)}),
     r"model\.safetensors: tensor model\.layers\.1\.self_attn\.o_proj\.weight has shape "
     r"\(32, 16\), expected \(16, 32\)"),
    (lambda c, t: _corrupt("model.layers.0.mlp.down_proj.weight", t),
     r"model\.safetensors: tensor model\.layers\.0\.mlp\.down_proj\.weight has 24 non-finite"),
])
def test_checkpoint_errors_name_the_problem(tmp_path, edit, message):
  """Each bad checkpoint raises CheckpointError (a ValueError) naming the file and tensor/key."""
  config, tensors = dict(QWEN3), hf_tensors(QWEN3)
  edit(config, tensors)
  directory = write_hf(tmp_path, config, tensors)
  with pytest.raises(CheckpointError, match=message):
    load_model(directory)
  assert issubclass(CheckpointError, ValueError)


def test_path_that_is_no_checkpoint_is_refused(tmp_path):
  (tmp_path / "weights.bin").write_bytes(b"")
  for path in (tmp_path / "weights.bin", tmp_path / "absent"):
    with pytest.raises(CheckpointError, match=f"{path}: not a Hugging Face checkpoint directory"):
      load_model(path)
  with pytest.raises(CheckpointError, match=f"{tmp_path}: no config.json"):
    load_model(tmp_path)


# GGUF names of the HF tensors (llama.cpp's tensor naming), written out independently of
# `proma_jax.models.gguf`.
_GGUF_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """convert_hf_to_gguf.LlamaModel.permute: each head's rows from rotate-half to interleaved."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def gguf_name(hf: str) -> str:
  if hf in _GGUF_TOP:
    return _GGUF_TOP[hf]
  _, _, layer, module = hf.removesuffix(".weight").split(".", 3)
  return f"blk.{layer}.{_GGUF_BLOCK[module]}.weight"


def write_gguf(path: pathlib.Path, config: dict, tensors: dict[str, np.ndarray],
               types: dict[str, gguf.GGMLQuantizationType], extra: dict | None = None) -> dict:
  """A GGUF file of `tensors` (HF names) as llama.cpp's converter writes it: GGUF names, Llama
  q/k rows permuted, tensors in `types` quantized. Returns the tensors as the file stores them,
  dequantized (what a correct loader must produce), in HF names and layout."""
  arch = config["model_type"]
  n, k = config["num_attention_heads"], config["num_key_value_heads"]
  h = config.get("head_dim", config["hidden_size"] // n)
  writer = gguf.GGUFWriter(path, arch)
  writer.add_block_count(config["num_hidden_layers"])
  writer.add_context_length(config["max_position_embeddings"])
  writer.add_embedding_length(config["hidden_size"])
  writer.add_feed_forward_length(config["intermediate_size"])
  writer.add_head_count(n)
  writer.add_head_count_kv(k)
  writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
  writer.add_rope_freq_base(config["rope_theta"])
  writer.add_vocab_size(config["vocab_size"])
  if arch == "qwen3":
    writer.add_key_length(h)
    writer.add_value_length(h)
  else:
    writer.add_rope_dimension_count(h)
  stored = {}
  for name, w in tensors.items():
    if arch == "llama" and ".q_proj." in name:
      w = llama_cpp_permute(w, n)
    elif arch == "llama" and ".k_proj." in name:
      w = llama_cpp_permute(w, k)
    qtype = types.get(name, gguf.GGMLQuantizationType.F32)
    data = quants.quantize(w, qtype)
    writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)
    stored[name] = quants.dequantize(data, qtype)
  for name, w in (extra or {}).items():
    writer.add_tensor(name, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return stored


def test_unpermute_rows_inverts_llama_cpp_permutation():
  w = np.random.default_rng(0).normal(size=(3 * 8, 5))
  for n_head in (1, 3):
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, n_head), n_head), w)
  assert not np.array_equal(llama_cpp_permute(w, 3), w)


GGUF_LLAMA = dict(LLAMA, hidden_size=32, intermediate_size=64, rope_scaling=None)
GGUF_QWEN3 = dict(QWEN3, hidden_size=32, intermediate_size=64)
_Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("config", [GGUF_LLAMA, GGUF_QWEN3], ids=["llama", "qwen3"])
def test_tiny_gguf_loads_dequantized_and_unpermuted(tmp_path, config):
  """A GGUF file with F32, F16, BF16 and Q8_0 tensors loads to its dequantized values; Llama's
  permuted q/k rows are restored to HF order (Qwen3's were never permuted)."""
  hf = hf_tensors(config, seed=4)
  types = {"model.embed_tokens.weight": _Q.Q8_0, "model.layers.0.self_attn.q_proj.weight": _Q.Q8_0,
           "model.layers.1.self_attn.k_proj.weight": _Q.Q8_0,
           "model.layers.0.mlp.up_proj.weight": _Q.F16,
           "model.layers.1.mlp.down_proj.weight": _Q.BF16}
  stored = write_gguf(tmp_path / "tiny.gguf", config, hf, types)
  model = load_model(tmp_path / "tiny.gguf")
  assert model.cfg == dataclasses.replace(config_from_hf(config, "config.json"), scan_layers=True)
  expected = dict(hf)
  for name in types:  # the quantized values, q/k rows back in HF order
    expected[name] = stored[name]
    if config["model_type"] == "llama" and ".q_proj" in name:
      expected[name] = unpermute_rows(stored[name], config["num_attention_heads"])
    if config["model_type"] == "llama" and ".k_proj" in name:
      expected[name] = unpermute_rows(stored[name], config["num_key_value_heads"])
    assert np.abs(expected[name] - hf[name]).max() < 0.1
  assert_params_equal(model, expected_params(config, expected))


def test_gguf_rope_freqs_need_and_check_rope_scaling(tmp_path):
  """Llama 3.1+ GGUF: rope_freqs.weight must match the rope_scaling passed by the caller."""
  scaling = (8.0, 1.0, 4.0, 32)
  cfg = config_from_hf(dict(GGUF_LLAMA, rope_scaling=dict(LLAMA["rope_scaling"])), "config.json")
  factors = np.asarray(rope_frequencies(cfg.head_dim, cfg.rope_theta)
                       / rope_frequencies(cfg.head_dim, cfg.rope_theta, scaling), np.float32)
  assert factors.max() == 8.0 and factors.min() == 1.0
  hf = hf_tensors(GGUF_LLAMA, seed=5)
  write_gguf(tmp_path / "llama31.gguf", GGUF_LLAMA, hf, {}, extra={"rope_freqs.weight": factors})
  with pytest.raises(CheckpointError, match=r"llama31\.gguf: rope_freqs\.weight holds Llama 3"):
    load_model(tmp_path / "llama31.gguf")
  with pytest.raises(CheckpointError, match=r"llama31\.gguf: rope_freqs\.weight .* differs"):
    load_model(tmp_path / "llama31.gguf", rope_scaling=(4.0, 1.0, 4.0, 32))
  model = load_model(tmp_path / "llama31.gguf", rope_scaling=scaling)
  assert model.cfg.rope_scaling == scaling
  assert_params_equal(model, expected_params(GGUF_LLAMA, hf))


def test_gguf_errors_name_the_gguf_tensor(tmp_path):
  """An unsupported architecture, an unknown tensor and a wrong shape name the .gguf file."""
  hf = hf_tensors(GGUF_QWEN3, seed=6)
  write_gguf(tmp_path / "extra.gguf", GGUF_QWEN3, hf, {},
             extra={"blk.0.attn_q.bias": np.zeros(32, np.float32)})
  with pytest.raises(CheckpointError, match=r"extra\.gguf \(GGUF tensor blk\.0\.attn_q\.bias\): "
                     r"unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias"):
    load_model(tmp_path / "extra.gguf")
  bad = dict(hf, **{"model.layers.1.mlp.gate_proj.weight": np.zeros((32, 64), np.float32)})
  write_gguf(tmp_path / "shape.gguf", GGUF_QWEN3, bad, {})
  with pytest.raises(CheckpointError, match=r"shape\.gguf \(GGUF tensor blk\.1\.ffn_gate\.weight\)"
                     r": tensor model\.layers\.1\.mlp\.gate_proj\.weight has shape \(32, 64\), "
                     r"expected \(64, 32\)"):
    load_model(tmp_path / "shape.gguf")
  write_gguf(tmp_path / "gemma.gguf", dict(GGUF_QWEN3, model_type="gemma2"), hf, {})
  with pytest.raises(CheckpointError, match=r"gemma\.gguf: unsupported GGUF architecture 'gemma2'"):
    load_model(tmp_path / "gemma.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.05])
def test_truncated_gguf_says_truncated_and_names_the_file(tmp_path, keep):
  """A GGUF file cut short (an interrupted download) gives CheckpointError naming the file, not a
  bare NumPy reshape or dtype error."""
  path = tmp_path / "cut.gguf"
  write_gguf(path, GGUF_QWEN3, hf_tensors(GGUF_QWEN3, seed=7), {})
  _truncate(path, int(path.stat().st_size * keep))
  with pytest.raises(CheckpointError, match=r"cut\.gguf.*truncated or corrupt\?"):
    load_model(path)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_dequantization(smollm2):
  """Every weight slice in the fixture (transformers' GGUF loader: dequantized, q/k rows
  un-permuted) equals ours to 1e-6; the file's (permuted) row order differs, so it mattered."""
  model, tok = smollm2
  cfg = model.cfg
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim) == (
      30, 576, 9, 3, 64, 1536)
  assert cfg.tie_embeddings and not cfg.qk_norm and tok.vocab_size == 49152
  params = params_of(model)
  with np.load(FIXTURE) as fixture:
    reference = dict(fixture)
  assert (cfg.vocab_size, cfg.rope_theta, cfg.max_len) == (
      reference["config:vocab_size"], reference["config:rope_theta"],
      reference["config:max_position_embeddings"])
  # GGUF stores rms_norm_eps as float32 (transformers: 9.99999975e-06; we: its decimal, 1e-05).
  np.testing.assert_allclose(cfg.norm_eps, reference["config:rms_norm_eps"], rtol=1e-7)
  weights = {key: value for key, value in reference.items() if not key.startswith("config:")}
  assert len(weights) == 2 + 2 * (2 * 7 + 2)
  for key, value in weights.items():
    name, _, part = key.partition(":")
    w = param_as_hf(params, name)
    w = w[:, :8] if part == "cols" else w[:value.shape[0]] if part == "rows" else w
    np.testing.assert_allclose(w, value, atol=1e-6, rtol=0, err_msg=key)
  q_cols = reference["model.layers.0.self_attn.q_proj.weight:cols"]
  assert np.abs(llama_cpp_permute(q_cols, cfg.n_heads) - q_cols).max() > 0.1


def _truncate(path: pathlib.Path, keep: int) -> None:
  path.write_bytes(path.read_bytes()[:keep])


def _data_offsets_past_the_end(path: pathlib.Path) -> None:
  """Rewrite the header so that the last tensor's data ends past the end of the file."""
  raw = path.read_bytes()
  n = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8:8 + n])
  name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
  start, end = header[name]["data_offsets"]
  header[name]["data_offsets"] = [start + 64, end + 64]
  new = json.dumps(header).encode()
  new += b" " * (-len(new) % 8)
  path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


@pytest.mark.parametrize("damage, message", [
    (lambda d: _truncate(d / "model.safetensors", 100),
     r"model\.safetensors: not a readable safetensors file, truncated or corrupt\?"),
    (lambda d: _truncate(d / "model.safetensors", 4),
     r"model\.safetensors: not a readable safetensors file"),
    (lambda d: _data_offsets_past_the_end(d / "model.safetensors"),
     r"model\.safetensors: (not a readable safetensors file|tensor \S+ is unreadable)"),
    (lambda d: (d / "config.json").write_text("{not json"),
     r"config\.json: unreadable config \(JSONDecodeError"),
    (lambda d: (d / "config.json").write_text("[1, 2]"),
     r"config\.json: the config must be a JSON object, got a list"),
    (lambda d: (d / "config.json").write_text(json.dumps(dict(QWEN3, num_hidden_layers="two"))),
     r"config\.json: config key 'num_hidden_layers' must be an integer, got 'two'"),
])
def test_damaged_files_raise_checkpoint_errors_naming_the_file(tmp_path, damage, message):
  """A truncated or garbled safetensors file and a malformed config.json raise CheckpointError
  naming the file, never a raw SafetensorError, JSONDecodeError or ValueError from int()."""
  directory = write_hf(tmp_path, QWEN3, hf_tensors(QWEN3))
  damage(directory)
  with pytest.raises(CheckpointError, match=message):
    load_model(directory)


def test_shard_index_cannot_point_outside_the_checkpoint(tmp_path):
  """An index entry that resolves outside the directory is refused before any file is opened."""
  directory = write_hf(tmp_path / "ckpt", LLAMA, hf_tensors(LLAMA), shards=2)
  (tmp_path / "secret").write_text("not a checkpoint")
  index_path = directory / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  name = sorted(index["weight_map"])[0]
  for target in ("../secret", "/etc/passwd"):
    index["weight_map"][name] = target
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"index\.json: weight_map entry '{re.escape(name)}'"
                                              rf" -> '{re.escape(target)}' points outside"):
      load_model(directory)
  index_path.write_text("{broken")
  with pytest.raises(CheckpointError, match=r"index\.json: unreadable shard index"):
    load_model(directory)


def test_checkpoint_fingerprint_follows_the_files_not_the_path(tmp_path, monkeypatch):
  """Same files anywhere: same fingerprint. A changed weight, config or tokenizer file: another.
  Large files are sampled (header and blocks), so a change inside a sampled block is seen too."""
  import shutil  # pylint: disable=import-outside-toplevel
  from proma_jax.models import loading  # pylint: disable=import-outside-toplevel
  source = pathlib.Path(__file__).parent / "fixtures" / "hf" / "tiny_qwen3"
  a, b = tmp_path / "a", tmp_path / "b"
  shutil.copytree(source, a)
  shutil.copytree(source, b)
  print_a = loading.checkpoint_fingerprint(a)
  assert print_a == loading.checkpoint_fingerprint(b) and "model.safetensors" in print_a
  (b / "tokenizer_config.json").write_text((b / "tokenizer_config.json").read_text() + " ")
  assert loading.checkpoint_fingerprint(b)["tokenizer_config.json"] != print_a[
      "tokenizer_config.json"]
  weights = bytearray((a / "model.safetensors").read_bytes())
  weights[-1] ^= 1  # the last byte of the last tensor
  (a / "model.safetensors").write_bytes(bytes(weights))
  assert loading.checkpoint_fingerprint(a)["model.safetensors"] != print_a["model.safetensors"]
  # The sampled digest of large files (forced here on the small fixture) sees it as well.
  monkeypatch.setattr(loading, "FINGERPRINT_WHOLE", 0)
  monkeypatch.setattr(loading, "FINGERPRINT_HEAD", 64)
  monkeypatch.setattr(loading, "FINGERPRINT_BLOCK", 16)
  sampled_a = loading.checkpoint_fingerprint(a)["model.safetensors"]
  assert sampled_a != loading.checkpoint_fingerprint(source)["model.safetensors"]


def test_resume_refuses_a_checkpoint_whose_files_changed(tmp_path):
  from proma_jax import run_records  # pylint: disable=import-outside-toplevel
  old = {"model.safetensors": "aaaa", "config.json": "bbbb"}
  new = dict(old, **{"model.safetensors": "cccc"})
  assert run_records.check_checkpoint_fingerprint(str(tmp_path), {}, new, False) == {}
  assert run_records.check_checkpoint_fingerprint(str(tmp_path), {"checkpoint_fingerprint": old},
                                                  old, False) == {}
  with pytest.raises(run_records.ConfigChangedError,
                     match=r"run\.json: the files of model\.checkpoint "
                     r"differ from those this run started from \(model\.safetensors\)"):
    run_records.check_checkpoint_fingerprint(str(tmp_path), {"checkpoint_fingerprint": old}, new,
                                             False)
  assert run_records.check_checkpoint_fingerprint(
      str(tmp_path), {"checkpoint_fingerprint": old}, new, True) == {
          "model.checkpoint (files)": (old, new)}
