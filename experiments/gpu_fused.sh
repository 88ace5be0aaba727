#!/usr/bin/env bash
# On a GPU machine (the `device` tool), the fused path's goals, one slice per call (each under
# 10 minutes; full-depth compiles dominate): STAGE=update (default) the training loop's microbatch
# update at full Qwen3-0.6B, 8 x 1536 tokens, bf16, remat, logits chunk 1024, cuDNN attention,
# for plain (reinforce) and every PROMA variant, fused; STAGE=large one proma update at Qwen3-1.7B
# and Qwen3-4B; STAGE=rl one whole RL step of proma at full depth (8 prompts x 8 samples, prompts
# of ~480 tokens, 1024 new tokens). One process per row, so each device peak is its own.
# Carry .whl (the gguf wheel) as gpu_llm_step.sh does. Records go to $OUT/fused.jsonl.
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_gguf .whl/gguf-*.whl
export PYTHONPATH=$PWD:/tmp/site_gguf
update="--mode update --seqs 8 --prompt_tokens 512 --new_tokens 1024 --repeats 3 --out $OUT/fused.jsonl"
case "${STAGE:-update}" in
  update)
    for a in ${ALGORITHMS:-reinforce proma proma_intra proma_both}; do
      python3 experiments/gpu_check.py $update --algorithm "$a" --fused "${FUSED:-1}"
    done ;;
  large)
    for p in qwen3-1.7b qwen3-4b; do
      python3 experiments/gpu_check.py $update --algorithm proma --preset "$p"
    done ;;
  rl)
    python3 experiments/gpu_check.py --mode step --algorithm proma --prompts 8 --group 8 \
        --out "$OUT/fused.jsonl" ;;
esac
