"""String sorting (train: lengths 2-5; val: lengths 5-6, i.e. the longest train length and one beyond).

python -m proma_jax.train --config=configs/sort.py:proma --workdir=runs/sort_proma
"""

from proma_jax.config import base_config


def get_config(algorithm: str = "proma"):
  c = base_config("sort", algorithm)
  c.task_kwargs.train_lengths = (2, 5)
  c.task_kwargs.val_lengths = (5, 6)
  c.sft.steps, c.sft.lr = 150, 1e-3
  return c
