"""Write a training run's policy out as a Hugging Face directory (and optionally a GGUF file).

    python -m proma_jax.export --workdir=runs/smollm2 --out=exports/smollm2 [--step=N]
        [--dtype=float32|bfloat16|float16] [--max_shard_size=5GB] [--gguf=bf16|f16|f32]
        [--overwrite]

The run must have started from a pretrained checkpoint (`config.model.checkpoint`: a Hugging
Face directory, a GGUF file or a hub name); the directory gets that architecture's config.json,
safetensors, tokenizer files with the chat template and generation_config.json
(`models.export`), and loads in transformers, vLLM and `load_pretrained`. A GGUF source gives a
Llama (or Qwen3) directory. With --dtype=float32 (the default) `load_pretrained(OUT)` returns
the trained parameters bit for bit. --gguf also writes OUT/model-<type>.gguf for llama.cpp.
"""

from __future__ import annotations

from absl import app, flags, logging

from proma_jax import cli, runs
from proma_jax.models import export, gguf_export, loading

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (run.json, checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Directory to write; refused if it exists and is not "
                           "empty, unless --overwrite.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", sorted(export.DTYPES),
                           "dtype of the safetensors tensors.")
_MAX_SHARD = flags.DEFINE_string("max_shard_size", "5GB", "Split the safetensors into shards of "
                                 "at most this size (5GB, 500MB, 2GiB, bytes).")
_GGUF = flags.DEFINE_enum("gguf", None, sorted(gguf_export.TENSOR_TYPES),
                          "Also write OUT/model-<type>.gguf with tensors of this type.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")


def export_run(workdir: str, out: str, *, step: int | None = None, dtype: str = "float32",
               max_shard_size: str = "5GB", gguf: str | None = None,
               overwrite: bool = False) -> list[str]:
  """Writes the policy of `workdir`'s checkpoint at `step` (None: latest) to `out`; returns the
  files written. See the module docstring."""
  export.parse_size(max_shard_size)  # a bad size is refused before anything is read
  spec = runs.check_source(workdir)
  step, params = runs.read_params(workdir, step)
  cfg = loading.checkpoint_config(spec, scan_layers=False)
  with loading.open_checkpoint(spec) as source:
    files = export.write_hf_dir(out, params, cfg, source, loading.resolve_checkpoint(spec),
                                dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                                gguf=gguf, name=f"{spec} step {step}")
  print(f"exported {workdir} step {step} to {out}: {', '.join(files)}")
  return files


def main():
  flags.mark_flags_as_required(["workdir", "out"])

  def _main(argv):
    cli.refuse_positional_arguments(argv)
    logging.set_verbosity(logging.WARNING)  # keep absl's backend and orbax INFO lines off
    try:
      export.parse_size(_MAX_SHARD.value)
    except ValueError as e:
      raise app.UsageError(f"--max_shard_size: {e}") from None
    with cli.expected_errors_as_messages(runs.RunError, FileExistsError):
      export_run(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value,
                 max_shard_size=_MAX_SHARD.value, gguf=_GGUF.value, overwrite=_OVERWRITE.value)

  app.run(_main)


if __name__ == "__main__":
  main()
