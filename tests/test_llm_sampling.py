"""Sampling and the pretrained policy's glue on the tiny Qwen3 fixture
(tests/fixtures/hf/tiny_qwen3: vocab 424, max_len 128, ChatML template): nucleus filtering, top-p
sampling, trimming, prompt encoding, chunked generation, `vmappable` and scoring.

Each property is checked against an independent computation: a float64 NumPy nucleus, the model's
teacher-forced logits and log-probs (`forward_logits`, `token_logprobs`), the tokenizer's own chat
rendering, or values worked out by hand.
"""

import dataclasses
import functools
import pathlib

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from proma_jax import policy as policy_lib
from proma_jax import sampling, tasks
from proma_jax.models import forward_logits, token_logprobs
from proma_jax.models.loading import load_pretrained

TINY_QWEN3 = pathlib.Path(__file__).parent / "fixtures" / "hf" / "tiny_qwen3"
MAX_NEW_TOKENS = 16
BUCKET = 8
MAX_PROMPT_TOKENS = 96


@functools.cache
def _tiny():
  """(model, tokenizer, graphdef, params) of the fixture, loaded once per test process."""
  model, tok = load_pretrained(TINY_QWEN3)
  graphdef, state = nnx.split(model)
  return model, tok, graphdef, nnx.to_pure_dict(state)


def _policy(**overrides) -> policy_lib.Policy:
  """A bucketed chat-template policy of the fixture on the word_arith task."""
  model, tok, graphdef, _ = _tiny()
  fields = dict(bucket=BUCKET, max_prompt_tokens=MAX_PROMPT_TOKENS, chat_template=True,
                sample_batch=0, top_p=1.0)
  fields.update(overrides)
  return policy_lib.Policy(tasks.word_arith_task(), tok, model.cfg, graphdef, None,
                           MAX_NEW_TOKENS, **fields)


@nnx.jit
def _teacher_forced(model, tokens_BxT, valid_BxT):
  """(logits_BxTxV, logp_Bx(T-1)) of `model` on fixed tokens: one full forward, no KV cache."""
  return (forward_logits(model, tokens_BxT, valid_BxT),
          token_logprobs(model, tokens_BxT, valid_BxT)[0])


# top_p traced rather than static (as `sample` passes it), so every value shares one compilation.
_top_p_logits = jax.jit(sampling.top_p_logits)


def _five_examples() -> list[tasks.Example]:
  """Five word_arith prompts (the sampling tests share them, hence one width and compilation)."""
  return tasks.word_arith_task().examples("val", 5, seed=3)


def _nucleus_np(logits_V: np.ndarray, top_p: float) -> np.ndarray:
  """bool (V,) nucleus of one row in float64: the k most likely tokens, k the smallest count whose
  probability reaches top_p, plus every token tied with the k-th."""
  logits_V = np.asarray(logits_V, np.float64)
  probs_V = np.exp(logits_V - logits_V.max())
  probs_V /= probs_V.sum()
  order_V = np.argsort(-logits_V, kind="stable")
  k = min(int(np.searchsorted(np.cumsum(probs_V[order_V]), top_p)) + 1, len(logits_V))
  return logits_V >= logits_V[order_V[k - 1]]


def _softmax_np(logits_V: np.ndarray) -> np.ndarray:
  probs_V = np.exp(np.asarray(logits_V, np.float64) - np.max(logits_V))
  return probs_V / probs_V.sum()


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.5, 0.9, 0.99])
def test_top_p_logits_equal_a_float64_nucleus_of_minimal_mass(top_p):
  """The kept set of each row is the float64 nucleus; its mass reaches top_p, and the tokens
  strictly more likely than its least likely member do not (no smaller set would do); kept logits
  are unchanged. A tiny top_p keeps only the argmax (and its ties)."""
  rng = np.random.default_rng(0)
  scales_B = np.array([0.3, 1.0, 2.0, 4.0, 8.0])[:, None]
  logits_BxV = np.concatenate([rng.normal(size=(5, 64)) * scales_B,
                               np.round(rng.normal(size=(2, 64)) * 2)])  # integers: many ties
  logits_BxV = logits_BxV.astype(np.float32)
  out_BxV = np.asarray(_top_p_logits(logits_BxV, top_p))
  kept_BxV = np.isfinite(out_BxV)
  assert np.all(out_BxV[~kept_BxV] == -np.inf)
  np.testing.assert_array_equal(out_BxV[kept_BxV], logits_BxV[kept_BxV])
  np.testing.assert_array_equal(kept_BxV, [_nucleus_np(row, top_p) for row in logits_BxV])
  for logits_V, kept_V in zip(logits_BxV, kept_BxV):
    probs_V = _softmax_np(logits_V)
    least = logits_V[kept_V].min()
    assert probs_V[kept_V].sum() >= top_p - 1e-6
    assert probs_V[kept_V & (logits_V > least)].sum() < top_p
  if top_p == 1e-6:
    np.testing.assert_array_equal(kept_BxV, logits_BxV == logits_BxV.max(axis=1, keepdims=True))


