"""Decoder-only language models: the Qwen3/Llama decoder, presets, and (later) pretrained loading."""

from proma_jax.models.decoder import (
    KVCache,
    ModelConfig,
    Transformer,
    forward_logits,
    init_cache,
    make_model,
    positions_from_valid,
    token_logprobs,
)
from proma_jax.models.loading import CheckpointError, load_model, load_pretrained
from proma_jax.models.presets import PRESETS, preset

__all__ = [
    "CheckpointError",
    "KVCache",
    "ModelConfig",
    "PRESETS",
    "Transformer",
    "forward_logits",
    "init_cache",
    "load_model",
    "load_pretrained",
    "make_model",
    "positions_from_valid",
    "preset",
    "token_logprobs",
]
