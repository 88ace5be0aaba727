"""Task records, rewards, response scoring, and the `Task` container every task factory returns.

A task has a `train` split and a `val` split (harder, out-of-distribution operands or strings, a
held-out file, or a benchmark's test split), both deterministic functions of a seed, and a
verifiable reward. Tasks written for the character tokenizer (arith, reverse, sort, jsonl) know
their widths in characters; text tasks for pretrained tokenizers (gsm8k, word_arith) leave the
widths to the policy, which measures prompts in its own tokenizer's tokens.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, NamedTuple, Sequence

import numpy as np

from proma_jax.tasks.tokenizer import CharTokenizer

SPLITS = ("train", "val")


class DataError(ValueError):
  """A task that cannot be built from its data and options (a missing or malformed data file, a
  prompt too long for the policy, an invalid task_kwargs value); the message names the file and
  line or the field. Command lines print it as one line (`proma_jax.cli`)."""


class Example(NamedTuple):
  """One prompt and its reference answer, both plain text (no special tokens)."""

  prompt: str
  answer: str


# (response_text, terminated, answer) -> reward.
RewardFn = Callable[[str, bool, str], float]
# (response_texts, terminated, answers) -> one reward per response, computed together (e.g. the code
# tasks run a batch of programs in parallel).
BatchRewardFn = Callable[[Sequence[str], Sequence[bool], Sequence[str]], Sequence[float]]
# (response_text, terminated) -> whether the response has the requested answer format.
FormatFn = Callable[[str, bool], bool]
# (split, n, rng) -> n examples of that split.
SampleFn = Callable[[str, int, np.random.Generator], list[Example]]
# prompts -> the number of tokens of each as the policy encodes it (chat template or BOS included).
PromptLengthsFn = Callable[[Sequence[str]], Sequence[int]]
# (prompt_lengths, max_prompt_tokens) -> the task's SampleFn once every prompt fits.
FitPromptsFn = Callable[[PromptLengthsFn, int], SampleFn]


def sampler(splits: dict[str, list[Example]], task: str = "this task") -> SampleFn:
  """A SampleFn over fixed lists of examples: each call draws `n` distinct examples of the split
  (with replacement only if `n` exceeds its size), a deterministic function of the rng. A split
  with no examples raises DataError naming `task` when drawn from."""

  def sample(split: str, n: int, rng: np.random.Generator) -> list[Example]:
    examples = splits[split]
    if not examples:
      raise DataError(f"task {task} has no {split} split")
    return [examples[i] for i in rng.choice(len(examples), size=n, replace=n > len(examples))]

  return sample


def reward(response_text: str, terminated: bool, answer: str) -> float:
  """Exact match with a format check: 1.0 iff `terminated` (the response ended with EOS) and
  `response_text` (the decoded text before EOS) equals `answer`, else 0.0."""
  return 1.0 if terminated and response_text == answer else 0.0


def decode_responses(
    tokenizer, response_BxL: np.ndarray, mask_BxL: np.ndarray
) -> list[tuple[str, bool]]:
  """(text before the first EOS, well_formed) for each row of sampled response tokens.

  `tokenizer` is any `proma_jax.models.tokenizer.Tokenizer` (its eos_id, pad_id, bos_id are read).
  Only tokens with mask > 0 are read, in order. A response is well formed iff it contains an EOS
  and no PAD or BOS before it: one that ran out of tokens, or emitted a special token mid-answer,
  is not.
  """
  eos, pad, bos = tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id
  response_BxL = np.asarray(response_BxL)
  mask_BxL = np.asarray(mask_BxL)
  if response_BxL.shape != mask_BxL.shape or response_BxL.ndim != 2:
    raise ValueError(
        f"response {response_BxL.shape} and mask {mask_BxL.shape} must be the same (B, L) shape")
  decoded = []
  for ids, mask in zip(response_BxL, mask_BxL):
    ids = [int(token) for token in ids[mask > 0]]
    end = ids.index(eos) if eos in ids else len(ids)
    body = ids[:end]
    well_formed = end < len(ids) and pad not in body and (bos is None or bos not in body)
    decoded.append((tokenizer.decode(body), well_formed))
  return decoded


class Scores(NamedTuple):
  """The scores of a batch of responses (`score_responses`).

  rewards_B:   float32 reward of each response; 0 where the reward function raised.
  formatted_B: bool, the response has the task's answer format (`Task.format_fn`; without one,
               it ended with EOS).
  errors:      how many calls of the reward function raised (each scored 0).
  """

  rewards_B: np.ndarray
  formatted_B: np.ndarray
  errors: int


def _batch_values(batch_reward_fn: BatchRewardFn, decoded: list[tuple[str, bool]],
                  answers: Sequence[str]) -> list:
  """The batch reward function's values, one per response; a call that raises or returns the
  wrong number of values gives that exception for every response."""
  try:
    values = list(batch_reward_fn([text for text, _ in decoded], [ok for _, ok in decoded],
                                  list(answers)))
    if len(values) != len(decoded):
      raise ValueError(f"the batch reward function gave {len(values)} rewards for "
                       f"{len(decoded)} responses")
  except Exception as error:  # pylint: disable=broad-except
    return [error] * len(decoded)
  return values


def score_responses(tokenizer, response_BxL: np.ndarray, mask_BxL: np.ndarray,
                    answers: Sequence[str], reward_fn: RewardFn = reward,
                    format_fn: FormatFn | None = None,
                    batch_reward_fn: BatchRewardFn | None = None) -> Scores:
  """Rewards and format flags of sampled responses, never raising on a reward function's error.

  A reward function that raises (or returns something that is not a finite number) scores 0 for
  that response and is counted in `Scores.errors`, with a warning naming the first error, so one
  bad response or bug in a user's reward never stops a run. With `batch_reward_fn` the rewards
  come from one call of it instead of `reward_fn` per response (a call that raises scores the
  whole batch 0). See `decode_responses` for how tokens become (text, well_formed).
  """
  decoded = decode_responses(tokenizer, response_BxL, mask_BxL)
  if len(decoded) != len(answers):
    raise ValueError(f"{len(decoded)} responses but {len(answers)} answers")
  batch = _batch_values(batch_reward_fn, decoded, answers) if batch_reward_fn else None
  rewards, formatted, errors, first_error = [], [], 0, None
  for i, ((text, ok), answer) in enumerate(zip(decoded, answers)):
    try:
      value = batch[i] if batch is not None else reward_fn(text, ok, answer)
      if isinstance(value, Exception):
        raise value
      value = float(value)
      if not np.isfinite(value):
        raise ValueError(f"reward {value} is not finite")
    except Exception as error:  # pylint: disable=broad-except
      value, errors = 0.0, errors + 1
      first_error = first_error or f"{type(error).__name__}: {error} (response {text[:80]!r})"
    rewards.append(value)
    try:
      formatted.append(bool(format_fn(text, ok)) if format_fn is not None else ok)
    except Exception:  # pylint: disable=broad-except
      formatted.append(False)
  if errors:
    warnings.warn(f"reward function raised on {errors} of {len(answers)} responses (scored 0); "
                  f"first: {first_error}")
  return Scores(np.asarray(rewards, np.float32), np.asarray(formatted, bool), errors)


def batch_rewards(
    tokenizer,
    response_BxL: np.ndarray,
    mask_BxL: np.ndarray,
    answers: Sequence[str],
    reward_fn: RewardFn = reward,
) -> np.ndarray:
  """rewards_B (float32): reward_fn(text_b, well_formed_b, answers[b]) for each sampled response.

  See `score_responses` (a raising reward function scores 0) and `decode_responses`.
  """
  return score_responses(tokenizer, response_BxL, mask_BxL, answers, reward_fn).rewards_B


@dataclasses.dataclass(frozen=True)
class Task:
  """A verifiable task: deterministic train / out-of-distribution val examples and a reward.

  Attributes:
    name: registry name of the task.
    sample: (split, n, rng) -> n examples of split "train" or "val".
    prompt_width: character-tokenizer tokens (BOS included) of the longest prompt of either
      split, a valid `width` for `encode_prompts`; None for text tasks meant for pretrained
      tokenizers (the policy measures their prompts in its tokenizer's tokens).
    answer_width: character-tokenizer tokens (EOS included) of the longest answer of either
      split, the shortest response length that can earn reward; None for text tasks (the config
      sets `rollout.max_new_tokens`).
    reward_fn: (response_text, terminated, answer) -> reward.
    batch_reward_fn: (response_texts, terminated, answers) -> rewards, used instead of `reward_fn`
      when scoring a batch (the code tasks run their programs in parallel); None: `reward_fn`
      per response.
    format_fn: (response_text, terminated) -> whether the response has the requested answer
      format (reported as `reward/format`); None: terminated with EOS.
    answer_fn: response_text -> the answer the reward reads from it (e.g. the final number), or
      None where it finds none; shown beside each response by `proma_jax.evaluate`. None: the
      response text itself is the answer.
    fit_prompts: for a text task whose prompts come from files: (prompt_lengths,
      max_prompt_tokens) -> the `sample` function to use once every prompt of both splits has
      been measured in the policy's tokens and checked against max_prompt_tokens (an error naming
      the record, or records truncated or skipped, as the task's options say). The policy calls it
      as soon as its tokenizer is known (`policy.make_policy`), so that an over-long record fails
      before step 0, not when it is first drawn. None: nothing to check.

  Usage:
    task = get_task("arith")
    batch = task.train_examples(64, seed=step)
    tokens, valid = encode_prompts(tokenizer, [ex.prompt for ex in batch], task.prompt_width)
  """

  name: str
  sample: SampleFn
  prompt_width: int | None
  answer_width: int | None
  reward_fn: RewardFn = reward
  format_fn: FormatFn | None = None
  answer_fn: Callable[[str], str | None] | None = None
  fit_prompts: FitPromptsFn | None = None
  batch_reward_fn: BatchRewardFn | None = None

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

