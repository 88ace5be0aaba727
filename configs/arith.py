"""Integer addition/subtraction (train: operands 0-99; val: 10-99, the harder two-digit corner).

python -m proma_jax.train --config=configs/arith.py:proma --workdir=runs/arith_proma
"""

from proma_jax.config import base_config


def get_config(algorithm: str = "proma"):
  c = base_config("arith", algorithm)
  c.task_kwargs.train_digits = (1, 2)
  c.task_kwargs.val_digits = (2, 2)
  c.sft.steps, c.sft.lr = 1500, 3e-3
  return c
