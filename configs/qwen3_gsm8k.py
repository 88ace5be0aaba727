"""The paper's GSM8K comparison on a pretrained Qwen3 (or Llama) checkpoint, at the author's settings.

128 prompts x 8 samples per RL step in 2 minibatches of 64 prompts (512 sequences, 64 microbatches
of 8), responses up to 2048 tokens at temperature 1, AdamW at a constant lr 2e-6, gradient
clipping 1.0, no KL or entropy term; PROMA's relative_bound 0.5, GRPO's clip 0.2/0.2 with dual
clip 3. The checkpoint and the data are paths on your machine:

  python -m proma_jax.train --config=configs/qwen3_gsm8k.py:proma --workdir=runs/gsm8k_proma \\
      --config.model.checkpoint=/path/to/Qwen3-0.6B \\
      --config.task_kwargs.train_path=/path/to/gsm8k/train.jsonl \\
      --config.task_kwargs.test_path=/path/to/gsm8k/test.jsonl

This config reads the data from ../shared/data/gsm8k/ (this project's sibling folder) unless the
paths are given: GSM8K's train.jsonl and test.jsonl are grade_school_math/data/ of
https://github.com/openai/grade-school-math. With `--config.task_kwargs.train_path=None
--config.task_kwargs.test_path=None` it reads the Hugging Face dataset openai/gsm8k instead (pip
install datasets; network access or its cache). Every prompt is measured in the model's tokens
before step 0; one over rollout.max_prompt_tokens is an error naming its file and line unless
`--config.task_kwargs.too_long=truncate` (the question keeps its end) or `skip`.
docs/meshes.md gives the multi-device and multi-host commands, and experiments/README.md
("Memory on one GPU: summary") the memory each part of the step needs.
"""

import ml_collections

from proma_jax.config import base_config

GSM8K_DIR = "../shared/data/gsm8k"


def author_settings(c):
  """What the paper's Qwen3 experiments share (GSM8K here, MBPP in configs/qwen3_mbpp.py): the
  checkpoint is given on the command line, bf16 compute over float32 weights with remat and a
  chunked log-softmax, sampling at temperature 1, AdamW at lr 2e-6 with clipping 1.0, GRPO's
  clip 0.2/0.2 with dual clip 3, PROMA's relative_bound 0.5."""
  c.model.checkpoint = None               # required: --config.model.checkpoint=PATH
  c.model.dtype, c.model.param_dtype = "bfloat16", "float32"
  c.model.remat, c.model.logits_chunk = True, 1024
  c.rollout.temperature, c.rollout.top_p = 1.0, 1.0
  c.rollout.bucket = 128
  c.optim.lr, c.optim.b1, c.optim.b2 = 2e-6, 0.9, 0.999
  c.optim.weight_decay, c.optim.max_grad_norm = 0.01, 1.0
  c.grpo.eps_low, c.grpo.eps_high, c.grpo.dual_clip = 0.2, 0.2, 3.0
  c.proma.relative_bound = 0.5
  return c


def get_config(algorithm: str = "proma"):
  c = author_settings(base_config("gsm8k", algorithm))
  c.task_kwargs.train_path = f"{GSM8K_DIR}/train.jsonl"
  c.task_kwargs.test_path = f"{GSM8K_DIR}/test.jsonl"
  c.task_kwargs.hf_dataset = ml_collections.FieldReference(None, str)  # instead of the paths
  c.task_kwargs.too_long = "error"        # a prompt over max_prompt_tokens; or truncate, skip
  c.rollout.prompts_per_step, c.rollout.group_size = 128, 8
  c.rollout.max_prompt_tokens, c.rollout.max_new_tokens = 512, 2048
  # 128 sequences per sampling call: their KV cache (Qwen3-0.6B, bf16, 2560 slots) is 37 GB.
  c.rollout.sample_batch = 128
  c.train.num_minibatches, c.train.num_microbatches = 2, 64   # minibatch 64 prompts, microbatch 8
  c.steps = 200
  c.eval.every, c.eval.num_examples = 10, 512
  c.checkpoint.every, c.checkpoint.max_to_keep = 10, 2
  return c
