"""Task records, the exact-match reward, and the `Task` container every task factory returns.

A task has a `train` split and a harder, out-of-distribution `val` split (longer operands, longer
strings, or a held-out file), both deterministic functions of a seed, and a verifiable reward.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import numpy as np

from proma_jax.tasks.tokenizer import BOS, EOS, PAD, CharTokenizer

SPLITS = ("train", "val")


class Example(NamedTuple):
  """One prompt and its reference answer, both plain text (no special tokens)."""

  prompt: str
  answer: str


RewardFn = Callable[[str, bool, str], float]
# (split, n, rng) -> n examples of that split.
SampleFn = Callable[[str, int, np.random.Generator], list[Example]]


def reward(response_text: str, terminated: bool, answer: str) -> float:
  """Exact match with a format check: 1.0 iff `terminated` (the response ended with EOS) and
  `response_text` (the decoded text before EOS) equals `answer`, else 0.0."""
  return 1.0 if terminated and response_text == answer else 0.0


def decode_responses(
    tokenizer: CharTokenizer, response_BxL: np.ndarray, mask_BxL: np.ndarray
) -> list[tuple[str, bool]]:
  """(text before the first EOS, well_formed) for each row of sampled response tokens.

  Only tokens with mask > 0 are read, in order. A response is well formed iff it contains an EOS
  and no PAD or BOS before it: one that ran out of tokens, or emitted a special token mid-answer,
  is not.
  """
  response_BxL = np.asarray(response_BxL)
  mask_BxL = np.asarray(mask_BxL)
  if response_BxL.shape != mask_BxL.shape or response_BxL.ndim != 2:
    raise ValueError(
        f"response {response_BxL.shape} and mask {mask_BxL.shape} must be the same (B, L) shape")
  decoded = []
  for ids, mask in zip(response_BxL, mask_BxL):
    ids = [int(token) for token in ids[mask > 0]]
    end = ids.index(EOS) if EOS in ids else len(ids)
    body = ids[:end]
    well_formed = end < len(ids) and PAD not in body and BOS not in body
    decoded.append((tokenizer.decode(body), well_formed))
  return decoded


def batch_rewards(
    tokenizer: CharTokenizer,
    response_BxL: np.ndarray,
    mask_BxL: np.ndarray,
    answers: Sequence[str],
    reward_fn: RewardFn = reward,
) -> np.ndarray:
  """rewards_B (float32): reward_fn(text_b, well_formed_b, answers[b]) for each sampled response.

  See `decode_responses` for how tokens become (text, well_formed).
  """
  decoded = decode_responses(tokenizer, response_BxL, mask_BxL)
  if len(decoded) != len(answers):
    raise ValueError(f"{len(decoded)} responses but {len(answers)} answers")
  rewards = [reward_fn(text, ok, answer) for (text, ok), answer in zip(decoded, answers)]
  return np.asarray(rewards, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Task:
  """A verifiable task: deterministic train / out-of-distribution val examples and a reward.

  Attributes:
    name: registry name of the task.
    sample: (split, n, rng) -> n examples of split "train" or "val".
    prompt_width: tokens (BOS included) of the longest prompt of either split; a valid `width`
      for `encode_prompts`.
    answer_width: tokens (EOS included) of the longest answer of either split; the shortest
      response length that can earn reward.
    reward_fn: (response_text, terminated, answer) -> reward.

  Usage:
    task = get_task("arith")
    batch = task.train_examples(64, seed=step)
    tokens, valid = encode_prompts(tokenizer, [ex.prompt for ex in batch], task.prompt_width)
  """

  name: str
  sample: SampleFn
  prompt_width: int
  answer_width: int
  reward_fn: RewardFn = reward

  def examples(self, split: str, n: int, seed: int) -> list[Example]:
    """`n` examples of `split`, a deterministic function of (split, seed)."""
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n < 0:
      raise ValueError(f"number of examples must be >= 0, got {n}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    return self.sample(split, n, rng)

  def train_examples(self, n: int, seed: int) -> list[Example]:
    return self.examples("train", n, seed)

  def val_examples(self, n: int, seed: int) -> list[Example]:
    return self.examples("val", n, seed)