def test_top_p_one_keeps_every_token():
  """top_p=1 keeps the whole vocabulary (here every probability is above 1e-5)."""
  logits_BxV = np.random.default_rng(1).normal(size=(7, 64)).astype(np.float32) * 2
  assert np.isfinite(np.asarray(_top_p_logits(logits_BxV, 1.0))).all()


def test_top_p_one_keeps_tokens_below_float32_resolution():
  """top_p=1 keeps a token of probability e^-20 ~ 2e-9 (the nucleus of top_p=1 is every token)."""
  kept = np.isfinite(np.asarray(_top_p_logits(np.array([[0.0, -20.0]], np.float32), 1.0)))
  np.testing.assert_array_equal(kept, [[True, True]])


def test_top_p_logits_keep_ties_with_the_last_kept_token():
  """p = softmax([2, 1, 1, 1, -1 x4]) = [0.434, 0.160 x3, 0.0216 x4]: top_p 0.4 is reached by the
  argmax alone; 0.5 needs one of the three 1.0s, and its two ties are kept too; 0.92 needs them
  all plus the -1s."""
  logits_1xV = np.array([[2.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0]], np.float32)
  for top_p, expected in [(0.4, [0]), (0.5, [0, 1, 2, 3]), (0.92, list(range(8)))]:
    kept = np.flatnonzero(np.isfinite(np.asarray(_top_p_logits(logits_1xV, top_p))[0]))
    np.testing.assert_array_equal(kept, expected, err_msg=f"top_p={top_p}")


def test_top_p_sampling_stays_in_the_nucleus_and_reports_unscaled_logprobs():
  """Every sampled token lies in the top-p nucleus of softmax(logits / temperature) of the
  teacher-forced model at its step, and `logprobs_BxL` are the teacher-forced log-probs of the
  UNSCALED distribution (temperature 1, no truncation), 0 where masked."""
  model, tok, graphdef, params = _tiny()
  temperature, top_p = 0.7, 0.5
  prompts_BxP, valid_BxP = policy_lib.encode(_policy(), _five_examples())
  p = prompts_BxP.shape[1]
  rollout = sampling.sample(graphdef, params, prompts_BxP, valid_BxP, jax.random.PRNGKey(7),
                            max_new_tokens=MAX_NEW_TOKENS, eos_id=tok.eos_id, pad_id=tok.pad_id,
                            temperature=temperature, top_p=top_p)
  chex.assert_shape(rollout.tokens_BxT, (5, p + MAX_NEW_TOKENS))
  np.testing.assert_array_equal(np.asarray(rollout.tokens_BxT)[:, :p], prompts_BxP)
  logits_BxTxV, logp_BxTm1 = _teacher_forced(model, rollout.tokens_BxT, rollout.valid_BxT)
  step_logits_BxLxV = np.asarray(logits_BxTxV)[:, p - 1:-1]
  response_BxL = policy_lib.response_tokens(rollout)
  mask_BxL = np.asarray(rollout.response_mask_BxL)
  positions = list(zip(*np.nonzero(mask_BxL)))
  assert len(positions) >= 32
  nucleus_sizes = []
  for b, t in positions:
    nucleus_V = _nucleus_np(step_logits_BxLxV[b, t] / temperature, top_p)
    assert nucleus_V[response_BxL[b, t]], f"row {b} step {t}: token outside the top-p nucleus"
    nucleus_sizes.append(nucleus_V.sum())
  assert max(nucleus_sizes) < tok.vocab_size // 2  # the nucleus does exclude tokens
  expected_BxL = np.asarray(logp_BxTm1)[:, p - 1:] * mask_BxL
  chex.assert_trees_all_close(rollout.logprobs_BxL, expected_BxL, atol=1e-4, rtol=0)


