"""Your own data: a JSONL file of {"prompt": ..., "answer": ...} records, one per line.

python -m proma_jax.train --config=configs/jsonl.py:proma --workdir=runs/my_proma \
    --config.task_kwargs.train_path=my.jsonl [--config.task_kwargs.val_path=my_val.jsonl]

Without val_path, a held-out `val_fraction` of train_path (chosen by `split_seed`) is the val split.
Prompts and answers use the character tokenizer (proma_jax/tasks/tokenizer.py): one token per
character, plus BOS before a prompt and EOS after an answer. Every record is checked against
max_prompt_tokens / max_answer_tokens when the task is built, before anything is compiled; a record
over a limit is an error naming its file and line (too_long="error"), or is cut to fit
("truncate": a prompt keeps its end, an answer its beginning) or dropped ("skip").
"""

import ml_collections

from proma_jax.config import base_config


def get_config(algorithm: str = "proma"):
  c = base_config("jsonl", algorithm)
  c.task_kwargs.train_path = ml_collections.FieldReference(None, str)  # required
  c.task_kwargs.val_path = ml_collections.FieldReference(None, str)    # None: hold out val_fraction
  c.task_kwargs.val_fraction = 0.1
  c.task_kwargs.split_seed = 0
  c.task_kwargs.max_prompt_tokens = 256  # BOS included
  c.task_kwargs.max_answer_tokens = 128  # EOS included
  c.task_kwargs.too_long = "error"       # or "truncate" or "skip"
  return c
