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
from proma_jax.models.presets import PRESETS, preset

__all__ = [
    "KVCache",
    "ModelConfig",
    "PRESETS",
    "Transformer",
    "forward_logits",
    "init_cache",
    "make_model",
    "positions_from_valid",
    "preset",
    "token_logprobs",
]
