#!/usr/bin/env bash
# On one GPU (the `device` tool), inside 8 minutes: the sampler's tokens/s at full Qwen3-0.6B depth,
# then one RL step of each algorithm (time split and device peak; one process each) on
# random-weight Qwen3-0.6B shapes: 64 sequences (8 prompts x 8), microbatches of 8, ~480-token
# prompts (bucket 512) and 1024-token responses, all-bf16, remat, chunked log-softmax.
# LAYERS=8 by default so that the five compilations fit the time; LAYERS=28 for full depth.
# Results: $OUT/gpu_check.jsonl (experiments/README.md).
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
OUT=${OUT:-results}
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_extra .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site_extra
python3 experiments/gpu_check.py --mode sample --out $OUT/gpu_check.jsonl
for alg in ${ALGORITHMS:-reinforce grpo proma proma_intra proma_both}; do
  timeout ${PER_ALGORITHM_S:-150} python3 experiments/gpu_check.py --mode step --algorithm $alg \
      --layers ${LAYERS:-8} --out $OUT/gpu_check.jsonl || echo "$alg: exit $?"
done
