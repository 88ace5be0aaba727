"""String reversal at the paper's batch shape: 64 prompts x 8 samples = 512 sequences per RL step,
2 minibatches of 256 sequences, each accumulated over 32 microbatches of 8 (the paper projects
against minibatches of 512 = 64 x 8), lr 1e-4, 30 RL steps. The demo's config (`make demo`):

  python -m proma_jax.train --config=configs/reverse_paper.py:proma --workdir=runs/rev_paper_proma

Everything else is configs/reverse.py (same warm start).
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "reverse", os.path.join(os.path.dirname(os.path.abspath(__file__)), "reverse.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(algorithm: str = "proma"):
  c = _base.get_config(algorithm)
  c.rollout.prompts_per_step, c.rollout.group_size = 64, 8
  c.train.num_minibatches, c.train.num_microbatches = 2, 32
  c.optim.lr = 1e-4
  c.steps = 30
  c.eval.every = 5
  return c