def _hand_rollout(lengths: list[int], prompt_width: int, length: int, pad_id: int,
                  seed: int) -> sampling.Rollout:
  """A Rollout whose row r has `lengths[r]` response tokens (a prefix, as sampling leaves them)."""
  rng = np.random.default_rng(seed)
  mask_BxL = (np.arange(length)[None] < np.array(lengths)[:, None]).astype(np.float32)
  response_BxL = np.where(mask_BxL > 0, rng.integers(0, 400, mask_BxL.shape), pad_id)
  prompts_BxP = rng.integers(0, 400, (len(lengths), prompt_width))
  return sampling.Rollout(
      tokens_BxT=np.concatenate([prompts_BxP, response_BxL], 1).astype(np.int32),
      valid_BxT=np.concatenate([np.ones_like(prompts_BxP, np.float32), mask_BxL], 1),
      response_mask_BxL=mask_BxL,
      logprobs_BxL=(-rng.random(mask_BxL.shape) * mask_BxL).astype(np.float32))


@pytest.mark.parametrize("lengths,multiple", [
    ([3, 7, 0, 5], 1), ([3, 7, 0, 5], 4), ([3, 7, 0, 5], 8), ([3, 7, 0, 5], 32),
    ([0, 0], 4), ([16, 2], 4), ([9, 1], 8)])
def test_trim_drops_only_fully_masked_columns(lengths, multiple):
  """The response width becomes the smallest multiple of `multiple` covering every masked-in
  column (or stays the full width); the columns cut are pad and masked in every row, and every
  kept entry is unchanged."""
  p, length, pad = 5, 16, 421
  rollout = _hand_rollout(lengths, p, length, pad, seed=len(lengths) + multiple)
  trimmed = sampling.trim(rollout, multiple)
  width = trimmed.response_mask_BxL.shape[1]
  used = np.flatnonzero(rollout.response_mask_BxL.any(axis=0))
  last_used = int(used[-1]) + 1 if used.size else 0
  assert width == length or width % multiple == 0
  assert width >= last_used and (width == length or width - multiple < max(last_used, 1))
  for name in ("tokens_BxT", "valid_BxT"):
    chex.assert_shape(getattr(trimmed, name), (len(lengths), p + width))
  chex.assert_shape(trimmed.logprobs_BxL, (len(lengths), width))
  cut_mask = np.asarray(rollout.response_mask_BxL)[:, width:]
  assert not cut_mask.any() and np.all(np.asarray(rollout.tokens_BxT)[:, p + width:] == pad)
  expected = sampling.Rollout(rollout.tokens_BxT[:, :p + width], rollout.valid_BxT[:, :p + width],
                              rollout.response_mask_BxL[:, :width],
                              rollout.logprobs_BxL[:, :width])
  chex.assert_trees_all_equal(trimmed, expected)


def test_concatenate_stacks_rows_in_order():
  """`concatenate` of two rollouts is the row-wise concatenation of each field; of one, itself."""
  first = _hand_rollout([3, 7], 5, 8, 421, seed=0)
  second = _hand_rollout([1, 8, 0], 5, 8, 421, seed=1)
  joined = sampling.concatenate([first, second])
  expected = sampling.Rollout(*(np.concatenate([a, b]) for a, b in zip(first, second)))
  chex.assert_trees_all_equal(joined, expected)
  assert sampling.concatenate([first]) is first


