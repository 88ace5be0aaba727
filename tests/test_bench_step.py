"""experiments/bench_step.py: its variants compute what they claim on a tiny decoder."""

import os
import sys

import chex
import jax
import pytest
from flax import nnx

from proma_jax.models import decoder as model_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))
import bench_step  # noqa: E402

TINY = model_lib.ModelConfig(vocab_size=13, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                             head_dim=8, mlp_dim=24, max_len=32)


def one_step(variant, n_seq=3, seq_len=12, num_microbatches=2):
  graphdef, state = nnx.split(model_lib.make_model(TINY, seed=0))
  params = nnx.to_pure_dict(state)
  batches = [bench_step.make_batch(TINY, k, n_seq, seq_len)
             for k in jax.random.split(jax.random.PRNGKey(3), num_microbatches)]
  num_tokens = float(sum(b["response"].sum() for b in batches))
  tx, microbatch = bench_step.build_step(variant, graphdef, state, num_tokens, num_microbatches)
  opt_state, step = tx.init(params), jax.jit(microbatch)
  for b in batches:
    params, opt_state = step(params, opt_state, b)
  return params


# proma_mf vs proma_mat is the same comparison without intra (tests/test_matrix_free.py checks the
# matrix-free statistics against vmap sequence gradients, in the fast tier); each pair costs ~40 s
# of compilation.
@pytest.mark.slow
@pytest.mark.parametrize("matrix_free, materialised", [("both", "both_mat")])
def test_matrix_free_and_materialised_variants_take_the_same_step(matrix_free, materialised):
  """The two dense paths are one projection: after a 2-microbatch step the params agree."""
  chex.assert_trees_all_close(one_step(matrix_free), one_step(materialised), atol=1e-6)


def test_projection_changes_the_step_and_tables_print():
  """PROMA's step differs from plain accumulation's (the projection acts), and the README tables
  list every variant of a record set."""
  plain, proma = one_step("plain"), one_step("proma_mat")
  assert max(float(abs(a - b).max()) for a, b in zip(jax.tree.leaves(plain),
                                                     jax.tree.leaves(proma))) > 1e-7
  records = [dict(model="tiny", variant=v, seqs_per_microbatch=3, seq_len=12, time_s=1.0,
                  time_ratio=1.0, peak_mem_bytes=2**20, mem_ratio=1.0) for v in ("plain", "intra")]
  table = bench_step.markdown_tables(records)
  assert "| tiny | 3 x 12 | 1.000 | 1.00x |" in table and "| intra |" in table
