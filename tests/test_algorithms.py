"""The algorithm table: one row per configurable algorithm, and what each row reports."""

import jax.numpy as jnp
import pytest

import proma_jax
from proma_jax import algorithms, trainer
from proma_jax.config import ALGORITHMS, base_config


def test_the_table_has_one_row_per_configurable_algorithm():
  assert tuple(algorithms.TABLE) == ALGORITHMS
  projecting = [name for name, row in algorithms.TABLE.items() if row.projects]
  assert projecting == ["proma", "proma_intra", "proma_both"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_row_reports_grad_norm_and_the_scalar_proma_metrics_of_its_transform(algorithm):
  """The baselines report grad/norm only; the PROMA variants also the scalar proma/* metrics,
  never the per-leaf proma/intra_reduction/<leaf> entries the state also holds."""
  params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
  opt_state = trainer.make_optimizer(base_config("reverse", algorithm)).init(params)
  everything = proma_jax.proma_metrics(opt_state)
  reported = trainer.transform_metrics(algorithm, opt_state)
  if algorithms.TABLE[algorithm].projects:
    assert set(reported) == {"grad/norm", "proma/reduction", "proma/dropped",
                             "proma/intra_reduction"}
  else:
    assert set(reported) == {"grad/norm"}
  if algorithms.TABLE[algorithm].intra:
    assert any(k.startswith("proma/intra_reduction/") for k in everything)
  for k, v in reported.items():
    assert v.shape == () and float(v) == float(everything[k])
