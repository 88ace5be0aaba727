"""proma_jax: Projected Microbatch Accumulation (PROMA, arXiv 2601.10498) in JAX/Optax."""

from proma_jax.capture import Dense, DenseFactors, grads_and_dense_factors
from proma_jax.seqgrads import policy_gradient_and_sequence_gradients, sequence_gradients
from proma_jax.transforms import (
    AccumulationOptions,
    IntraOptions,
    ProMAState,
    proma_accumulation,
    proma_both,
    proma_intra,
    proma_metrics,
)

__all__ = [
    "AccumulationOptions",
    "Dense",
    "DenseFactors",
    "IntraOptions",
    "ProMAState",
    "grads_and_dense_factors",
    "policy_gradient_and_sequence_gradients",
    "proma_accumulation",
    "proma_both",
    "proma_intra",
    "proma_metrics",
    "sequence_gradients",
]
