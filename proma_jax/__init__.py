"""proma_jax: Projected Microbatch Accumulation (PROMA, arXiv 2601.10498) in JAX/Optax."""

from proma_jax.capture import (
    DenseFactors,
    grads_and_dense_factors,
    policy_gradient_and_dense_factors,
    policy_gradient_and_fused_changes,
    policy_gradient_and_sequence_statistics,
)
from proma_jax.nn import Dense
from proma_jax.seqgrads import (
    DenseSequenceFactors,
    choose_dense_path,
    policy_gradient_and_sequence_gradients,
    sequence_gradients,
)
from proma_jax.transforms import (
    AccumulationOptions,
    FusedLeaf,
    IntraOptions,
    ProMAState,
    find_proma_state,
    microbatch_accumulation,
    proma_accumulation,
    proma_both,
    proma_intra,
    proma_metrics,
)

__all__ = [
    "AccumulationOptions",
    "Dense",
    "FusedLeaf",
    "DenseFactors",
    "DenseSequenceFactors",
    "IntraOptions",
    "ProMAState",
    "choose_dense_path",
    "find_proma_state",
    "grads_and_dense_factors",
    "policy_gradient_and_dense_factors",
    "policy_gradient_and_fused_changes",
    "policy_gradient_and_sequence_gradients",
    "policy_gradient_and_sequence_statistics",
    "microbatch_accumulation",
    "proma_accumulation",
    "proma_both",
    "proma_intra",
    "proma_metrics",
    "sequence_gradients",
]