def test_encode_left_pads_chat_prompts_to_a_bucket():
  """Each row ends with the ids of the tokenizer's chat rendering of the prompt, after pad_id; the
  width is the longest prompt rounded up to the bucket."""
  _, tok, _, _ = _tiny()
  policy = _policy()
  examples = [tasks.Example("Hi", "0"), tasks.Example("The answer is 7.", "7"),
              tasks.Example("What is 85 - 4? Answer with just the number.", "81")]
  ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": ex.prompt}],
                                            add_generation_prompt=True, tokenize=False))
         for ex in examples]
  longest = max(len(row) for row in ids)
  assert longest % BUCKET  # rounding up is exercised
  width = (longest // BUCKET + 1) * BUCKET
  prompts_BxP, valid_BxP = policy_lib.encode(policy, examples)
  chex.assert_shape([prompts_BxP, valid_BxP], (3, width))
  for row, prompt_P, valid_P in zip(ids, prompts_BxP, valid_BxP):
    pad = width - len(row)
    np.testing.assert_array_equal(prompt_P, [tok.pad_id] * pad + row)
    np.testing.assert_array_equal(valid_P, [0.0] * pad + [1.0] * len(row))


def test_encode_refuses_a_prompt_over_max_prompt_tokens():
  """A prompt longer than max_prompt_tokens raises ValueError naming the config key."""
  examples = [tasks.Example("Hi", "0"), tasks.Example("word " * 80, "0")]
  with pytest.raises(ValueError, match=r"config\.rollout\.max_prompt_tokens=96"):
    policy_lib.encode(_policy(), examples)


def test_encode_without_chat_template_uses_the_raw_text():
  """chat_template=False: each row holds the raw prompt's ids (this tokenizer adds no BOS)."""
  _, tok, _, _ = _tiny()
  assert tok.bos_id is None and not tok.add_bos
  examples = [tasks.Example("Hi", "0"), tasks.Example("What is 85 - 4? Answer with just it.", "81")]
  prompts_BxP, valid_BxP = policy_lib.encode(_policy(chat_template=False), examples)
  for ex, prompt_P, valid_P in zip(examples, prompts_BxP, valid_BxP):
    np.testing.assert_array_equal(prompt_P[valid_P > 0], tok.encode(ex.prompt))
    assert valid_P[-1] == 1 and np.all(np.diff(valid_P) >= 0)  # left padding
  assert prompts_BxP.shape[1] % BUCKET == 0


def test_chunked_greedy_generation_equals_one_batch():
  """Greedy `generate` in chunks of 2 rows equals one batch of 5, whatever the key; each token is
  the argmax of the teacher-forced logits at its step."""
  model, _, _, params = _tiny()
  examples = _five_examples()
  whole = policy_lib.generate(_policy(sample_batch=0), params, examples, jax.random.PRNGKey(0),
                              greedy=True)
  again = policy_lib.generate(_policy(sample_batch=0), params, examples, jax.random.PRNGKey(9),
                              greedy=True)
  chunked = policy_lib.generate(_policy(sample_batch=2), params, examples, jax.random.PRNGKey(1),
                                greedy=True)
  chex.assert_trees_all_equal(again, whole)
  chex.assert_trees_all_equal(
      (chunked.tokens_BxT, chunked.valid_BxT, chunked.response_mask_BxL),
      (whole.tokens_BxT, whole.valid_BxT, whole.response_mask_BxL))
  chex.assert_trees_all_close(chunked.logprobs_BxL, whole.logprobs_BxL, atol=1e-5, rtol=0)
  width = whole.response_mask_BxL.shape[1]
  assert width == MAX_NEW_TOKENS or width % BUCKET == 0
  logits_BxTxV, _ = _teacher_forced(model, whole.tokens_BxT, whole.valid_BxT)
  argmax_BxL = np.argmax(np.asarray(logits_BxTxV)[:, -width - 1:-1], axis=-1)
  mask_BxL = np.asarray(whole.response_mask_BxL) > 0
  np.testing.assert_array_equal(policy_lib.response_tokens(whole)[mask_BxL], argmax_BxL[mask_BxL])


def test_vmappable_swaps_cudnn_for_xla_attention_only():
  """Attention that resolves to XLA (the CPU default) leaves the policy as it is; a cuDNN policy
  gets an XLA config and graph that merge with the same parameters and compute the logits of the
  model loaded with XLA attention. (cuDNN itself is never run here.)"""
  model, tok, _, params = _tiny()
  policy = _policy()
  assert policy_lib.vmappable(policy) is policy
  cudnn_model, _ = load_pretrained(TINY_QWEN3, attention_impl="cudnn")
  cudnn_graphdef, cudnn_state = nnx.split(cudnn_model)
  cudnn_params = nnx.to_pure_dict(cudnn_state)
  chex.assert_trees_all_equal(cudnn_params, params)
  cudnn_policy = policy._replace(model_config=cudnn_model.cfg, graphdef=cudnn_graphdef)
  xla_policy = policy_lib.vmappable(cudnn_policy)
  assert xla_policy.model_config == dataclasses.replace(cudnn_model.cfg, attention_impl="xla")
  assert xla_policy._replace(model_config=None, graphdef=None) == cudnn_policy._replace(
      model_config=None, graphdef=None)
  merged = policy_lib.bind(xla_policy, cudnn_params)
  assert merged.cfg.attention_impl == "xla"
  assert merged.layers.self_attn.cfg.attention_impl == "xla"  # scanned: one stacked Block
  chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(merged)), params)
  # Random tokens in the sampling tests' (B, T), so the reference forward is compiled once.
  prompt_width = policy_lib.encode(policy, _five_examples())[0].shape[1]
  shape = (5, prompt_width + MAX_NEW_TOKENS)
  rng = np.random.default_rng(0)
  valid_BxT = (np.arange(shape[1])[None] >= rng.integers(0, 40, (shape[0], 1))).astype(np.float32)
  tokens_BxT = np.where(valid_BxT > 0, rng.integers(0, tok.vocab_size, shape),
                        tok.pad_id).astype(np.int32)
  merged_logits, _ = _teacher_forced(merged, tokens_BxT, valid_BxT)
  reference_logits, _ = _teacher_forced(model, tokens_BxT, valid_BxT)
  valid = valid_BxT > 0
  chex.assert_trees_all_close(np.asarray(merged_logits)[valid], np.asarray(reference_logits)[valid],
                              atol=1e-6, rtol=0)


