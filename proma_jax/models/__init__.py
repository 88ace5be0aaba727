"""Decoder-only language models: the Qwen3/Llama decoder, presets, pretrained checkpoints and tokenizers."""

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
from proma_jax.models.loading import (
    CheckpointError,
    checkpoint_config,
    load_model,
    load_pretrained,
    resolve_checkpoint,
)
from proma_jax.models.presets import PRESETS, preset

__all__ = [
    "CheckpointError",
    "KVCache",
    "ModelConfig",
    "PRESETS",
    "Transformer",
    "checkpoint_config",
    "forward_logits",
    "init_cache",
    "load_model",
    "load_pretrained",
    "make_model",
    "positions_from_valid",
    "preset",
    "resolve_checkpoint",
    "token_logprobs",
]
