"""Named decoder shapes: the Qwen3 and SmolLM2 checkpoints' own, and the demo's tiny model.

`preset(name, **overrides)` returns the `ModelConfig` of a published checkpoint (its
`config.json`), e.g. to build a randomly initialised model of the right shape for memory analysis;
loading real weights goes through `load_pretrained`, which reads the shape from the checkpoint.
"""

from __future__ import annotations

import dataclasses

from proma_jax.models.decoder import ModelConfig

_QWEN3 = dict(vocab_size=151936, n_heads=16, n_kv_heads=8, head_dim=128, max_len=40960,
              rope_theta=1_000_000.0, norm_eps=1e-6, qk_norm=True, tie_embeddings=True)

PRESETS: dict[str, dict] = {
    "qwen3-0.6b": dict(_QWEN3, d_model=1024, n_layers=28, mlp_dim=3072),
    "qwen3-1.7b": dict(_QWEN3, d_model=2048, n_layers=28, mlp_dim=6144),
    "qwen3-4b": dict(_QWEN3, d_model=2560, n_layers=36, n_heads=32, mlp_dim=9728),
    "qwen3-8b": dict(_QWEN3, d_model=4096, n_layers=36, n_heads=32, mlp_dim=12288,
                     tie_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         head_dim=64, mlp_dim=1536, max_len=8192, rope_theta=100_000.0,
                         norm_eps=1e-5, qk_norm=False, tie_embeddings=True),
    # The demo's from-scratch decoder; its vocabulary and length come from the task.
    "demo": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=192,
                 qk_norm=True, tie_embeddings=True),
}


def preset(name: str, **overrides) -> ModelConfig:
  """The `ModelConfig` of preset `name`, with `overrides` (e.g. n_layers=2, dtype="bfloat16").
  Its layers are scanned (`scan_layers=True`) unless an override says otherwise."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(f"unknown ModelConfig field(s) {unknown} for preset {name!r}")
  kwargs = dict(PRESETS[name], **dict({"scan_layers": True}, **overrides))  # scanned by default
  missing = sorted(f for f in ("vocab_size", "max_len") if f not in kwargs)
  if missing:
    raise TypeError(f"preset {name!r} needs {missing} (e.g. from the task's tokenizer and lengths)")
  return ModelConfig(**kwargs)
