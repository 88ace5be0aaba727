"""GSM8K at the paper's later batch shape: 64 prompts x 16 samples per RL step in 2 minibatches
of 32 prompts (512 sequences, 64 microbatches of 8), prompts up to 512 and responses up to 1024
tokens. The paper sweeps lr over {1e-6, 2e-6, 5e-6, 1e-5}; the default is 2e-6:

  for lr in 1e-6 2e-6 5e-6 1e-5; do
    python -m proma_jax.train --config=configs/qwen3_gsm8k_later.py:proma \\
        --workdir=runs/gsm8k_later_proma_lr$lr --config.optim.lr=$lr \\
        --config.model.checkpoint=/path/to/Qwen3-0.6B
  done

Everything else is configs/qwen3_gsm8k.py.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "qwen3_gsm8k", os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_gsm8k.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)

LEARNING_RATES = (1e-6, 2e-6, 5e-6, 1e-5)


def get_config(algorithm: str = "proma"):
  c = _base.get_config(algorithm)
  c.rollout.prompts_per_step, c.rollout.group_size = 64, 16
  c.rollout.max_prompt_tokens, c.rollout.max_new_tokens = 512, 1024
  c.rollout.sample_batch = 256            # KV cache of 256 x 1536 slots: 45 GB at Qwen3-0.6B
  c.train.num_minibatches, c.train.num_microbatches = 2, 64   # minibatch 32 prompts, microbatch 8
  return c
