"""Verifiable tasks for RL fine-tuning: tokenizer, examples, splits, rewards, registry.

Usage:
  task = get_task("arith")                       # or "reverse", "sort", "jsonl" (train_path=...)
  tokenizer = CharTokenizer()
  batch = task.train_examples(64, seed=0)
  prompts_BxP, valid_BxP = encode_prompts(tokenizer, [ex.prompt for ex in batch], task.prompt_width)
  ...sample responses...
  rewards_B = batch_rewards(tokenizer, response_BxL, mask_BxL, [ex.answer for ex in batch])
"""

from __future__ import annotations

from typing import Callable

from proma_jax.tasks.arithmetic import arithmetic_task
from proma_jax.tasks.base import (
    Example,
    Scores,
    Task,
    batch_rewards,
    decode_responses,
    reward,
    score_responses,
)
from proma_jax.tasks.jsonl import jsonl_task, load_jsonl
from proma_jax.tasks.sequence import reverse_task, sequence_task, sort_task
from proma_jax.tasks.tokenizer import (
    BOS,
    EOS,
    PAD,
    CharTokenizer,
    encode_completions,
    encode_prompts,
)

TASKS: dict[str, Callable[..., Task]] = {
    "arith": arithmetic_task,
    "reverse": reverse_task,
    "sort": sort_task,
    "jsonl": jsonl_task,
}


def get_task(name: str, **kwargs) -> Task:
  """The task registered as `name`, built with the factory's keyword arguments `kwargs`."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
  return TASKS[name](**kwargs)


__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "TASKS",
    "CharTokenizer",
    "Example",
    "Task",
    "arithmetic_task",
    "batch_rewards",
    "decode_responses",
    "encode_completions",
    "encode_prompts",
    "get_task",
    "jsonl_task",
    "load_jsonl",
    "reverse_task",
    "reward",
    "Scores",
    "score_responses",
    "sequence_task",
    "sort_task",
]
