"""Verifiable tasks for RL fine-tuning: tokenizer, examples, splits, rewards, registry.

Usage:
  task = get_task("arith")   # or "reverse", "sort", "jsonl" (train_path=...); text tasks for
                             # pretrained tokenizers: "gsm8k" (train_path, test_path), "word_arith",
                             # code: "mbpp" (path; val on HumanEval), "humaneval" (evaluation)
  tokenizer = CharTokenizer()
  batch = task.train_examples(64, seed=0)
  prompts_BxP, valid_BxP = encode_prompts(tokenizer, [ex.prompt for ex in batch], task.prompt_width)
  ...sample responses...
  rewards_B = batch_rewards(tokenizer, response_BxL, mask_BxL, [ex.answer for ex in batch])
"""

from __future__ import annotations

from typing import Callable

from proma_jax.tasks.answers import (
    answer_format,
    extract_final_answer,
    normalize_number,
    number_reward,
)
from proma_jax.tasks.arithmetic import arithmetic_task
from proma_jax.tasks.base import (
    DataError,
    Example,
    Scores,
    Task,
    batch_rewards,
    decode_responses,
    reward,
    score_responses,
)
from proma_jax.tasks.gsm8k import gsm8k_task
from proma_jax.tasks.jsonl import jsonl_task, load_jsonl
from proma_jax.tasks.mbpp import humaneval_task, mbpp_task
from proma_jax.tasks.sequence import reverse_task, sequence_task, sort_task
from proma_jax.tasks.tokenizer import (
    BOS,
    EOS,
    PAD,
    CharTokenizer,
    encode_completions,
    encode_prompts,
)
from proma_jax.tasks.word_arith import word_arith_task

TASKS: dict[str, Callable[..., Task]] = {
    "arith": arithmetic_task,
    "reverse": reverse_task,
    "sort": sort_task,
    "jsonl": jsonl_task,
    "gsm8k": gsm8k_task,
    "word_arith": word_arith_task,
    "mbpp": mbpp_task,
    "humaneval": humaneval_task,
}

# Tasks of plain text for pretrained tokenizers: they need `config.model.checkpoint`.
TEXT_TASKS = ("gsm8k", "word_arith", "mbpp", "humaneval")


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
    "TEXT_TASKS",
    "CharTokenizer",
    "Example",
    "Task",
    "answer_format",
    "arithmetic_task",
    "batch_rewards",
    "decode_responses",
    "encode_completions",
    "encode_prompts",
    "extract_final_answer",
    "get_task",
    "gsm8k_task",
    "humaneval_task",
    "jsonl_task",
    "load_jsonl",
    "mbpp_task",
    "normalize_number",
    "number_reward",
    "reverse_task",
    "reward",
    "Scores",
    "score_responses",
    "sequence_task",
    "sort_task",
    "word_arith_task",
]
