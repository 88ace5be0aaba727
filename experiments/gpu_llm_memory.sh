#!/usr/bin/env bash
# On a GPU machine (the `device` tool): attention check, then compiled memory of the microbatch
# step on Qwen3-0.6B / 1.7B shapes at 8 x 1536 tokens, bf16, against depth. Writes to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi -L
# The image's own jax/flax/optax (its jax is newer than our pin); gguf, which it lacks, from .whl.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_gguf .whl/gguf-*.whl
export PYTHONPATH=$PWD:/tmp/site_gguf
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
ATTN=cudnn
python3 experiments/check_attention.py || ATTN=xla
echo "attention: $ATTN"
common="--seqs 8 --len 1536 --dtype bfloat16 --logits_chunk 1024 --attention_impl $ATTN"
python3 experiments/bench_memory.py --preset qwen3-0.6b --depths 1 2 4 --param_dtype bfloat16 --remat $common --out $OUT/mem_qwen3-0.6b_bf16_remat.json
python3 experiments/bench_memory.py --preset qwen3-0.6b --depths 1 2 --param_dtype bfloat16 --variants plain $common --out $OUT/mem_qwen3-0.6b_bf16_noremat.json
python3 experiments/bench_memory.py --preset qwen3-0.6b --depths 1 2 --param_dtype float32 --remat --variants plain proma_mat $common --out $OUT/mem_qwen3-0.6b_f32master_remat.json
[ "${1:-}" = "--with-1.7b" ] && python3 experiments/bench_memory.py --preset qwen3-1.7b --depths 1 2 4 --param_dtype bfloat16 --remat $common --out $OUT/mem_qwen3-1.7b_bf16_remat.json
