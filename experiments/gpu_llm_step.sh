#!/usr/bin/env bash
# On a GPU machine (the `device` tool): the full-depth Qwen3-0.6B microbatch step at 8 x 1536
# tokens, bf16, remat, cuDNN attention, chunked log-softmax: time and device peak per variant (one
# process each, so each peak is its own), then Qwen3-1.7B compiled memory against depth.
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_gguf .whl/gguf-*.whl
export PYTHONPATH=$PWD:/tmp/site_gguf
common="--seqs 8 --len 1536 --dtype bfloat16 --param_dtype bfloat16 --remat --logits_chunk 1024 --attention_impl cudnn"
for v in ${VARIANTS:-plain intra proma_mat both_mat}; do
  python3 experiments/bench_llm_step.py --preset qwen3-0.6b $common --variants $v --repeats 3 --out $OUT/step_qwen3-0.6b.jsonl
done
[ "${1:-}" = "--with-1.7b" ] && python3 experiments/bench_memory.py --preset qwen3-1.7b --depths 1 2 4 $common --out $OUT/mem_qwen3-1.7b_bf16_remat.json