def _scored_rollout(tok) -> tuple[sampling.Rollout, list[tasks.Example]]:
  """Hand-made responses (8 columns) with their answers:
    "12" EOS / 12;  "The answer is 7." EOS / 7;  "The answer is 7." EOS / 8;
    "hello there" EOS / 5 (no number);  "I think 12," cut at 8 tokens without EOS / 12."""
  length = 8
  rows = [(tok.encode("12") + [tok.eos_id], "12"),
          (tok.encode("The answer is 7.") + [tok.eos_id], "7"),
          (tok.encode("The answer is 7.") + [tok.eos_id], "8"),
          (tok.encode("hello there") + [tok.eos_id], "5"),
          (tok.encode("I think 12, or maybe")[:length], "12")]
  assert tok.decode(rows[4][0]) == "I think 12,"
  response_BxL = np.full((len(rows), length), tok.pad_id, np.int32)
  mask_BxL = np.zeros((len(rows), length), np.float32)
  for r, (ids, _) in enumerate(rows):
    response_BxL[r, :len(ids)] = ids
    mask_BxL[r, :len(ids)] = 1.0
  prompt_BxP = np.tile(np.array(tok.encode("What is it?"), np.int32), (len(rows), 1))
  rollout = sampling.Rollout(np.concatenate([prompt_BxP, response_BxL], 1),
                             np.concatenate([np.ones_like(prompt_BxP, np.float32), mask_BxL], 1),
                             mask_BxL, np.zeros_like(mask_BxL))
  return rollout, [tasks.Example("What is it?", answer) for _, answer in rows]


def test_score_rewards_and_formats_hand_made_responses():
  """word_arith scores the last number of the text (EOS not required) and flags a response
  without a number as unformatted."""
  _, tok, _, _ = _tiny()
  rollout, examples = _scored_rollout(tok)
  scores = policy_lib.score(_policy(), rollout, examples)
  np.testing.assert_array_equal(scores.rewards_B, [1.0, 1.0, 0.0, 0.0, 1.0])
  np.testing.assert_array_equal(scores.formatted_B, [True, True, True, False, True])
  assert scores.errors == 0


def test_score_counts_a_raising_reward_function_as_zero():
  """A reward function that raises on one (otherwise correct) response scores it 0, counts one
  error and warns; the other rewards are unchanged."""
  _, tok, _, _ = _tiny()
  rollout, examples = _scored_rollout(tok)
  policy = _policy()
  reward_fn = policy.task.reward_fn

  def raising_reward(text, terminated, answer):
    if text == "12":
      raise RuntimeError("bad response")
    return reward_fn(text, terminated, answer)

  policy = policy._replace(task=dataclasses.replace(policy.task, reward_fn=raising_reward))
  examples[2] = tasks.Example(examples[2].prompt, "7")  # now correct: 1.0
  with pytest.warns(UserWarning, match="raised on 1 of 5"):
    scores = policy_lib.score(policy, rollout, examples)
  np.testing.assert_array_equal(scores.rewards_B, [0.0, 1.0, 1.0, 0.0, 1.0])
  np.testing.assert_array_equal(scores.formatted_B, [True, True, True, False, True])
  assert scores.errors == 1
